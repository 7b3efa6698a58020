"""
Train the GPT on the bins that prepare.py wrote.

    python train.py                                   # one GPU (or CPU, slowly), the default model
    python train.py --preset=cpu                      # sized for a 2-core laptop: about 10 minutes
    python train.py --init_from=resume                # continue from out_dir/ckpt.pt
    python train.py --init_from=resume --eval_only=True   # score ckpt.pt on the whole validation split
    torchrun --standalone --nproc_per_node=8 train.py # DDP on 8 GPUs (gloo when on CPU)
"""
import datetime
import json
import math
import os
import random
import signal
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from config import UserError, check_config, get_config, model as model_keys, parse_args, paths, system, train as train_keys
from model import GPT, GPTConfig, autocast_context, load_checkpoint, model_from_checkpoint, pick_device

MODEL_KEYS = tuple(model_keys)
RUN_KEYS = ("init_from", "eval_only", "checkpoint", "out_dir")  # what this command does, not the run's settings


# -----------------------------------------------------------------------------
# Data: random windows of the token bins


class Bin:
    """A token bin opened once; windows are read with pread, so nothing is remapped per batch and memory
    stays flat however long the run (a memmap would keep every page it touched resident)."""

    def __init__(self, path, expected_tokens):
        if not os.path.isfile(path):
            raise UserError(f"{path} not found: run prepare.py first (python prepare.py --data_dir={os.path.dirname(path)})")
        size = os.path.getsize(path)
        if size != 2 * expected_tokens:
            raise UserError(f"{path} holds {size} bytes but meta.json says {expected_tokens} uint16 tokens: "
                             f"a truncated or foreign file; run prepare.py again")
        self.fd = os.open(path, os.O_RDONLY)
        self.num_tokens = expected_tokens

    def read(self, start, count):
        """Tokens [start, start + count) as int64."""
        buf = os.pread(self.fd, 2 * count, 2 * start)
        return torch.from_numpy(np.frombuffer(buf, dtype="<u2").astype(np.int64))


def load_bins(data_dir, vocab_size, block_size):
    """train and validation Bins, after checking them against meta.json and the model."""
    try:
        with open(os.path.join(data_dir, "meta.json")) as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise UserError(f"no prepared data in {data_dir}/: run prepare.py first (python prepare.py --data_dir={data_dir})")
    except ValueError:
        raise UserError(f"{data_dir}/meta.json is corrupt: run prepare.py again")
    if not meta.get("complete"):
        raise UserError(f"{data_dir}/ holds an unfinished prepare.py run: run prepare.py again")
    if meta["vocab_size"] != vocab_size:
        raise UserError(f"the bins in {data_dir}/ use a {meta['vocab_size']}-token vocabulary but the model "
                         f"has vocab_size={vocab_size}")
    bins = {}
    for split in ("train", "validation"):
        bins[split] = Bin(os.path.join(data_dir, f"{split}.bin"), meta["splits"][split]["tokens"])
        if bins[split].num_tokens <= block_size:
            raise UserError(f"{split}.bin holds {bins[split].num_tokens} tokens, not more than block_size="
                             f"{block_size}: use a smaller --block_size or more data")
    return bins, meta


def get_batch(data, batch_size, block_size, generator, device):
    """x: batch_size random windows of block_size tokens; y: the same windows shifted by one token."""
    # one draw per row: a step's windows are then the same however it is split into micro-batches
    starts = [int(torch.randint(data.num_tokens - block_size, (1,), generator=generator)) for _ in range(batch_size)]
    windows = torch.stack([data.read(i, block_size + 1) for i in starts])
    x, y = windows[:, :-1], windows[:, 1:]
    if device.type == "cuda":  # pinned memory lets the copy run alongside the GPU's work
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.contiguous().to(device), y.contiguous().to(device)


# -----------------------------------------------------------------------------
# Optimisation


