"""
Train the GPT on the bins that prepare.py wrote.

    python train.py                                   # the default model, sized for a GPU
    python train.py --preset=cpu                      # sized for a 2-core laptop: a few minutes
    python train.py --init_from=resume                # continue from out_dir/ckpt.pt
    python train.py --init_from=resume --eval_only=True   # score ckpt.pt on the whole validation split
    torchrun --standalone --nproc_per_node=8 train.py # DDP on 8 GPUs (gloo when on CPU)

A step: take random windows of the training tokens, predict each next token, and move every weight against the
gradient of the loss: Muon for the blocks' matrices, AdamW for the rest, at a learning rate that warms up and then
decays. Every eval_interval steps: estimate the loss on both splits, keep the best weights, save a checkpoint to
resume from, and write a short story.

train() comes first: the set-up, then the loop. The pieces it calls follow it. The machinery (checkpoints, signals,
DDP, the log, the bins' checks) lives in rooms of its own: checkpoint.py, runtime.py, logbook.py, bins.py.
"""
import math
import os
import shlex
import sys
from contextlib import nullcontext

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import checkpoint
import runtime
from bins import load_bins
from config import MODEL, PATHS, SCRIPTS, UserError, get_config
from logbook import Bookkeeper, Log, plot_losses
from model import GPT, GPTConfig
from muon import Muon
from sample import short_story
from tokenizer import get_tokenizer


