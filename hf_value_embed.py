"""
transformers' GPT-2 with value embeddings (train.py --value_embed=True, as the CPU presets train): a second token
embedding, added with a learned weight per layer to the values of every attention layer. All else is transformers'
own GPT2LMHeadModel. export.py copies this file into the folder it writes, where

    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

loads it: transformers' own way to run an architecture it lacks. The folder's model type is its own, not gpt2:
without trust_remote_code=True transformers refuses it, where GPT-2 would load it with c_attn newly initialised and
write nonsense. Nothing else in the project imports this file.
"""
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel


class GPT2WithValueEmbeddingsConfig(GPT2Config):
    """GPT-2's settings under a model type of its own. Loaded through config.json's auto_map, it also registers the
    model with AutoModelForCausalLM, so pipeline("text-generation") knows it for a causal LM."""
    model_type = "gpt2_value_embed"  # as export.py writes it into config.json


class ValuesWithEmbedding(nn.Module):
    """A layer's c_attn (query, key and value in one), with its share of the tokens' value embeddings added to the
    values."""

    def __init__(self, c_attn, n_embd):
        super().__init__()
        self.c_attn, self.n_embd = c_attn, n_embd
        self.ve_gate = nn.Parameter(torch.zeros(1))
        self.ve = None  # the value embeddings of the tokens being run: the model's forward sets them

    def forward(self, x):
        q, k, v = self.c_attn(x).split(self.n_embd, dim=-1)
        return torch.cat([q, k, v + self.ve_gate * self.ve], dim=-1)


class GPT2WithValueEmbeddings(GPT2LMHeadModel):
    config_class = GPT2WithValueEmbeddingsConfig

    def __init__(self, config):
        super().__init__(config)
        self.vte = nn.Embedding(config.vocab_size, config.n_embd)
        for block in self.transformer.h:
            block.attn.c_attn = ValuesWithEmbedding(block.attn.c_attn, config.n_embd)
        self.post_init()

    def forward(self, input_ids=None, **kwargs):
        ve = self.vte(input_ids)  # with a cache, the new tokens only: the values of the new positions
        for block in self.transformer.h:
            block.attn.c_attn.ve = ve
        return super().forward(input_ids=input_ids, **kwargs)

