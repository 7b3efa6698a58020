"""
A GPT-2 style decoder: token + learned position embeddings, pre-LayerNorm blocks of causal self-attention and
a GELU MLP, a final LayerNorm, and an output head tied to the token embedding; optionally, value embeddings.
Generation uses a KV cache. At the end: loading a checkpoint and picking a device, which train.py, sample.py and
export.py share.
"""
import math
import os
from contextlib import nullcontext
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from config import UserError


@dataclass
class GPTConfig:
    block_size: int = 128  # context length
    vocab_size: int = 4096  # from the data (prepare.py's meta.json); the embedding is padded, see padded_vocab_size
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.0
    bias: bool = False  # biases in Linear and LayerNorm
    value_embed: bool = False  # a second token embedding, added to every layer's attention values

    @property
    def padded_vocab_size(self):
        # a multiple of 64 makes the big head matmul markedly faster on GPUs; pad ids never occur in the
        # data, so training pushes their logits down, and generation never samples them
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

    def forward(self, x, cache=None, layer=0, ve=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        if ve is not None:
            v = v + self.ve_gate * ve
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if cache is None:
            mask, is_causal = None, True
        else:
            # The cache holds Tk - T earlier positions. Query i sits at position Tk - T + i and may see keys
            # up to it: a plain causal mask only when there is no past, no mask at all for a single query.
            k, v = cache.update(layer, k, v)
            Tk = k.size(2)
            is_causal = Tk == T
            mask = None
            if T > 1 and not is_causal:
                mask = torch.ones(T, Tk, dtype=torch.bool, device=x.device).tril(diagonal=Tk - T)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                           dropout_p=self.dropout if self.training else 0.0)  # flash on CUDA
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side again
        return self.resid_dropout(self.c_proj(y))


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

    def forward(self, x, cache=None, layer=0, ve=None):
        x = x + self.attn(self.ln_1(x), cache, layer, ve)
        return x + self.mlp(self.ln_2(x))