def train(cfg, chosen=()):
    """Train, or resume, as cfg says; returns dict(best_val_loss, model). `chosen`: the keys the user set."""
    rank, world, local, device = runtime.setup(cfg)
    master = rank == 0  # the process that writes files and prints
    ckpt_path, best_path = os.path.join(cfg["out_dir"], "ckpt.pt"), os.path.join(cfg["out_dir"], "best.pt")
    ckpt = checkpoint.load(ckpt_path) if cfg["init_from"] == "resume" else None
    if ckpt is None and "init_from" not in chosen:  # a run's files are replaced only when told: --init_from=scratch
        checkpoint.refuse_to_replace(ckpt_path)
    cfg, chosen = checkpoint.run_settings(cfg, chosen, ckpt, ckpt_path)  # a resumed run keeps its own settings
    if ckpt is not None and ckpt["step"] >= cfg["max_iters"]:
        if master:
            print(f"{ckpt_path} is already complete at step {ckpt['step']} (max_iters={cfg['max_iters']}): "
                  f"nothing to do. To train longer: python train.py --init_from=resume --max_iters=M")
        return dict(best_val_loss=ckpt["best_val_loss"], model=GPT.from_checkpoint(ckpt))
    bins, meta = load_bins(cfg["data_dir"], cfg["block_size"])
    enc = get_tokenizer(meta["vocab"])
    if ckpt is None:
        # torch's RNG: the first weights (DDP gives every process rank 0's), then dropout, differing by process
        torch.manual_seed(cfg["seed"] + rank)
        model = GPT(GPTConfig(**{k: cfg[k] for k in MODEL}, vocab_size=meta["vocab_size"]))
    else:
        checkpoint.check_vocab(ckpt, ckpt_path, meta, cfg["data_dir"])
        model = GPT.from_checkpoint(ckpt)
    model.to(device)
    ctx, dtype = runtime.autocast_context(device, cfg["dtype"], training=True)
    runtime.use_tf32(device, dtype)  # float32 on a GPU: TF32 matmuls where it has them
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == "float16")  # bf16 and fp32 need no loss scaling
    compiling = runtime.use_compiler(cfg, device, chosen, master)
    step_model = model  # the model each step runs
    if world > 1:  # every process computes its gradients, DDP averages them
        step_model = DDP(model, device_ids=[local] if device.type == "cuda" else None)
    if compiling:  # around DDP: the compiler splits the backward at DDP's buckets, whose all-reduces then overlap it
        step_model = torch.compile(step_model, dynamic=False)
    optimizers = make_optimizers(model, cfg, device, dtype)
    generator = torch.Generator().manual_seed(cfg["seed"] + rank)  # batches: resumable, unlike the global RNG
    start_step, best_val, bits_per_byte = 0, float("inf"), None  # bits_per_byte: the latest evaluation's
    if ckpt is not None:
        start_step, best_val = checkpoint.resume(ckpt, ckpt_path, optimizers, scaler, generator, cfg, rank, world,
                                                 device)
        bits_per_byte = ckpt.get("bits_per_byte")
    del ckpt
    grad_accum = cfg["gradient_accumulation_steps"]  # micro-batches a step, on every process
    tokens_per_step = grad_accum * world * cfg["batch_size"] * cfg["block_size"]
    eval_iters = runtime.cpu_eval_iters(cfg, chosen, device)
    if master:
        if meta["source"].get("demo"):  # prepare.py's fallback where the hub is out of reach
            stories = sum(split["stories"] for split in meta["splits"].values())
            print(f"data: the demo corpus, {stories} stories: enough to see the pipeline run, not to learn English "
                  f"(TinyStories: python prepare.py where the Hugging Face hub is reachable)")
        n_params, n_total = model.num_params()
        print(f"model: {n_params / 1e6:.2f}M parameters besides the embeddings, {n_total / 1e6:.2f}M in all (the head "
              f"is tied to the {meta['vocab_size']:,}-token embedding)")
        print(f"tokens per step: {tokens_per_step:,} = {grad_accum} accumulation x {world} processes x "
              f"{cfg['batch_size']} batch x {cfg['block_size']} tokens; on {device} in {dtype}")
        if device.type == "cpu":
            print(runtime.cpu_note(model, cfg, eval_iters, chosen, tokens_per_step, dtype))
        if start_step:
            print(f"resuming from {ckpt_path} at step {start_step}")
    os.makedirs(cfg["out_dir"], exist_ok=True)
    log = Log(cfg["out_dir"], start_step, tokens_per_step, enabled=master)
    log.resumed = runtime.from_rank0(log.resumed, world)  # rank 0 alone reads log.jsonl: all evaluate where it says
    stop = runtime.StopRequest(world, device, cfg["log_interval"], ckpt_path)
    speed = runtime.Throughput(device, tokens_per_step)
    bar = tqdm(total=cfg["max_iters"], initial=start_step, unit="step", dynamic_ncols=True, disable=not master)
    book = Bookkeeper(start_step, cfg["max_iters"], cfg["eval_interval"], log, stop, bar)  # which steps do what
    v = meta["splits"]["validation"]
    diverged = f"training diverged; {ckpt_path} still holds the last good state (try a lower --learning_rate)"

    # the log and the bar are closed on the way out, whatever happens: an error line then starts on a line of its own
    with stop, log, bar:
        for step in range(start_step, cfg["max_iters"] + 1):
            row = book.row(step)  # this step's row of log.jsonl

            # once in a while: the loss on both splits, the best weights, and a story from a fixed prompt and seed
            if book.evaluates(step):
                losses = estimate_loss(model, bins, cfg, eval_iters, ctx, device, rank, world)
                if not math.isfinite(losses["validation"]):
                    raise UserError(f"validation loss is {losses['validation']} at step {step}: {diverged}")
                bits_per_byte = losses["validation"] * v["tokens"] / v["bytes"] / math.log(2)  # any vocabulary
                if master:  # tqdm.write is the class's: it does not know this bar is disabled elsewhere
                    bar.write(f"step {step}: val {bits_per_byte:.3f} bits/byte (val loss {losses['validation']:.4f}, "
                              f"train loss {losses['train']:.4f} nats/token)")
                row.update(train_loss=losses["train"], val_loss=losses["validation"])
                if losses["validation"] < best_val:
                    best_val = losses["validation"]
                    if master:
                        checkpoint.save(best_path, model, cfg, chosen, meta["vocab"], step=step, val_loss=best_val,
                                        bits_per_byte=bits_per_byte)
                if cfg["eval_sample"] and master:  # the same prompt and seed every time: what changes is the model
                    row["sample"] = short_story(model, enc, cfg["eval_sample"], cfg["seed"], ctx)
                    bar.write(f"step {step} writes: {row['sample']}".replace("\n", " "))

            # the state to resume from: after an evaluation, and on a Ctrl-C or SIGTERM, which ends the run here
            if book.saves(step):
                # the loss is checked only every log_interval steps: a stop in between must not save a diverged model
                if not torch.stack([p.isfinite().all() for p in model.parameters()]).all():
                    raise UserError(f"the weights are not finite at step {step}: {diverged}")
                ranks = checkpoint.rng_states(generator, device, world)  # every process's: they all call it
                if master:
                    checkpoint.save(ckpt_path, model, cfg, chosen, meta["vocab"], step=step, best_val_loss=best_val,
                                    bits_per_byte=bits_per_byte, optimizer=[o.state_dict() for o in optimizers],
                                    scaler=scaler.state_dict(), ranks=ranks)
                    if cfg["keep_checkpoints"] and book.evaluating:
                        checkpoint.keep_copy(ckpt_path, step)
            if book.evaluating or book.signum:  # the others waited while rank 0 saved and wrote: here, not in a step
                runtime.meet(world)
                speed.restart(step)
            if book.ends(step):  # the last step, or a stop
                break

            # one training step
            set_lr(optimizers, step, cfg)
            loss = train_step(step_model, optimizers, scaler, bins["train"], generator, cfg, ctx, device)
            bar.update(1)

            # log: the loss now and then, in the progress bar and this step's row
            if step % cfg["log_interval"] == 0:
                loss_value = loss.item()  # the last micro-batch's; it waits for the GPU, so only now and then
                # every process learns whether any loss is not finite (and any signal), and all stop together
                if not stop.agree(loss_value):
                    seen = loss_value if not math.isfinite(loss_value) else "not finite on another process"
                    raise UserError(f"loss is {seen} at step {step}: {diverged}")
                tok_s = speed.measure(step)  # over the interval; None for the first, which compiles
            if step % cfg["log_interval"] == 0 and master:
                postfix = dict(loss=f"{loss_value:.4f}", lr=f"{get_lr(step, cfg):.2e}")
                if tok_s is not None:
                    postfix["tok_s"] = f"{tok_s:,.0f}"
                    mfu = runtime.mfu(model, tok_s / world, device)  # each device does its share, at its own peak
                    if mfu is not None:
                        postfix["mfu"] = f"{100 * mfu:.1f}%"
                bar.set_postfix(postfix, refresh=False)
                row.update(loss=loss_value, lr=get_lr(step, cfg))  # AdamW's LR; Muon's is muon_lr / learning_rate x it
            log.row(step, row)
    if master:
        plot_losses(cfg["out_dir"])
        # the last line: what the run made, and what to run next
        sample_it = "python sample.py" + ("" if cfg["out_dir"] == PATHS["out_dir"] else
                                          f" --out_dir={shlex.quote(cfg['out_dir'])}")
        print(f"saved {checkpoint.describe(dict(step=step, bits_per_byte=bits_per_byte), ckpt_path)} and best.pt; "
              f"next: {sample_it}")
    return dict(best_val_loss=best_val, model=model)