def get_lr(step, cfg):
    """Linear warmup to learning_rate, then a cosine down to min_lr at lr_decay_iters, then min_lr."""
    warmup, decay = schedule_lengths(cfg)
    if step < warmup:
        return cfg["learning_rate"] * (step + 1) / (warmup + 1)
    if step >= decay:
        return cfg["min_lr"]
    progress = (step - warmup) / (decay - warmup)
    return cfg["min_lr"] + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg["learning_rate"] - cfg["min_lr"])


def schedule_lengths(cfg):
    """(warmup_iters, lr_decay_iters); -1 means: follow max_iters, so any run length gets a whole schedule."""
    warmup = cfg["warmup_iters"] if cfg["warmup_iters"] >= 0 else round(0.02 * cfg["max_iters"])
    decay = cfg["lr_decay_iters"] if cfg["lr_decay_iters"] >= 0 else cfg["max_iters"]
    return warmup, max(decay, warmup + 1)


def make_optimizers(model, cfg, device):
    """The optimizers of one training step: AdamW, and Muon unless --optimizer=adamw."""
    params = [p for p in model.parameters() if p.requires_grad]
    # Muon for the blocks' weight matrices; AdamW for what is not a linear map of the hidden state (the
    # embeddings, the head tied to one of them) and for the 1-D gains and biases
    matrices = [p for p in model.h.parameters() if p.dim() == 2] if cfg["optimizer"] == "muon" else []
    in_muon = {id(p) for p in matrices}
    rest = [p for p in params if id(p) not in in_muon]
    # decay AdamW's matrices and embeddings only (Muon's matrices get none): shrinking norms' gains or biases
    # towards zero is a constraint with no regularising benefit
    groups = [dict(params=[p for p in rest if p.dim() >= 2], weight_decay=cfg["weight_decay"]),
              dict(params=[p for p in rest if p.dim() < 2], weight_decay=0.0)]
    optimizers = [torch.optim.AdamW(groups, lr=cfg["learning_rate"], betas=(cfg["beta1"], cfg["beta2"]),
                                    fused=device.type in ("cuda", "cpu"))]
    if matrices:
        optimizers.append(Muon(matrices, lr=cfg["muon_lr"]))
    return optimizers


def set_lr(optimizers, step, cfg):
    """The LR of every group at this step: Muon's peak muon_lr and the others' learning_rate, both scaled by the
    schedule get_lr draws for learning_rate. From cfg, not the optimizer's state: a resumed run may change them."""
    scale = get_lr(step, cfg) / cfg["learning_rate"]
    for optimizer in optimizers:
        peak = cfg["muon_lr"] if isinstance(optimizer, Muon) else cfg["learning_rate"]
        for group in optimizer.param_groups:
            group["lr"] = peak * scale


class Muon(torch.optim.Optimizer):
    """
    Muon (Keller Jordan, 2024, https://kellerjordan.github.io/posts/muon/), as in modded-nanogpt and nanochat:
    SGD with Nesterov momentum whose update of each weight matrix is replaced by the nearest semi-orthogonal
    matrix (U V^T, for the update's SVD U S V^T). Every direction of the matrix then moves at the same rate,
    where the raw gradient is dominated by a few. Only for the 2-D weights inside the blocks. Measured gain: at the
    cpu preset's budget, 4.341 -> 3.484 validation nats/token against AdamW alone (bench.py quality, row +muon).
    """

    def __init__(self, params, lr, momentum=0.95):
        super().__init__(params, dict(lr=lr, momentum=momentum))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - group["momentum"])
                update = p.grad.lerp(buf, group["momentum"])  # Nesterov: the momentum one step ahead
                rows, cols = p.shape
                if rows == 3 * cols:  # c_attn holds the query, key and value maps: three matrices
                    update = orthogonalize(update.view(3, cols, cols)).view_as(p)
                else:  # a tall matrix's orthogonal update has smaller entries: scale it back up
                    update = orthogonalize(update) * max(1, rows / cols) ** 0.5
                p.add_(update, alpha=-group["lr"])


