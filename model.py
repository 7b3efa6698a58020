"""
The GPT: a GPT-2 style decoder.

Tokens become vectors (a token embedding plus a learned position embedding). Each block then lets every position
gather from the positions before it (causal self-attention) and think on its own (an MLP), each step added to the
residual stream after a LayerNorm. A last LayerNorm, and the head, tied to the token embedding, scores every token
of the vocabulary as the next one. Optionally, value embeddings: a second token embedding added to the attention's
values in every layer.

After the model: generation, with a KV cache so that each new token costs one position's work.
"""
import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from config import UserError
from fused_loss import fused_cross_entropy


@dataclass
class GPTConfig:
    block_size: int = 128  # context length
    vocab_size: int = 4096  # from the data (prepare.py's meta.json)
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.0
    bias: bool = False  # biases in Linear and LayerNorm
    value_embed: bool = False  # a second token embedding, added to every layer's attention values

    @property
    def padded_vocab_size(self):
        # a multiple of 64 makes the head's matmul faster on GPUs; the padding rows are left out of every loss and
        # every probability (forward, generate), as the exported model has none
        return (self.vocab_size + 63) // 64 * 64


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0, f"n_embd={config.n_embd} is not a multiple of n_head={config.n_head}"
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        if config.value_embed:  # how much of the token's value embedding this layer's values take in
            self.ve_gate = nn.Parameter(torch.zeros(1))

    def forward(self, x, ve=None, cache=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        if ve is not None:  # value embeddings (GPT, below)
            v = v + self.ve_gate * ve
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if cache is not None:  # generation: the keys and values of the positions before these, and these
            k, v = cache.update(k, v)
        y = causal_attention(q, k, v, self.dropout if self.training else 0.0)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): the heads side by side again
        return self.resid_dropout(self.c_proj(y))


def causal_attention(q, k, v, dropout_p=0.0):
    """softmax(q k^T / sqrt(hs)) v, each query seeing the keys up to its own position: torch's
    scaled_dot_product_attention (flash attention on CUDA). On a CPU it runs in float32 even under bf16 autocast:
    there its backward trains 3x slower in bf16."""
    mask, is_causal = causal_mask(q.size(2), k.size(2), q.device)
    if q.device.type == "cpu":
        with torch.autocast("cpu", enabled=False):
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                                  is_causal=is_causal, dropout_p=dropout_p)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=dropout_p)


def causal_mask(T, Tk, device):
    """(attn_mask, is_causal) for T queries at the last T of Tk positions: query i sits at Tk - T + i. Without a
    past (T == Tk) the plain causal triangle; a single new query sees every key; several new queries after a KV
    cache's past, a triangle shifted by it."""
    if T == Tk:
        return None, T > 1
    if T == 1:
        return None, False
    return torch.ones(T, Tk, dtype=torch.bool, device=device).tril(Tk - T), False


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, ve=None, cache=None):
        x = x + self.attn(self.ln_1(x), ve, cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.padded_vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied: one matrix embeds tokens and scores them
        if config.value_embed:
            # Value embeddings (modded-nanogpt): each token's own vector, added with a learned weight per layer to
            # the values its position offers the attention, so a layer can pass on which token a position holds
            # without the residual stream carrying it; a lookup, no FLOPs. GPT-2 has no such thing.
            self.vte = nn.Embedding(config.padded_vocab_size, config.n_embd)
        self.init_weights()

    def init_weights(self):
        """
        GPT-2's initialisation:
          wte, wpe, vte, c_attn, c_fc     N(0, 0.02)
          c_proj (attention and MLP)      N(0, 0.02 / sqrt(2 * n_layer)): each block adds two of them to the
                                          residual stream, so this keeps its variance from growing with depth
          LayerNorm weight / any bias     1 / 0
          ve_gate (value embeddings)      0: every layer starts without them
        """
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * self.config.n_layer))
            elif p.dim() == 2:
                nn.init.normal_(p, mean=0.0, std=0.02)
            elif name.endswith(".weight"):  # the only 1-D weights are LayerNorm's
                nn.init.ones_(p)
            else:
                nn.init.zeros_(p)

    def hidden(self, idx, cache=None):
        """The final hidden states (B, T, n_embd) of the tokens idx (B, T); with a cache, those after its own."""
        start = cache.pos if cache is not None else 0
        T = idx.size(1)
        assert start + T <= self.config.block_size, f"{start + T} tokens, block_size is {self.config.block_size}"
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        ve = self.vte(idx) if self.config.value_embed else None
        for i, block in enumerate(self.h):
            x = block(x, ve, cache.layers[i] if cache is not None else None)
        return self.ln_f(x)

    def forward(self, idx, targets=None, return_logits=True):
        """
        idx (B, T) token ids -> (logits (B, T, vocab_size), the mean cross-entropy against targets or None), both
        over the real vocabulary: the padding rows take no probability. A training step needs only the loss: with
        return_logits=False the logits are None, and the fused loss (on a CPU) never forms them.
        """
        x = self.hidden(idx)
        V = self.config.vocab_size
        if targets is not None and not return_logits and fused_loss_pays(x):
            # the head and the loss in one, never holding the logits (fused_loss.py)
            return None, fused_cross_entropy(x.flatten(0, 1), self.lm_head.weight[:V], targets.flatten())
        logits = self.lm_head(x)[..., :V]  # the matmul over every row (faster), then the padding dropped
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        return logits if return_logits else None, loss

    @classmethod
    def from_checkpoint(cls, ckpt):
        """The model a checkpoint (checkpoint.load) holds: its shape from the checkpoint, never from the flags."""
        model = cls(GPTConfig(**{f.name: ckpt["config"][f.name] for f in fields(GPTConfig)}))
        try:
            model.load_state_dict(ckpt["model"])
        except RuntimeError as e:
            raise UserError(f"the checkpoint does not fit its own model config: {str(e).splitlines()[0]}")
        return model

    def num_params(self):
        """(parameters besides the embeddings, all parameters); the head is tied to wte, so counted once."""
        total = sum(p.numel() for p in self.parameters())
        embeddings = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Embedding))
        return total - embeddings, total