# -----------------------------------------------------------------------------
# What the loop calls: the batches, the optimizers, the learning rate, the loss estimate, one step


def get_batch(data, batch_size, block_size, generator, device):
    """x: batch_size random windows of block_size tokens; y: the same windows shifted by one token."""
    # one draw per row: a step's windows are then the same however it is split into micro-batches
    starts = [int(torch.randint(data.num_tokens - block_size, (1,), generator=generator)) for _ in range(batch_size)]
    tokens = data.tokens()
    windows = torch.from_numpy(np.stack([tokens[i:i + block_size + 1] for i in starts]).astype(np.int64))
    x, y = windows[:, :-1], windows[:, 1:]
    if device.type == "cuda":  # pinned memory lets the copy run alongside the GPU's work
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.contiguous().to(device), y.contiguous().to(device)


def make_optimizers(model, cfg, device, dtype="float32"):
    """AdamW for everything, or (the default) Muon for the blocks' weight matrices and AdamW for the rest: the
    embeddings and the head tied to one, which are not linear maps of the hidden state, and the 1-D gains. Muon
    orthogonalizes in bf16 when the step runs in bf16 (dtype): 1.8x the default model's CPU step."""
    named = dict(model.named_parameters())  # the head is tied to wte: listed once, as wte
    # Muon's, by name: the blocks' weight matrices; c_attn holds three, the query, key and value maps stacked
    muon = [n for n, p in named.items() if cfg["optimizer"] == "muon" and n.startswith("h.") and p.dim() == 2]
    rest = [p for n, p in named.items() if n not in muon]
    # AdamW decays its matrices and embeddings only: pulling gains or biases towards zero regularises nothing
    groups = [dict(params=[p for p in rest if p.dim() >= 2], weight_decay=cfg["weight_decay"]),
              dict(params=[p for p in rest if p.dim() < 2], weight_decay=0.0)]
    optimizers = [torch.optim.AdamW(groups, lr=cfg["learning_rate"], betas=(cfg["beta1"], cfg["beta2"]),
                                    fused=device.type in ("cuda", "cpu"))]
    if muon:
        qkv = [named[n] for n in muon if n.endswith("c_attn.weight")]
        matrices = [named[n] for n in muon if not n.endswith("c_attn.weight")]
        optimizers.append(Muon([dict(params=qkv, split=3), dict(params=matrices)], lr=cfg["muon_lr"],
                               weight_decay=cfg["muon_weight_decay"],
                               ns_dtype=torch.bfloat16 if dtype == "bfloat16" else torch.float32))
    return optimizers