def orthogonalize(G, steps=5):
    """
    About U V^T for G = U S V^T (also for a batch of matrices): the quintic Newton-Schulz iteration of
    modded-nanogpt, whose coefficients push every singular value into roughly [0.7, 1.2] in five steps, which
    is as good as exact for an update and far cheaper than an SVD.
    """
    a, b, c = 3.4445, -4.7750, 2.0315
    wide = G.size(-2) <= G.size(-1)
    X = G if wide else G.mT  # iterate on the small Gram matrix X X^T
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # every singular value <= 1
    for _ in range(steps):
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return X if wide else X.mT


@torch.no_grad()
def estimate_loss(model, bins, cfg, ctx, device):
    """Mean loss over eval_iters random batches of each split, the same batches at every evaluation."""
    model.eval()
    generator = torch.Generator().manual_seed(cfg["seed"])
    out = {}
    for split, data in bins.items():
        losses = torch.zeros(cfg["eval_iters"])
        for k in range(cfg["eval_iters"]):
            x, y = get_batch(data, cfg["batch_size"], cfg["block_size"], generator, device)
            with ctx:
                losses[k] = model(x, y)[1].item()
        out[split] = losses.mean().item()
    model.train()
    return out


@torch.no_grad()
def evaluate_split(model, data, num_bytes, block_size, batch_size, ctx, device):
    """Every token of `data` scored once, in non-overlapping windows: (nats/token, perplexity, bits/byte)."""
    model.eval()
    total_nats, total_tokens = 0.0, 0
    starts = list(range(0, data.num_tokens - 1, block_size))
    for i in tqdm(range(0, len(starts), batch_size), desc="evaluating", unit="batch", dynamic_ncols=True):
        windows = [data.read(s, min(block_size + 1, data.num_tokens - s)) for s in starts[i:i + batch_size]]
        # the last window may be short: score it on its own
        groups = [windows] if len(windows[-1]) == len(windows[0]) else [windows[:-1], windows[-1:]]
        for group in groups:
            if not group:
                continue
            w = torch.stack(group).to(device)
            with ctx:
                logits, _ = model(w[:, :-1])
            nats = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), w[:, 1:].flatten(), reduction="sum")
            total_nats += nats.item()
            total_tokens += w[:, 1:].numel()
    loss = total_nats / total_tokens
    return loss, math.exp(loss), total_nats / math.log(2) / num_bytes