FUSED_LOSS = True  # bench.py and the tests turn it off, to compare with the plain loss


def fused_loss_pays(x):
    """Whether the loss of the hidden states x is computed fused with the head: on a CPU, run eagerly, where it is
    the faster (bench.py train). On a GPU, or compiled, the plain loss is as fast."""
    return FUSED_LOSS and x.device.type == "cpu" and not torch.compiler.is_compiling()


# -----------------------------------------------------------------------------
# Generation: the prompt runs once, then one position per new token, its keys and values kept in a cache


class LayerCache:
    """One layer's keys and values so far: (B, nh, block_size, hs) each, the first `pos` positions filled, in the
    dtype the forward pass computes them in (bf16 under bf16 autocast: half float32's memory, and no cast a token)."""

    def __init__(self, shape):
        self.shape, self.k, self.v, self.pos = shape, None, None, 0

    def update(self, k, v):
        """Store the keys and values of the new positions; all of them so far."""
        if self.k is None:
            self.k, self.v = k.new_zeros(self.shape), v.new_zeros(self.shape)
        end = self.pos + k.size(2)
        self.k[:, :, self.pos:end], self.v[:, :, self.pos:end] = k, v
        self.pos = end
        return self.k[:, :, :end], self.v[:, :, :end]


class KVCache:
    def __init__(self, config, batch_size):
        shape = (batch_size, config.n_head, config.block_size, config.n_embd // config.n_head)
        self.layers = [LayerCache(shape) for _ in range(config.n_layer)]

    @property
    def pos(self):
        return self.layers[-1].pos  # positions every layer holds


@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=1.0, generator=None, use_cache=True):
    """
    Yields (next token (B, 1), its logits (B, vocab)) for max_new_tokens steps after the prompt idx (B, T).

    Positions are learned, so when the context is full every cached key and value is stale once the window moves.
    Rather than recompute the whole window for every new token, the window jumps ahead by a quarter of block_size
    and the cache is rebuilt from the rest in one pass: the context then always holds between 3/4 and all of
    block_size tokens. use_cache=False recomputes the same window at every step (the reference in the tests).
    """
    block_size = model.config.block_size
    keep = max(1, block_size - max(1, block_size // 4))  # tokens the window keeps when it jumps
    assert idx.size(1) <= block_size, f"prompt of {idx.size(1)} tokens, block_size is {block_size}"
    # the head as (n_embd, vocab) without the padding ids, so they are never sampled; a CPU reads it faster so
    head = model.lm_head.weight[:model.config.vocab_size].t().contiguous()
    start, cache, todo = 0, None, idx  # start: the window's first position in idx; todo: what the cache lacks
    for _ in range(max_new_tokens):
        if idx.size(1) - start > block_size:  # the window is full: jump it ahead
            start = idx.size(1) - keep
            cache, todo = None, idx[:, start:]
        if not use_cache:
            x = model.hidden(idx[:, start:])
        else:
            if cache is None:
                cache = KVCache(model.config, idx.size(0))
            x = model.hidden(todo, cache)
        logits = (x[:, -1] @ head).float()
        token = sample_token(logits, temperature, top_k, top_p, generator)
        yield token, logits
        idx, todo = torch.cat((idx, token), dim=1), token


def sample_token(logits, temperature=1.0, top_k=None, top_p=1.0, generator=None):
    """One token id per row of logits (B, V): greedy at temperature 0, else from the top-k / top-p set."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    # a cut needs the candidates in descending order: top-k gives its k sorted, top-p alone sorts them all
    ids = None
    if top_k is not None and top_k < logits.size(-1):
        logits, ids = torch.topk(logits, top_k)
    elif top_p < 1.0:
        logits, ids = torch.sort(logits, descending=True)
    probs = F.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        # drop the tail: tokens whose more likely predecessors already hold top_p of the probability
        probs = probs.masked_fill(probs.cumsum(dim=-1) - probs >= top_p, 0.0)
    # Inverse CDF with one uniform number per row: torch.multinomial draws one per vocabulary entry, which at
    # batch 1 on a CPU costs more than the head. u lies in (0, total], so the first cdf >= u is never a token of
    # probability 0 (its cdf equals its predecessor's).
    cdf = probs.cumsum(dim=-1)
    u = (1 - torch.rand(cdf.size(0), 1, generator=generator, device=cdf.device)) * cdf[:, -1:]
    choice = torch.searchsorted(cdf, u)
    return choice if ids is None else ids.gather(1, choice)