class KVCache:
    """Keys and values of the positions seen so far, for each layer: (n_layer, B, nh, block_size, hs)."""

    def __init__(self, config, batch_size, device, dtype):
        shape = (config.n_layer, batch_size, config.n_head, config.block_size, config.n_embd // config.n_head)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0  # positions filled; the same for every layer once a forward pass is done

    def update(self, layer, k, v):
        """Store the new keys/values of `layer` and return all of them so far."""
        end = self.pos + k.size(2)
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        if layer == self.k.size(0) - 1:
            self.pos = end
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class FusedLinearCrossEntropy(torch.autograd.Function):
    """
    mean(cross_entropy(x @ w.T, targets)) without ever holding all the logits.

    The loss is the last node of the graph, so its gradients are known during the forward pass: we take the
    rows in chunks, compute each chunk's logits, log-sum-exp and softmax - onehot in place, and accumulate dx
    and dw right away. Backward only scales them. On a CPU this saves several passes over the logits per step
    (bench.py train compares it with the plain loss); chunks of 512 rows were the fastest of 128 to 2048 with a
    compact head (RESULTS.md). Under torch.no_grad (evaluation) it skips the gradients.
    """

    @staticmethod
    def forward(ctx, x, w, targets, chunk_rows, with_grad):
        n = x.size(0)
        dx, dw = (torch.empty_like(x), torch.empty_like(w)) if with_grad else (None, None)
        loss = torch.zeros((), dtype=torch.float32, device=x.device)
        buf = x.new_empty(min(chunk_rows, n), w.size(0))  # one chunk's logits, reused: no big allocations
        for i in range(0, n, chunk_rows):
            xc, tc = x[i:i + chunk_rows], targets[i:i + chunk_rows]
            logits = torch.mm(xc, w.t(), out=buf[:len(tc)])
            target_logit = logits.gather(1, tc[:, None])
            top = logits.amax(dim=1, keepdim=True)
            total = logits.sub_(top).exp_().sum(dim=1, keepdim=True)  # logits now hold exp(logit - max)
            loss += (top + total.log() - target_logit).sum()
            if with_grad:  # d loss / d logits = (softmax - onehot(target)) / n, in one pass over the logits
                grad = logits.mul_((total * n).reciprocal_())
                grad[torch.arange(len(tc)), tc] -= 1.0 / n
                torch.mm(grad, w, out=dx[i:i + chunk_rows])
                if i == 0:
                    torch.mm(grad.t(), xc, out=dw)
                else:
                    dw.addmm_(grad.t(), xc)
        if with_grad:
            ctx.save_for_backward(dx, dw)
        return loss / n

    @staticmethod
    def backward(ctx, grad_loss):
        dx, dw = ctx.saved_tensors
        return dx * grad_loss, dw * grad_loss, None, None, None


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
            # Value embeddings (modded-nanogpt): each token's own vector, added with a learned per-layer weight to
            # the values its position offers the attention of every layer, so a layer can pass on which token a
            # position holds without the residual stream carrying it. A lookup: no FLOPs (RESULTS.md, value-embed).
            # GPT-2 has no such thing, so such a model does not export to transformers.
            self.vte = nn.Embedding(config.padded_vocab_size, config.n_embd)
        self.fused_loss = False  # FusedLinearCrossEntropy: faster on CPU, where train.py turns it on
        self._head, self._head_key = None, None  # see decoding_head
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

    def num_params(self):
        """(parameters besides the embeddings, all parameters); the head is tied to wte, so counted once."""
        total = sum(p.numel() for p in self.parameters())
        embeddings = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Embedding))
        return total - embeddings, total

    def forward(self, idx, targets=None, cache=None):
        """
        idx (B, T) token ids -> (logits (B, T, padded vocab), mean cross-entropy loss or None).
        With fused_loss and targets, logits is None: the fused loss never holds them all.
        """
        B, T = idx.size()
        x = self.hidden(idx, cache)
        if targets is not None and self.fused_loss:
            loss = FusedLinearCrossEntropy.apply(x.view(B * T, -1), self.lm_head.weight, targets.reshape(-1), 512,
                                                 torch.is_grad_enabled())
            return None, loss
        logits = self.lm_head(x)
        loss = None if targets is None else F.cross_entropy(logits.view(B * T, -1).float(), targets.reshape(-1))
        return logits, loss

    def hidden(self, idx, cache=None):
        """The final hidden states (B, T, n_embd), before the head."""
        start = cache.pos if cache is not None else 0
        T = idx.size(1)
        assert start + T <= self.config.block_size, f"sequence of {start + T} tokens, block_size is {self.config.block_size}"
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        ve = self.vte(idx) if self.config.value_embed else None
        for layer, block in enumerate(self.h):
            x = block(x, cache, layer, ve)
        return self.ln_f(x)

    def flops_per_token(self):
        """Training FLOPs per token: 6 per weight (forward 2, backward 4) plus attention's QK^T and AV."""
        c = self.config
        matmul_params = self.num_params()[0] + self.wte.weight.numel()  # wte counts: it is also the head
        return 6 * matmul_params + 12 * c.n_layer * c.n_embd * c.block_size

    def estimate_mfu(self, tokens_per_sec, peak_flops):
        """Model FLOPs utilisation: achieved training FLOP/s over the device's peak."""
        return self.flops_per_token() * tokens_per_sec / peak_flops

    def decoding_head(self):
        """
        The tied head as an (n_embd, vocab) copy without the padded ids, so they are never sampled. With GPT-2's
        whole vocabulary the head is 2/3 of all weights, and at batch 1 a CPU reads it faster in this layout
        (bench.py sample). The copy is kept until the weights change (in-place updates bump _version).
        """
        w = self.lm_head.weight
        key = (w.data_ptr(), w._version, w.dtype, w.device)
        if self._head_key != key:
            self._head, self._head_key = w[:self.config.vocab_size].t().contiguous(), key
        return self._head

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=1.0, generator=None,
                 use_cache=True, slide=None):
        """
        Yields (next token (B, 1), its logits (B, vocab)) for max_new_tokens steps after the prompt idx (B, T).

        With the cache, the prompt is run once and then one token per step. Positions are learned, so when the
        context is full, every cached key and value is stale once the window moves. Rather than recompute the
        whole window for every new token, the window jumps ahead by `slide` tokens (default block_size // 4)
        and the cache is rebuilt from the remaining block_size - slide tokens in one batched pass: about one
        rebuild per `slide` tokens, so the context always holds between 3/4 and all of block_size tokens.
        use_cache=False recomputes the same window from scratch at every step (the reference in the tests).
        """
        block_size = self.config.block_size
        slide = slide or max(1, block_size // 4)
        assert idx.size(1) <= block_size, f"prompt of {idx.size(1)} tokens, block_size is {block_size}"
        param = next(self.parameters())
        head = self.decoding_head()
        start = 0  # first position of the window within idx
        cache, todo = None, idx  # todo: tokens not yet in the cache
        for _ in range(max_new_tokens):
            if idx.size(1) - start > block_size:  # the window is full: jump it ahead, keeping at least one token
                start = idx.size(1) - max(1, block_size - slide)
                cache, todo = None, idx[:, start:]
            if not use_cache:
                x = self.hidden(idx[:, start:])
            else:
                if cache is None:
                    cache = KVCache(self.config, idx.size(0), idx.device, param.dtype)
                x = self.hidden(todo, cache)
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
    # Inverse CDF with one uniform number per row. torch.multinomial draws one random number per vocabulary
    # entry, which at batch 1 on a CPU costs more than the whole 50K-row head. u lies in (0, total], so the
    # first cdf >= u is never a token of probability 0 (its cdf equals its predecessor's).
    cdf = probs.cumsum(dim=-1)
    u = (1 - torch.rand(cdf.size(0), 1, generator=generator, device=cdf.device)) * cdf[:, -1:]
    choice = torch.searchsorted(cdf, u)
    return choice if ids is None else ids.gather(1, choice)


# -----------------------------------------------------------------------------
# Loading a trained model, and where to run it: shared by train.py, sample.py and export.py


CHECKPOINT_VERSION = 2  # bump when what a checkpoint holds changes (2: the vocabulary travels with it)


def load_checkpoint(path):
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path}: train one first (python train.py)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, random bytes, or not a torch file at all
        raise UserError(f"{path} is not a readable checkpoint ({type(e).__name__}): truncated or corrupt?")
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise UserError(f"{path} is not a checkpoint written by train.py")
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise UserError(f"{path} was written by another version of train.py (checkpoint version "
                        f"{ckpt.get('version', 1)}, this one reads {CHECKPOINT_VERSION}): train it again")
    return ckpt


def model_from_checkpoint(ckpt, path):
    """The model the checkpoint describes, with its weights; its shape comes from the checkpoint, not the flags."""
    model = GPT(GPTConfig(**{f.name: ckpt["config"][f.name] for f in fields(GPTConfig)}))
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise UserError(f"{path} does not fit its own model config: {str(e).splitlines()[0]}")
    return model


def pick_device(name):
    if name != "auto":
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise UserError(f"--device={name} but no CUDA GPU is available: use --device=cpu")
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def autocast_context(device, dtype):
    """(context for forward passes, the dtype in effect): bf16 autocast on CUDA, fp16 on GPUs without bf16."""
    if dtype == "auto":
        dtype = "float32"
        if device.type == "cuda":
            dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if dtype == "float32":
        return nullcontext(), dtype
    return torch.autocast(device_type=device.type, dtype=getattr(torch, dtype)), dtype
