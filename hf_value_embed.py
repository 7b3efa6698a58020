"""
transformers' GPT-2 with value embeddings (train.py --value_embed=True, as the CPU presets train): a second token
embedding, added with a learned weight per layer to the values of every attention layer. All else is transformers'
own GPT2LMHeadModel. export.py copies this file into the folder it writes, where

    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

loads it: transformers' own way to run an architecture it lacks. Nothing else in the project imports it.
"""
import torch
from torch import nn
from transformers import GPT2LMHeadModel


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
