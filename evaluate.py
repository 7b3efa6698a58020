"""
`python train.py --init_from=resume --eval_only=True`: a checkpoint scored on every token of the validation split,
in one line, bits per byte first (the figure that compares models across vocabularies).
"""
import math

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import checkpoint
from bins import load_bins
from model import GPT
from runtime import autocast_context, pick_device


def evaluate(cfg, chosen=()):
    """Score the checkpoint cfg names; prints one line, returns its figures."""
    path = checkpoint.find(cfg)
    ckpt = checkpoint.load(path)
    cfg, _ = checkpoint.run_settings(cfg, chosen, ckpt, path)
    bins, meta = load_bins(cfg["data_dir"], cfg["block_size"])
    checkpoint.check_vocab(ckpt, path, meta, cfg["data_dir"])
    model = GPT.from_checkpoint(ckpt)
    device = pick_device(cfg["device"])
    ctx, _ = autocast_context(device, cfg["dtype"])
    v = meta["splits"]["validation"]
    # small batches: the full logits of a batch (batch x block_size x vocabulary floats) are held at once
    loss, ppl, bpb = evaluate_split(model.to(device), bins["validation"], v["bytes"], cfg["block_size"],
                                    min(cfg["batch_size"], 16), ctx, device)
    print(f"validation ({v['tokens']:,} tokens, {v['bytes']:,} bytes): {bpb:.4f} bits/byte | loss {loss:.4f} "
          f"nats/token ({meta['vocab_size']:,}-token vocabulary) | perplexity {ppl:.3f}")
    return dict(loss=loss, perplexity=ppl, bits_per_byte=bpb)


@torch.no_grad()
def evaluate_split(model, data, num_bytes, block_size, batch_size, ctx, device):
    """Every token of `data` (a Bin) scored once, in windows of block_size that do not overlap: (nats/token,
    perplexity, bits/byte)."""
    model.eval()
    tokens = data.tokens()
    total_nats, total_tokens = 0.0, 0
    starts = list(range(0, data.num_tokens - 1, block_size))
    for i in tqdm(range(0, len(starts), batch_size), desc="evaluating", unit="batch", dynamic_ncols=True):
        windows = [tokens[s:s + block_size + 1].astype(np.int64) for s in starts[i:i + batch_size]]
        # the last window may be short: score it on its own
        groups = [windows] if len(windows[-1]) == len(windows[0]) else [windows[:-1], windows[-1:]]
        for group in groups:
            if not group:
                continue
            w = torch.from_numpy(np.stack(group)).to(device)
            with ctx:
                logits, _ = model(w[:, :-1])
            nats = F.cross_entropy(logits.flatten(0, 1).float(), w[:, 1:].flatten(), reduction="sum")
            total_nats += nats.item()
            total_tokens += w[:, 1:].numel()
    loss = total_nats / total_tokens
    return loss, math.exp(loss), total_nats / math.log(2) / num_bytes