def get_lr(step, cfg):
    """Linear warmup to learning_rate, then a cosine down to min_lr at lr_decay_iters, then min_lr."""
    warmup = cfg["warmup_iters"] if cfg["warmup_iters"] >= 0 else round(0.02 * cfg["max_iters"])  # -1: 2%
    decay = max(cfg["lr_decay_iters"] if cfg["lr_decay_iters"] >= 0 else cfg["max_iters"], warmup + 1)
    if step < warmup:
        return cfg["learning_rate"] * (step + 1) / (warmup + 1)
    if step >= decay:
        return cfg["min_lr"]
    progress = (step - warmup) / (decay - warmup)
    return cfg["min_lr"] + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg["learning_rate"] - cfg["min_lr"])


def set_lr(optimizers, step, cfg):
    """Every group's LR at this step: its optimizer's peak (muon_lr, learning_rate) scaled as get_lr says. Muon's
    momentum rises from 0.85 to 0.95 over momentum_warmup steps (modded-nanogpt)."""
    scale = get_lr(step, cfg) / cfg["learning_rate"]
    for optimizer in optimizers:
        muon = isinstance(optimizer, Muon)
        for group in optimizer.param_groups:
            group["lr"] = (cfg["muon_lr"] if muon else cfg["learning_rate"]) * scale
            if muon:
                warmup = cfg["momentum_warmup"]
                group["momentum"] = (0.85 + 0.10 * min(step / warmup, 1)) if warmup else 0.95


@torch.no_grad()
def estimate_loss(model, bins, cfg, eval_iters, ctx, device, rank=0, world=1):
    """Mean loss over eval_iters random batches of each split, the same batches at every evaluation. Under DDP each
    process scores batches of its own, and the figures are the mean over all of them: world x eval_iters batches."""
    model.eval()
    generator = torch.Generator().manual_seed(cfg["seed"] + rank)
    means = []
    for data in bins.values():
        losses = torch.zeros(eval_iters)
        for k in range(eval_iters):
            x, y = get_batch(data, cfg["batch_size"], cfg["block_size"], generator, device)
            with ctx:
                losses[k] = model(x, y, return_logits=False)[1].item()
        means.append(losses.mean().item())
    model.train()
    return dict(zip(bins, runtime.mean_over_processes(means, world, device)))


def train_step(model, optimizers, scaler, data, generator, cfg, ctx, device):
    """One optimizer step: gradient_accumulation_steps micro-batches, their gradients summed, then each optimizer's
    step. Returns the last micro-batch's loss."""
    grad_accum = cfg["gradient_accumulation_steps"]
    for micro in range(grad_accum):
        x, y = get_batch(data, cfg["batch_size"], cfg["block_size"], generator, device)
        # under DDP the gradients are averaged over the processes once, after the last micro-batch
        sync = micro == grad_accum - 1 or not hasattr(model, "no_sync")
        with (nullcontext() if sync else model.no_sync()), ctx:
            _, loss = model(x, y, return_logits=False)
        # each loss is its micro-batch's mean: divided by their number, the summed gradients are the mean over the
        # whole step, as one big batch would give
        scaler.scale(loss / grad_accum).backward()
    # every gradient, clipped together; it bounds AdamW's steps after a spike (Muon's update has a fixed size anyway)
    if cfg["grad_clip"] > 0:
        for optimizer in optimizers:
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
    for optimizer in optimizers:
        scaler.step(optimizer)
    scaler.update()
    model.zero_grad(set_to_none=True)
    return loss


def main(argv):
    cfg, chosen = get_config(argv, SCRIPTS["train.py"], "train.py")
    with runtime.errors_as_one_line(cfg):
        if cfg["eval_only"]:
            from evaluate import evaluate
            evaluate(cfg, chosen)
        else:
            train(cfg, chosen)


if __name__ == "__main__":
    main(sys.argv[1:])