# -----------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(path, state):
    """Write to a temporary file, flush it to disk, then rename: a crash leaves the old file or the new one."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException as e:  # a full disk, say: drop the partial file, keep the old one
        if os.path.exists(tmp):
            os.remove(tmp)
        # torch.save reports a failed write (ENOSPC, EFBIG) as a RuntimeError raised while handling the OSError
        error = e if isinstance(e, OSError) else e.__context__
        if isinstance(error, OSError):
            raise OSError(error.errno, error.strerror, path) from None
        raise
    os.replace(tmp, path)


def rng_state():
    np_state = np.random.get_state()
    return dict(python=random.getstate(), numpy=(np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
                torch=torch.get_rng_state(), cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])


def set_rng_state(state):
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -----------------------------------------------------------------------------
# Set-up: DDP


def setup_ddp(cfg):
    """(rank, world size, local rank); DDP when torchrun started us (it sets RANK)."""
    if "RANK" not in os.environ:
        return 0, 1, 0
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    backend = "nccl" if torch.cuda.is_available() and cfg["device"] in ("auto", "cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local)
    # a rank that dies must not leave the others waiting forever
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=120))
    return rank, world, local


# -----------------------------------------------------------------------------
# Training


def open_log(out_dir, start_step):
    """log.jsonl, to append to. A resumed run drops the rows past its checkpoint first (a crash leaves some,
    and those steps are about to run again); a run from scratch starts a new log."""
    path = os.path.join(out_dir, "log.jsonl")
    if start_step == 0 or not os.path.exists(path):
        return open(path, "w")
    with open(path) as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= start_step:
                kept.append(line)
        except (ValueError, KeyError):  # a line cut short by a kill
            pass
    if kept != lines:
        with open(path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(path + ".tmp", path)
    return open(path, "a")


def write_log(log, **row):
    if log is not None:
        log.write(json.dumps(row) + "\n")
        log.flush()


def plot_losses(out_dir):
    """log.jsonl -> loss.png; matplotlib is optional."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the loss curve (pip install matplotlib)")
        return
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("loss", "train (batch)"), ("train_loss", "train (eval)"), ("val_loss", "validation")):
        points = [(r["tokens"], r[key]) for r in rows if key in r]
        if points:
            ax.plot(*zip(*points), label=label, marker="o" if key != "loss" else None, linewidth=1)
    ax.set(xlabel="tokens seen", ylabel="cross-entropy loss (nats)", title=f"{out_dir}: loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "loss.png"), dpi=120)
    plt.close(fig)


class StopRequest:
    """Within `with StopRequest() as stop:`, Ctrl-C or SIGTERM only sets stop.signal: the loop then finishes
    its step, saves, and exits. A second signal aborts at once."""

    def __enter__(self):
        self.signal = None
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def handle(self, signum, frame):
        if self.signal is not None:  # asked twice: stop right now, without saving
            raise KeyboardInterrupt
        self.signal = signum


CPU_EVAL_ITERS = 5  # on a CPU, batches per split for each evaluation unless --eval_iters says otherwise


def cpu_note(model, cfg, tokens_per_iter, explicit):
    """What the run will cost on this CPU: the model's FLOPs at the rate of a head-shaped matmul, timed now."""
    a, b = torch.randn(256, model.config.n_embd), torch.randn(model.config.n_embd, model.config.padded_vocab_size)
    a @ b  # warm-up
    start = time.perf_counter()
    for _ in range(2):
        a @ b
    flops_per_second = 2 * 2 * a.size(0) * a.size(1) * b.size(1) / (time.perf_counter() - start)
    step = model.flops_per_token() * tokens_per_iter / flops_per_second
    evaluation = step / 3 * 2 * cfg["eval_iters"] * cfg["batch_size"] * cfg["block_size"] / tokens_per_iter
    # an estimate: within 5% for the default model here, about 2x high for narrow ones (their backward matmuls
    # run faster than the head-shaped probe)
    note = (f"note: this CPU does about {flops_per_second / 1e9:.0f} GFLOP/s, so a step takes about {duration(step)}, "
            f"max_iters={cfg['max_iters']} about {duration(step * cfg['max_iters'])}, and each evaluation "
            f"(eval_iters={cfg['eval_iters']}{'' if 'eval_iters' in explicit else ', the CPU default'}) about "
            f"{duration(evaluation)}")
    if step * cfg["max_iters"] > 3600 and not cfg["preset"]:
        note += "; --preset=cpu trains a smaller model in about 10 minutes"
    return note


def duration(seconds):
    return f"{seconds:.1f} s" if seconds < 60 else f"{seconds / 60:.0f} min" if seconds < 3600 else f"{seconds / 3600:.1f} hours"


def wants_compile(cfg, device, explicit):
    """torch.compile by default on CUDA only. On a CPU the eager step with the fused loss is as fast (bench.py
    train) and starts at once, where compiling takes a minute, so there it compiles only when asked: --compile=True."""
    return cfg["compile"] and (device.type == "cuda" or "compile" in explicit)


# Dense bf16 peak FLOP/s by device type, for the MFU in the progress bar: an H100 SXM's 989 TFLOP/s (an A100
# has 312e12: edit for yours). The tests add a CPU entry, so that the figure is computed in CI too.
PEAK_FLOPS = {"cuda": 989e12}


def train_step(model, optimizers, scaler, data, generator, grad_accum, cfg, ctx, device):
    """One optimizer step over grad_accum micro-batches; returns the last micro-batch's loss."""
    for micro in range(grad_accum):
        x, y = get_batch(data, cfg["batch_size"], cfg["block_size"], generator, device)
        last_micro = micro == grad_accum - 1
        with (model.no_sync() if hasattr(model, "no_sync") and not last_micro else nullcontext()):
            with ctx:  # DDP all-reduces the gradients once, after the last micro-batch
                _, loss = model(x, y)
            # the loss is a mean over its micro-batch; dividing by the count makes the summed
            # gradients the mean over the whole step, as one big batch would give
            scaler.scale(loss / grad_accum).backward()
    if cfg["grad_clip"] > 0:
        for optimizer in optimizers:
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
    for optimizer in optimizers:
        scaler.step(optimizer)
    scaler.update()
    model.zero_grad(set_to_none=True)
    return loss


def train(cfg, explicit=()):
    """Train (or resume, or with eval_only just evaluate) as cfg says; returns a summary dict.
    `explicit` names the keys the user set: on resume they replace the checkpoint's settings, but may not change
    the model's shape."""
    rank, world, local = setup_ddp(cfg)
    master = rank == 0
    device = pick_device(cfg["device"])
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local)
    out_dir = cfg["out_dir"]
    ckpt_path = os.path.join(out_dir, "ckpt.pt")

    ckpt = None
    if cfg["init_from"] == "resume":
        path = os.path.join(out_dir, cfg["checkpoint"]) if cfg["eval_only"] else ckpt_path
        ckpt = load_checkpoint(path)
        for k in MODEL_KEYS:
            if k in explicit and cfg[k] != ckpt["config"][k]:
                raise UserError(f"{path} was trained with {k}={ckpt['config'][k]!r}, not --{k}={cfg[k]!r}: "
                                 f"the model shape cannot change on resume")
        # a resumed run goes on with the settings it was started with; only the keys given now change
        saved = {k: v for k, v in ckpt["config"].items() if k in cfg and k not in explicit and k not in RUN_KEYS}
        cfg = {**cfg, **saved, **{k: ckpt["config"][k] for k in MODEL_KEYS}}
    check_config(cfg)  # also what a resumed run takes from its checkpoint, with the flags given now
    if ckpt is not None and not cfg["eval_only"] and ckpt["step"] >= cfg["max_iters"]:
            if master:
                print(f"{path} is already complete at step {ckpt['step']} (max_iters={cfg['max_iters']}): "
                      f"nothing to do. To train longer: python train.py --init_from=resume --max_iters=M")
            if world > 1:
                dist.destroy_process_group()
            return dict(best_val_loss=ckpt["best_val_loss"], model=None)
    if cfg["gradient_accumulation_steps"] % world:
        raise UserError(f"gradient_accumulation_steps={cfg['gradient_accumulation_steps']} is not a multiple "
                         f"of the {world} DDP processes")

    bins, meta = load_bins(cfg["data_dir"], cfg["vocab_size"], cfg["block_size"])
    torch.manual_seed(cfg["seed"] + rank)
    ctx, dtype = autocast_context(device, cfg["dtype"])
    if ckpt is not None:
        model = model_from_checkpoint(ckpt, path)
    else:
        model = GPT(GPTConfig(**{k: cfg[k] for k in MODEL_KEYS}))
    compiling = wants_compile(cfg, device, explicit)
    # the fused loss is a big win for an eager step on a CPU; a compiled model keeps the plain loss, as on a GPU
    model.fused_loss = device.type == "cpu" and not compiling
    model.to(device)

    if cfg["eval_only"]:
        v = meta["splits"]["validation"]
        # small batches: the full logits of a batch (batch x block_size x 50K floats) are held at once
        loss, ppl, bpb = evaluate_split(model, bins["validation"], v["bytes"], cfg["block_size"],
                                        min(cfg["batch_size"], 16), ctx, device)
        print(f"validation ({v['tokens']:,} tokens, {v['bytes']:,} bytes): loss {loss:.4f} nats/token | "
              f"perplexity {ppl:.3f} | {bpb:.4f} bits/byte")
        return dict(loss=loss, perplexity=ppl, bits_per_byte=bpb)

    n_params, n_total = model.num_params()
    grad_accum = cfg["gradient_accumulation_steps"] // world
    tokens_per_iter = grad_accum * world * cfg["batch_size"] * cfg["block_size"]
    if master:
        print(f"model: {n_params / 1e6:.2f}M parameters besides the token and position embeddings, "
              f"{n_total / 1e6:.2f}M in all (the head is tied to the token embedding)")
        print(f"tokens per step: {tokens_per_iter:,} = {grad_accum} accumulation x {world} processes x "
              f"{cfg['batch_size']} batch x {cfg['block_size']} tokens; on {device} in {dtype}")
    if device.type == "cpu":
        # A CPU may need hours where a GPU needs minutes: say so before the first evaluation, and keep that
        # evaluation short unless the user asked for a length.
        if "eval_iters" not in explicit:
            cfg = {**cfg, "eval_iters": min(cfg["eval_iters"], CPU_EVAL_ITERS)}
        if master:
            print(cpu_note(model, cfg, tokens_per_iter, explicit))

    optimizers = make_optimizers(model, cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == "float16")  # bf16 and fp32 need no loss scaling
    generator = torch.Generator().manual_seed(cfg["seed"] + rank)  # batches: resumable, unlike the global RNG
    start_step, best_val = 0, float("inf")
    if ckpt is not None:
        try:
            for optimizer, state in zip(optimizers, ckpt["optimizer"], strict=True):
                optimizer.load_state_dict(state)
        except (ValueError, KeyError, TypeError):
            raise UserError(f"{ckpt_path}: its optimizer state does not fit --optimizer={cfg['optimizer']} or this "
                            f"version of train.py; start from scratch")
        start_step, best_val = ckpt["step"], ckpt["best_val_loss"]
        set_rng_state(ckpt["rng"])
        generator.set_state(ckpt["batch_rng"][rank])
        if master:
            print(f"resuming from {ckpt_path} at step {start_step}")
    del ckpt
    raw_model = model  # saved and evaluated without the compile and DDP wrappers
    if compiling:
        if master and device.type != "cuda":
            print(f"compiling the model for {device.type}, as asked (--compile=True): the first step waits a minute "
                  f"or so for the compiler, and the steps use the plain loss (bench.py train compares)")
        model = torch.compile(model, dynamic=False)  # the shapes never change: one graph, never recompiled
    if world > 1:
        model = DDP(model, device_ids=[local] if device.type == "cuda" else None)

    def checkpoint(step, best_val):
        """Everything needed to continue exactly from `step`; the batch RNG of every rank."""
        states = [generator.get_state()]
        if world > 1:
            states = [None] * world
            dist.all_gather_object(states, generator.get_state())
        if master:
            save_checkpoint(ckpt_path, dict(model=raw_model.state_dict(), optimizer=[o.state_dict() for o in optimizers],
                                            step=step, best_val_loss=best_val, config=cfg, rng=rng_state(),
                                            batch_rng=states))

    os.makedirs(out_dir, exist_ok=True)
    log_file = open_log(out_dir, start_step) if master else nullcontext()  # rank 0 writes
    max_iters = cfg["max_iters"]
    # the bar is closed on the way out, whatever happens: an error line then starts on a line of its own
    bar = tqdm(total=max_iters, initial=start_step, unit="step", dynamic_ncols=True, disable=not master)
    with StopRequest() as stop, log_file as log, bar:
        t0 = time.time()
        diverged = f"training diverged; {ckpt_path} still holds the last good state (try a lower --learning_rate)"
        # log.jsonl holds one row per step it mentions. Step s's row (the loss of the step that ended at s, the
        # evaluation at s) is written before the checkpoint at s, so a resumed run never writes it again.
        row = {}
        for step in range(start_step, max_iters + 1):
            last_step = step == max_iters
            # evaluate and save at every eval_interval and at the end; not again at the step just resumed from
            evaluate = last_step or (step % cfg["eval_interval"] == 0 and (step == 0 or step > start_step))
            if evaluate:
                losses = estimate_loss(raw_model, bins, cfg, ctx, device)
                if not math.isfinite(losses["validation"]):
                    raise UserError(f"validation loss is {losses['validation']} at step {step}: {diverged}")
                if master:
                    bar.write(f"step {step}: train loss {losses['train']:.4f}, val loss {losses['validation']:.4f}")
                row.update(train_loss=losses["train"], val_loss=losses["validation"])
            if row and master:
                write_log(log, step=step, tokens=step * tokens_per_iter, **row, elapsed=time.time() - t0)
            row = {}
            if evaluate:
                if master and losses["validation"] < best_val:
                    best_val = losses["validation"]
                    save_checkpoint(os.path.join(cfg["out_dir"], "best.pt"),
                                    dict(model=raw_model.state_dict(), config=cfg, step=step, val_loss=best_val))
                checkpoint(step, best_val)
            if last_step:
                break
            if stop.signal is not None:
                checkpoint(step, best_val)
                bar.close()  # before the message, which should be the last line
                if master:
                    print(f"stopped by {signal.Signals(stop.signal).name} at step {step}: saved {ckpt_path}; "
                          f"continue with --init_from=resume", file=sys.stderr)
                sys.exit(128 + stop.signal)  # the shell's convention for "ended by this signal"

            lr = get_lr(step, cfg)
            set_lr(optimizers, step, cfg)
            step_start = time.time()
            loss = train_step(model, optimizers, scaler, bins["train"], generator, grad_accum, cfg, ctx, device)
            bar.update(1)

            if step % cfg["log_interval"] == 0 and master:
                loss_value = loss.item()  # waits for the GPU: so only every log_interval steps
                if not math.isfinite(loss_value):
                    raise UserError(f"loss is {loss_value} at step {step}: {diverged}")
                tok_s = tokens_per_iter / (time.time() - step_start)
                postfix = dict(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}")
                if PEAK_FLOPS.get(device.type):
                    postfix["mfu"] = f"{100 * raw_model.estimate_mfu(tok_s, PEAK_FLOPS[device.type]):.1f}%"
                bar.set_postfix(postfix, refresh=False)
                row = dict(loss=loss_value, lr=lr)  # logged as step + 1, where this step ends
    if master:
        plot_losses(out_dir)
    if world > 1:
        dist.destroy_process_group()
    return dict(best_val_loss=best_val, model=raw_model)


def main(argv):
    groups = [paths, system, model_keys, train_keys]
    cfg = get_config(argv, groups, "train.py")
    explicit = set(parse_args(argv, cfg, "train.py"))
    try:
        train(cfg, explicit)
    except UserError as e:
        sys.exit(f"error: {e}")
    except OSError as e:  # e.g. a full disk while saving: the previous checkpoint is still in place
        sys.exit(f"error: {e.strerror or e} ({e.filename}); files already in {cfg['out_dir']} are untouched")
    except (torch.OutOfMemoryError, MemoryError):
        sys.exit(f"error: batch_size={cfg['batch_size']} does not fit in memory: lower --batch_size and raise "
                 f"--gradient_accumulation_steps to keep the tokens per step")
    except RuntimeError as e:  # after OutOfMemoryError, which is one
        if not (dist.is_initialized() and dist.get_world_size() > 1):
            raise
        # a peer that died (kill, OOM, lost node) surfaces here as a failed collective: stop, do not hang
        reason = str(e).strip().splitlines()[0][:300]
        sys.exit(f"error: DDP rank {dist.get_rank()} stopped, most likely because another process died (its log "
                 f"says why): {reason}; continue with --init_from=resume")


if __name__ == "__main__":
    main(sys.argv[1:])
