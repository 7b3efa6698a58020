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
import shutil
import signal
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from config import MODEL, SCRIPTS, UserError, check_config, get_config
from model import CHECKPOINT_VERSION, GPT, GPTConfig, autocast_context, load_checkpoint, model_from_checkpoint, pick_device
from prepare import META_VERSION

RUN_KEYS = ("init_from", "eval_only", "checkpoint", "out_dir")  # what this command does, not the run's settings


# -----------------------------------------------------------------------------
# Data: random windows of the token bins


class Bin:
    """A token bin, checked against meta.json. Windows are read through a memmap made anew for each batch: a
    memmap kept for the whole run would keep every page it touched resident
    (https://stackoverflow.com/questions/45132940/numpy-memmap-memory-usage-want-to-iterate-once/61472122#61472122)."""

    def __init__(self, path, expected_tokens):
        if not os.path.isfile(path):
            raise UserError(f"{path} not found: run prepare.py first (python prepare.py --data_dir={os.path.dirname(path)})")
        size = os.path.getsize(path)
        if size != 2 * expected_tokens:
            raise UserError(f"{path} holds {size} bytes but meta.json says {expected_tokens} uint16 tokens: "
                             f"a truncated or foreign file; run prepare.py again")
        self.path, self.num_tokens = path, expected_tokens

    def tokens(self):
        return np.memmap(self.path, dtype="<u2", mode="r")

    def read(self, start, count):
        """Tokens [start, start + count) as int64."""
        return torch.from_numpy(self.tokens()[start:start + count].astype(np.int64))


def load_bins(data_dir, block_size):
    """train and validation Bins, after checking them against meta.json and the model."""
    try:
        with open(os.path.join(data_dir, "meta.json")) as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise UserError(f"no prepared data in {data_dir}/: run prepare.py first (python prepare.py --data_dir={data_dir})")
    except ValueError:
        raise UserError(f"{data_dir}/meta.json is corrupt: run prepare.py again")
    if meta.get("version") != META_VERSION:  # before the compact vocabulary: no "vocab" to give the checkpoints
        raise UserError(f"{data_dir}/ was prepared by an older prepare.py (meta.json version {meta.get('version')}, "
                        f"this one reads {META_VERSION}): run prepare.py again")
    if not meta.get("complete"):
        raise UserError(f"{data_dir}/ holds an unfinished prepare.py run: run prepare.py again")
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
    tokens = data.tokens()
    windows = torch.from_numpy(np.stack([tokens[i:i + block_size + 1] for i in starts]).astype(np.int64))
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
        optimizers.append(Muon(matrices, lr=cfg["muon_lr"], weight_decay=cfg["muon_weight_decay"]))
    return optimizers


def set_lr(optimizers, step, cfg):
    """The LR of every group at this step: Muon's peak muon_lr and the others' learning_rate, both scaled by the
    schedule get_lr draws for learning_rate. From cfg, not the optimizer's state: a resumed run may change them."""
    scale = get_lr(step, cfg) / cfg["learning_rate"]
    for optimizer in optimizers:
        peak = cfg["muon_lr"] if isinstance(optimizer, Muon) else cfg["learning_rate"]
        for group in optimizer.param_groups:
            group["lr"] = peak * scale
            if isinstance(optimizer, Muon):  # Muon's momentum rises from 0.85 to 0.95 (modded-nanogpt)
                warmup = cfg["momentum_warmup"]
                group["momentum"] = 0.85 + 0.10 * min(step / warmup, 1) if warmup else 0.95


def load_optimizer_state(optimizers, states):
    """The checkpoint's moments and step counts, with this run's settings (weight decay, betas): load_state_dict
    would bring back the saved ones too, and a flag given on resume would silently do nothing."""
    for optimizer, state in zip(optimizers, states, strict=True):
        settings = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
        optimizer.load_state_dict(state)
        for group, ours in zip(optimizer.param_groups, settings, strict=True):
            group.update(ours)


class Muon(torch.optim.Optimizer):
    """
    Muon (Keller Jordan, 2024, https://kellerjordan.github.io/posts/muon/), as in modded-nanogpt and nanochat:
    SGD with Nesterov momentum whose update of each weight matrix is replaced by the nearest semi-orthogonal
    matrix (U V^T, for the update's SVD U S V^T). Every direction of the matrix then moves at the same rate,
    where the raw gradient is dominated by a few. Only for the 2-D weights inside the blocks; against AdamW alone
    see RESULTS.md.
    """

    def __init__(self, params, lr, momentum=0.95, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

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
                p.mul_(1 - group["lr"] * group["weight_decay"])  # decoupled, as AdamW's
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


def rng_state(device):
    """This process's torch RNG (dropout, initialisation): on its GPU too."""
    return dict(cpu=torch.get_rng_state(), cuda=torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def set_rng_state(state, device):
    torch.set_rng_state(state["cpu"])
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


# -----------------------------------------------------------------------------
# The run's settings, and this process's set-up


def run_settings(cfg, chosen, ckpt, path):
    """
    The settings of the run and the keys the user chose (by flag or preset). A new run has cfg: the defaults,
    then the preset, then the flags. A resumed run goes on with the settings it was started with: the checkpoint's
    replace the defaults, and only what is chosen now replaces those; the model's shape cannot change. What the
    machine picks for one process (evaluations kept short on a CPU, compiling or not) is never a setting: see
    cpu_eval_iters and wants_compile, which read `chosen`, so a run resumed elsewhere picks again.
    """
    if ckpt is None:
        return cfg, set(chosen)
    for k in MODEL:
        if k in chosen and cfg[k] != ckpt["config"][k]:
            raise UserError(f"{path} was trained with {k}={ckpt['config'][k]!r}, not --{k}={cfg[k]!r}: "
                            f"the model shape cannot change on resume")
    saved = {k: v for k, v in ckpt["config"].items() if k in cfg and k not in chosen and k not in RUN_KEYS}
    cfg = {**cfg, **saved, **{k: ckpt["config"][k] for k in MODEL}}
    check_config(cfg)  # what the checkpoint holds, with the flags given now
    return cfg, set(ckpt["chosen"]) | set(chosen)


CPU_EVAL_ITERS = 5  # on a CPU, batches per split for each evaluation unless eval_iters was chosen


def cpu_eval_iters(cfg, chosen, device):
    """A CPU may need hours where a GPU needs minutes: there, evaluations stay short unless the user chose a length."""
    if device.type == "cpu" and "eval_iters" not in chosen:
        return min(cfg["eval_iters"], CPU_EVAL_ITERS)
    return cfg["eval_iters"]


def wants_compile(cfg, device, chosen):
    """torch.compile by default on CUDA only. On a CPU the eager step with the fused loss is as fast (bench.py
    train) and starts at once, where compiling takes a minute, so there it compiles only when asked: --compile=True."""
    return cfg["compile"] and (device.type == "cuda" or "compile" in chosen)


def use_compiler(cfg, device, chosen, master):
    """Whether to compile: as wants_compile says, unless the compiler cannot work here (a note then says why)."""
    if not wants_compile(cfg, device, chosen):
        return False
    missing = compiler_missing(device)
    if missing and master:
        print(f"note: training without torch.compile: {missing} (--compile=False says so quietly)")
    return not missing


def compiler_missing(device):
    """Why torch.compile cannot work on this device, or None: inductor builds GPU kernels with Triton and CPU
    kernels with the machine's C++ compiler (CXX, else g++; cl on Windows)."""
    if device.type == "cuda":
        from torch.utils._triton import has_triton
        return None if has_triton() else "Triton is not installed (it is not available on every platform)"
    compiler = os.environ.get("CXX") or ("cl" if sys.platform == "win32" else "g++")
    return None if shutil.which(compiler) else f"no C++ compiler ({compiler}) was found"


def cpu_note(model, cfg, eval_iters, chosen, tokens_per_iter):
    """What the run will cost on this CPU: the model's FLOPs at the rate of a head-shaped matmul, timed now."""
    a, b = torch.randn(256, model.config.n_embd), torch.randn(model.config.n_embd, model.config.padded_vocab_size)
    a @ b  # warm-up
    start = time.perf_counter()
    for _ in range(2):
        a @ b
    flops_per_second = 2 * 2 * a.size(0) * a.size(1) * b.size(1) / (time.perf_counter() - start)
    step = model.flops_per_token() * tokens_per_iter / flops_per_second
    evaluation = step / 3 * 2 * eval_iters * cfg["batch_size"] * cfg["block_size"] / tokens_per_iter
    note = (f"note: this CPU does about {flops_per_second / 1e9:.0f} GFLOP/s, so a step takes about {duration(step)}, "
            f"max_iters={cfg['max_iters']} about {duration(step * cfg['max_iters'])}, and each evaluation "
            f"(eval_iters={eval_iters}{'' if 'eval_iters' in chosen else ', the CPU default'}) about "
            f"{duration(evaluation)}")
    if step * cfg["max_iters"] > 3600 and not cfg["preset"]:
        note += "; --preset=cpu trains a smaller model in about 10 minutes"
    return note


def duration(seconds):
    return f"{seconds:.1f} s" if seconds < 60 else f"{seconds / 60:.0f} min" if seconds < 3600 else f"{seconds / 3600:.1f} hours"


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

    def agreed(self, world, device):
        """The signal any process has received, or 0. Every rank must stop at the same step: a rank that went on
        to the next step's gradient all-reduce while another saves would wait on it until the timeout."""
        if world == 1:
            return self.signal or 0
        flag = torch.tensor([self.signal or 0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())  # waits for the device


# -----------------------------------------------------------------------------
# The log


def open_log(out_dir, start_step):
    """log.jsonl to append to, and what it says of start_step. A resumed run first drops the rows from its own step
    on (a crash may leave some, and those steps are about to run again) and writes its step's row anew with what
    that row held (the evaluation of a run that ended there, say); a run from scratch starts a new log."""
    path = os.path.join(out_dir, "log.jsonl")
    if start_step == 0 or not os.path.exists(path):
        return open(path, "w"), {}
    with open(path) as f:
        lines = f.readlines()
    kept, row = [], {}
    for line in lines:
        try:
            logged = json.loads(line)
        except ValueError:  # a line cut short by a kill
            continue
        if logged["step"] < start_step:
            kept.append(line)
        elif logged["step"] == start_step:
            row = {k: v for k, v in logged.items() if k not in ("step", "tokens", "elapsed")}
    if kept != lines:
        with open(path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(path + ".tmp", path)
    return open(path, "a"), row


def plot_losses(out_dir):
    """log.jsonl -> loss.png (written whole, like every file here); matplotlib is optional."""
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
    ax.set(xlabel="tokens seen", ylabel="cross-entropy loss (nats/token)", title="training and validation loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = os.path.join(out_dir, "loss.png")
    fig.savefig(path + ".tmp", dpi=120, format="png")
    plt.close(fig)
    os.replace(path + ".tmp", path)


# -----------------------------------------------------------------------------
# Training

# Dense bf16 peak FLOP/s by GPU name (the first that the device's name contains), for the MFU in the progress bar;
# add yours. The tests add a "cpu" entry, so that the figure is computed in CI too.
PEAK_FLOPS = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "GH200": 989e12, "B200": 2250e12, "A100": 312e12,
              "A10G": 125e12, "L40S": 362e12, "L4": 121e12, "RTX 4090": 165e12, "RTX 3090": 71e12}


def peak_flops(device):
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return next((flops for key, flops in PEAK_FLOPS.items() if key in name), None)


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


class Run:
    """What a training run holds besides the model: its optimizers, the batch RNG and where it writes. One per
    process; checkpoint() gathers every rank's RNG states, so all ranks call it together."""

    def __init__(self, model, cfg, chosen, meta, device, rank, world):
        self.model, self.cfg, self.chosen, self.meta, self.device = model, cfg, chosen, meta, device
        self.rank, self.world = rank, world
        self.optimizers = make_optimizers(model, cfg, device)
        self.generator = torch.Generator().manual_seed(cfg["seed"] + rank)  # batches: resumable, unlike the global RNG
        self.ckpt_path = os.path.join(cfg["out_dir"], "ckpt.pt")
        self.start_step, self.best_val = 0, float("inf")
        self.diverged = f"training diverged; {self.ckpt_path} still holds the last good state (try a lower --learning_rate)"

    def evaluate(self, step, bins, ctx, eval_iters, bar):
        """The losses at `step`, written in the bar in bits/byte too; then best.pt and ckpt.pt, unless this run
        resumed at `step` and they hold this state already. Every rank calls it (checkpoint() gathers)."""
        losses = estimate_loss(self.model, bins, {**self.cfg, "eval_iters": eval_iters}, ctx, self.device)
        if not math.isfinite(losses["validation"]):
            raise UserError(f"validation loss is {losses['validation']} at step {step}: {self.diverged}")
        # bits per byte of the validation text: comparable across vocabularies, unlike nats per token
        v = self.meta["splits"]["validation"]
        bits_per_byte = losses["validation"] * v["tokens"] / v["bytes"] / math.log(2)
        if self.rank == 0:  # tqdm.write is the class's: a bar's disable=True does not silence it
            bar.write(f"step {step}: val {bits_per_byte:.3f} bits/byte (val loss {losses['validation']:.4f}, "
                      f"train loss {losses['train']:.4f} nats/token)")
        self.save_if_best(step, losses["validation"])
        if step > self.start_step or step == 0:  # a resumed run's first checkpoint would be the one it read
            self.checkpoint(step)
        return dict(train_loss=losses["train"], val_loss=losses["validation"])

    def stop(self, step, signum, bar):
        """Save at `step`, say so in one last line, and exit as the signal would have. Every rank calls it."""
        self.checkpoint(step)
        bar.close()  # before the message, which should be the last line
        if self.rank == 0:
            print(f"stopped by {signal.Signals(signum).name} at step {step}: saved {self.ckpt_path}; "
                  f"continue with --init_from=resume", file=sys.stderr)
        sys.exit(128 + signum)  # the shell's convention for "ended by this signal"

    def state(self, **extra):
        """What every checkpoint holds: the weights, and the settings and vocabulary to use them."""
        return dict(version=CHECKPOINT_VERSION, model=self.model.state_dict(), vocab=self.meta["vocab"],
                    config={**self.cfg, "vocab_size": self.meta["vocab_size"]}, chosen=sorted(self.chosen), **extra)

    def checkpoint(self, step):
        """Everything needed to continue exactly from `step`, with the RNG states of every rank."""
        ranks = [dict(batch=self.generator.get_state(), torch=rng_state(self.device))]
        if self.world > 1:
            ranks = [None] * self.world
            dist.all_gather_object(ranks, dict(batch=self.generator.get_state(), torch=rng_state(self.device)))
        if self.rank == 0:
            save_checkpoint(self.ckpt_path, self.state(optimizer=[o.state_dict() for o in self.optimizers], step=step,
                                                       best_val_loss=self.best_val, ranks=ranks))

    def save_if_best(self, step, val_loss):
        if val_loss < self.best_val:
            self.best_val = val_loss
            if self.rank == 0:
                save_checkpoint(os.path.join(self.cfg["out_dir"], "best.pt"), self.state(step=step, val_loss=val_loss))

    def resume(self, ckpt):
        """Continue from the checkpoint: its optimizer state, step and RNGs."""
        try:
            load_optimizer_state(self.optimizers, ckpt["optimizer"])
        except (ValueError, KeyError, TypeError):
            raise UserError(f"{self.ckpt_path}: its optimizer state does not fit --optimizer={self.cfg['optimizer']}: "
                            f"resume with the optimizer it was trained with, or start from scratch")
        self.start_step, self.best_val = ckpt["step"], ckpt["best_val_loss"]
        if len(ckpt["ranks"]) == self.world:
            self.generator.set_state(ckpt["ranks"][self.rank]["batch"])
            set_rng_state(ckpt["ranks"][self.rank]["torch"], self.device)
        else:  # each rank draws anew, from a seed of its own for this step: the run goes on, not bit for bit
            self.generator.manual_seed(self.cfg["seed"] + self.rank + 1_000_003 * self.start_step)
            torch.manual_seed(self.cfg["seed"] + self.rank + 1_000_003 * self.start_step)
            if self.rank == 0:
                print(f"note: {self.ckpt_path} was saved by {len(ckpt['ranks'])} processes, this run has {self.world}: "
                      f"every process draws its batches anew from here, so the run goes on but not exactly as it would have")


def train(cfg, chosen=()):
    """Train, or resume, as cfg says; returns dict(best_val_loss, model). `chosen`: the keys the user set."""
    rank, world, local = setup_ddp(cfg)
    master = rank == 0
    device = pick_device(cfg["device"])
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local)
    ckpt_path = os.path.join(cfg["out_dir"], "ckpt.pt")
    ckpt = load_checkpoint(ckpt_path) if cfg["init_from"] == "resume" else None
    cfg, chosen = run_settings(cfg, chosen, ckpt, ckpt_path)
    if ckpt is not None and ckpt["step"] >= cfg["max_iters"]:
        if master:
            print(f"{ckpt_path} is already complete at step {ckpt['step']} (max_iters={cfg['max_iters']}): "
                  f"nothing to do. To train longer: python train.py --init_from=resume --max_iters=M")
        return dict(best_val_loss=ckpt["best_val_loss"], model=None)
    bins, meta = load_bins(cfg["data_dir"], cfg["block_size"])
    model = load_model(cfg, ckpt, ckpt_path, meta, rank).to(device)
    ctx, dtype = autocast_context(device, cfg["dtype"])
    compiling = use_compiler(cfg, device, chosen, master)
    # the fused loss is a big win for an eager step on a CPU; a compiled model keeps the plain loss, as on a GPU
    model.fused_loss = device.type == "cpu" and not compiling
    eval_iters = cpu_eval_iters(cfg, chosen, device)
    # every process runs gradient_accumulation_steps micro-batches a step: more processes, more tokens a step
    grad_accum = cfg["gradient_accumulation_steps"]
    tokens_per_iter = grad_accum * world * cfg["batch_size"] * cfg["block_size"]
    if master:
        n_params, n_total = model.num_params()
        print(f"model: {n_params / 1e6:.2f}M parameters besides the embeddings, "
              f"{n_total / 1e6:.2f}M in all (the head is tied to the {meta['vocab_size']:,}-token embedding)\n"
              f"tokens per step: {tokens_per_iter:,} = {grad_accum} accumulation x {world} processes x "
              f"{cfg['batch_size']} batch x {cfg['block_size']} tokens; on {device} in {dtype}")
        if device.type == "cpu":
            print(cpu_note(model, cfg, eval_iters, chosen, tokens_per_iter))

    run = Run(model, cfg, chosen, meta, device, rank, world)
    if ckpt is not None:
        run.resume(ckpt)
        if master:
            print(f"resuming from {ckpt_path} at step {run.start_step}")
    del ckpt
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == "float16")  # bf16 and fp32 need no loss scaling
    step_model = model  # the model each step runs: compiled, wrapped for DDP; saved and evaluated without those
    if compiling:
        if master and device.type != "cuda":
            print(f"compiling the model for {device.type}, as asked (--compile=True): the first step waits a minute "
                  f"or so for the compiler, and the steps use the plain loss (bench.py train compares)")
        step_model = torch.compile(model, dynamic=False)  # the shapes never change: one graph, never recompiled
    if world > 1:
        step_model = DDP(step_model, device_ids=[local] if device.type == "cuda" else None)

    os.makedirs(cfg["out_dir"], exist_ok=True)
    log_file, resumed_row = open_log(cfg["out_dir"], run.start_step) if master else (nullcontext(), {})  # rank 0 writes
    # the bar is closed on the way out, whatever happens: an error line then starts on a line of its own
    bar = tqdm(total=cfg["max_iters"], initial=run.start_step, unit="step", dynamic_ncols=True, disable=not master)
    with StopRequest() as stop, log_file as log, bar:
        t0 = time.time()
        def write_row(step, row):  # a row of log.jsonl for each step that evaluates or logs a loss, in that step
            if row and master:
                log.write(json.dumps(dict(step=step, tokens=step * tokens_per_iter, **row, elapsed=time.time() - t0)) + "\n")
                log.flush()

        for step in range(run.start_step, cfg["max_iters"] + 1):
            row = resumed_row if step == run.start_step else {}
            if (step % cfg["eval_interval"] == 0 or step == cfg["max_iters"]) and "val_loss" not in row:
                row.update(run.evaluate(step, bins, ctx, eval_iters, bar))
            if step < cfg["max_iters"]:
                # Ctrl-C or SIGTERM: stop before this step's training, after its evaluation, so that the run resumes
                # from here as if it never stopped. Processes agree at logged steps only (a collective waits for the
                # GPU); a single process looks every step
                if (world == 1 or step % cfg["log_interval"] == 0) and (signum := stop.agreed(world, device)):
                    write_row(step, row)
                    run.stop(step, signum, bar)
                set_lr(run.optimizers, step, cfg)
                step_start = time.time()
                loss = train_step(step_model, run.optimizers, scaler, bins["train"], run.generator, grad_accum, cfg,
                                  ctx, device)
                bar.update(1)
                if step % cfg["log_interval"] == 0 and master:
                    loss_value = loss.item()  # waits for the GPU: so only every log_interval steps
                    if not math.isfinite(loss_value):
                        raise UserError(f"loss is {loss_value} at step {step}: {run.diverged}")
                    tok_s = tokens_per_iter / (time.time() - step_start)
                    postfix = dict(loss=f"{loss_value:.4f}", lr=f"{get_lr(step, cfg):.2e}", tok_s=f"{tok_s:,.0f}")
                    if peak_flops(device):  # each device does its share of the tokens, at its own peak
                        postfix["mfu"] = f"{100 * model.estimate_mfu(tok_s / world, peak_flops(device)):.1f}%"
                    bar.set_postfix(postfix, refresh=False)
                    row.update(loss=loss_value, lr=get_lr(step, cfg))
            write_row(step, row)
    if master:
        plot_losses(cfg["out_dir"])
    return dict(best_val_loss=run.best_val, model=model)


def load_model(cfg, ckpt, path, meta, rank):
    """The model to train: the checkpoint's, if it fits the bins, or a new one for their vocabulary."""
    if ckpt is None:
        torch.manual_seed(cfg["seed"] + rank)  # the first weights (the same on every rank: DDP broadcasts rank 0's)
        return GPT(GPTConfig(**{k: cfg[k] for k in MODEL}, vocab_size=meta["vocab_size"]))
    if ckpt["vocab"] != meta["vocab"]:
        raise UserError(f"{path} was trained on a {ckpt['config']['vocab_size']:,}-token vocabulary, but the bins in "
                        f"{cfg['data_dir']}/ use another ({meta['vocab_size']:,} tokens): prepare them with "
                        f"--vocab_size={ckpt['config']['vocab_size']}, or point --data_dir at the bins it was trained on")
    return model_from_checkpoint(ckpt, path)


def evaluate(cfg, chosen=()):
    """--eval_only: the checkpoint scored on every token of the validation split, in one line."""
    path = os.path.join(cfg["out_dir"], cfg["checkpoint"])
    ckpt = load_checkpoint(path)
    cfg, _ = run_settings(cfg, chosen, ckpt, path)
    bins, meta = load_bins(cfg["data_dir"], cfg["block_size"])
    device = pick_device(cfg["device"])
    model = load_model(cfg, ckpt, path, meta, 0).to(device)
    ctx, _ = autocast_context(device, cfg["dtype"])
    v = meta["splits"]["validation"]
    # small batches: the full logits of a batch (batch x block_size x vocabulary floats) are held at once
    loss, ppl, bpb = evaluate_split(model, bins["validation"], v["bytes"], cfg["block_size"], min(cfg["batch_size"], 16),
                                    ctx, device)
    print(f"validation ({v['tokens']:,} tokens, {v['bytes']:,} bytes): {bpb:.4f} bits/byte | loss {loss:.4f} "
          f"nats/token ({meta['vocab_size']:,}-token vocabulary) | perplexity {ppl:.3f}")
    return dict(loss=loss, perplexity=ppl, bits_per_byte=bpb)


def main(argv):
    cfg, chosen = get_config(argv, SCRIPTS["train.py"], "train.py")
    try:
        (evaluate if cfg["eval_only"] else train)(cfg, chosen)
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
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
