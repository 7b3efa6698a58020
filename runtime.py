"""
Where a run happens and how it ends: the device and its precision, the processes of a DDP run, Ctrl-C and SIGTERM,
whether to compile, what a CPU run will cost, MFU, and errors as one line. train.py calls these by name.
"""
import dataclasses
import math
import os
import shutil
import signal
import sys
import time
from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist
from tqdm import tqdm

from config import MODEL, UserError, presets


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


def cpu_multiplies_bf16():
    """A CPU with bf16 dot products (AVX512-BF16 or AMX): there bf16 matmuls are 3-9x float32's. Without them torch
    emulates bf16, slower than float32."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def gpu_multiplies_bf16(device):
    """Compute capability 8.0 or later (A100, RTX 30xx/40xx, L4, H100): bf16 in the tensor cores. Older GPUs (P100,
    V100, T4: Colab's and Kaggle's) only emulate it, which torch.cuda.is_bf16_supported() counts too; a compiled bf16
    step fails there in Triton ("Feature '.bf16' requires .target sm_80"), or runs slowly."""
    return torch.cuda.get_device_capability(device) >= (8, 0)


def autocast_context(device, dtype, training=False):
    """
    (context for forward passes, the dtype in effect). auto: bf16 autocast on a GPU that multiplies bf16 itself,
    fp16 (with the GradScaler) on older GPUs; float32 on a CPU, except for training on one that multiplies bf16
    itself, where a preset's step is 1.6-1.9x faster in bf16 (RESULTS.md). Sampling and --eval_only stay float32
    there: their figures and greedy stories are the exact ones.
    """
    native = device.type != "cuda" or gpu_multiplies_bf16(device)
    if dtype == "auto":
        dtype = "float32"
        if device.type == "cuda":
            dtype = "bfloat16" if native else "float16"
        elif device.type == "cpu" and training and cpu_multiplies_bf16():
            dtype = "bfloat16"
    if dtype == "bfloat16" and not native:
        major, minor = torch.cuda.get_device_capability(device)
        raise UserError(f"--dtype=bfloat16: this GPU (compute capability {major}.{minor}) only emulates bf16, which "
                        f"the compiler cannot build: use --dtype=float16 (auto picks it here)")
    if dtype == "float32":
        return nullcontext(), dtype
    return torch.autocast(device_type=device.type, dtype=getattr(torch, dtype)), dtype


def setup(cfg):
    """(rank, world size, local rank, device). DDP when torchrun started us (it sets RANK): gloo on CPUs, NCCL on
    GPUs, one GPU a process."""
    device = pick_device(cfg["device"])
    if "RANK" not in os.environ:
        return 0, 1, 0, device
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    # PyTorch's own timeout (NCCL's 10 minutes, gloo's 30): while rank 0 saves and writes a story the others wait,
    # longer for a large model, a slow disk or a second node. A process that dies ends the others' collectives
    # sooner: torchrun stops them, and gloo sees the connection close.
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                            device_id=device if device.type == "cuda" else None)
    return rank, world, local, device


def meet(world):
    """Under DDP, wait here for every process: after rank 0 alone has saved, before the next training step."""
    if world > 1:
        dist.barrier()


def from_rank0(value, world):
    """Rank 0's value (anything pickle takes) on every process."""
    if world == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def mean_over_processes(values, world, device):
    """The means of a list of figures over the DDP processes, each of which computed its own; or the list itself."""
    if world == 1:
        return values
    total = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return (total / world).tolist()


class StopRequest:
    """
    Within `with StopRequest(world, device, every, path) as stop:`, Ctrl-C or SIGTERM only sets a flag, and says at
    once what will happen; stop.requested(step) says, once a step has evaluated, which signal came. Every process
    must stop at the same step, and end together when a loss is not finite: one that went on to the next collective
    while another stopped would wait for it until the timeout (and NCCL then aborts with its watchdog's trace, not
    the one line). So under DDP the processes agree on both in one all-reduce, which waits for the device: at each
    log step (every `every` steps; agree). A second signal quits at once, in one line, without saving: the files
    are as the last save left them.
    """

    def __init__(self, world, device, every, path):
        self.world, self.device, self.every, self.path, self.signal, self.agreed = world, device, every, path, None, 0
        self.master = int(os.environ.get("RANK", 0)) == 0  # the process that prints

    def __enter__(self):
        self.signal = None
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, exc_type, exc, tb):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        if exc_type is KeyboardInterrupt and self.signal:  # raised by handle(): asked twice
            if self.master:
                saved = (f"{self.path} holds the last checkpoint saved; continue with --init_from=resume"
                         if os.path.exists(self.path) else "nothing was saved")
                print(f"quit at once (a second {signal.Signals(self.signal).name}) without saving: {saved}",
                      file=sys.stderr)
            sys.exit(128 + self.signal)

    def handle(self, signum, frame):
        if self.signal is not None:  # asked twice: stop right now, without saving
            raise KeyboardInterrupt
        self.signal = signum
        if self.master:  # at once: an evaluation on a CPU can take a minute
            when = "after this step's evaluation" if self.world == 1 else f"within {self.every} steps"
            tqdm.write(f"{signal.Signals(signum).name}: the run will stop {when} and save {self.path}; a second "
                       f"Ctrl-C quits without saving", file=sys.stderr)

    def requested(self, step):
        """The signal this process has received by this step, or 0; under DDP, the one any process had at the last
        agreement (the step does not matter then)."""
        return (self.signal or 0) if self.world == 1 else self.agreed

    def agree(self, loss):
        """At a log step, on every process: whether the loss (a float) is finite on every process. Under DDP the
        signal any process has received comes with it, for requested() to say from the next step on."""
        if self.world == 1:
            return math.isfinite(loss)
        flags = torch.tensor([self.signal or 0, not math.isfinite(loss)], device=self.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        self.agreed = int(flags[0].item())
        return not flags[1].item()

    def exit(self, signum, step):
        """Say what was saved, as the last line, and end as the signal would have."""
        if self.master:
            print(f"stopped by {signal.Signals(signum).name} at step {step}: saved {self.path}; "
                  f"continue with --init_from=resume", file=sys.stderr)
        sys.exit(128 + signum)  # the shell's convention for "ended by this signal"


def wants_compile(cfg, device, chosen):
    """torch.compile by default on CUDA only. On a CPU the eager step with the fused loss is faster (bench.py train)
    and starts at once, where compiling takes a minute, so there it compiles only when asked: --compile=True."""
    return cfg["compile"] and (device.type == "cuda" or "compile" in chosen)


def use_compiler(cfg, device, chosen, master):
    """Whether to compile: as wants_compile says, unless the compiler cannot work here (a note then says why)."""
    if not wants_compile(cfg, device, chosen):
        return False
    missing = compiler_missing(device)
    if missing and master:
        print(f"note: training without torch.compile: {missing} (--compile=False says so quietly)")
    if not missing and master and device.type != "cuda":
        print(f"compiling the model for {device.type}, as asked (--compile=True): the first step waits a minute "
              f"or so for the compiler, and the steps use the plain loss (bench.py train compares)")
    return not missing


def compiler_missing(device):
    """Why torch.compile cannot work on this device, or None: inductor builds GPU kernels with Triton and CPU
    kernels with the machine's C++ compiler (CXX, else g++; cl on Windows)."""
    if device.type == "cuda":
        from torch.utils._triton import has_triton
        return None if has_triton() else "Triton is not installed (it is not available on every platform)"
    compiler = os.environ.get("CXX") or ("cl" if sys.platform == "win32" else "g++")
    return None if shutil.which(compiler) else f"no C++ compiler ({compiler}) was found"


CPU_EVAL_ITERS = 5  # on a CPU, batches per split for each evaluation unless eval_iters was chosen


def cpu_eval_iters(cfg, chosen, device):
    """A CPU may need hours where a GPU needs minutes: there, evaluations stay short unless the user chose a length."""
    if device.type == "cpu" and "eval_iters" not in chosen:
        return min(cfg["eval_iters"], CPU_EVAL_ITERS)
    return cfg["eval_iters"]


def flops_per_token(model):
    """Training FLOPs per token: 6 per weight it meets (forward 2, backward 4), the head included and the position
    and value embeddings (lookups) not, plus attention's scores and mix over block_size keys in every layer."""
    c = model.config
    looked_up = sum(m.weight.numel() for m in (model.wpe, getattr(model, "vte", None)) if m is not None)
    return 6 * (sum(p.numel() for p in model.parameters()) - looked_up) + 12 * c.n_layer * c.n_embd * c.block_size


def cpu_note(model, cfg, eval_iters, chosen, tokens_per_step, dtype):
    """What the run will cost on this CPU: the model's FLOPs at the rate of a head-shaped matmul in the run's dtype,
    timed now. A long run hears what --preset=cpu would cost here, estimated the same way."""
    step, rate = step_seconds(model, tokens_per_step, dtype)
    evaluation = step / 3 * 2 * eval_iters * cfg["batch_size"] * cfg["block_size"] / tokens_per_step
    note = (f"note: this CPU does about {rate / 1e9:.0f} GFLOP/s, so a step takes about {duration(step)}, "
            f"max_iters={cfg['max_iters']} about {duration(step * cfg['max_iters'])}, and each evaluation "
            f"(eval_iters={eval_iters}{'' if 'eval_iters' in chosen else ', the CPU default'}) about "
            f"{duration(evaluation)}")
    if step * cfg["max_iters"] > 3600 and not cfg["preset"]:
        preset = presets["cpu"]
        with torch.device("meta"):  # the preset's model: its shape, no weights
            small = type(model)(dataclasses.replace(model.config, **{k: preset[k] for k in MODEL if k in preset}))
        small_step, _ = step_seconds(small, preset["batch_size"] * preset["block_size"], dtype)
        note += f"; --preset=cpu trains a smaller model in about {duration(small_step * preset['max_iters'])} here"
    return note


def step_seconds(model, tokens_per_step, dtype):
    """(a training step's seconds on this CPU, the FLOP/s they assume): the step's FLOPs at the rate of a matmul
    shaped like the model's head."""
    rate = matmul_rate(model.config.n_embd, model.config.padded_vocab_size, dtype)
    return flops_per_token(model) * tokens_per_step / rate, rate


def matmul_rate(n_embd, vocab_size, dtype):
    """FLOP/s of (256, n_embd) @ (n_embd, vocab_size) in dtype, timed now."""
    g = torch.Generator().manual_seed(0)  # not torch's own RNG: that one is the run's (dropout)
    a = torch.randn(256, n_embd, generator=g, dtype=getattr(torch, dtype))
    b = torch.randn(n_embd, vocab_size, generator=g, dtype=a.dtype)
    a @ b  # warm-up
    start = time.perf_counter()
    for _ in range(2):
        a @ b
    return 2 * 2 * a.size(0) * a.size(1) * b.size(1) / (time.perf_counter() - start)


def duration(seconds):
    return f"{seconds:.1f} s" if seconds < 60 else f"{seconds / 60:.0f} min" if seconds < 3600 else f"{seconds / 3600:.1f} hours"


# Dense bf16 peak FLOP/s by GPU name (the first that the device's name contains), for the MFU in the progress bar;
# add yours. The tests add a "cpu" entry, so that the figure is computed in CI too.
PEAK_FLOPS = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "GH200": 989e12, "B200": 2250e12, "A100": 312e12,
              "A10G": 125e12, "L40S": 362e12, "L4": 121e12, "RTX 4090": 165e12, "RTX 3090": 71e12}


def peak_flops(device):
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return next((flops for key, flops in PEAK_FLOPS.items() if key in name), None)


def mfu(model, tokens_per_second, device):
    """Model FLOPs utilisation of one device training on tokens_per_second, or None where its peak is unknown."""
    peak = peak_flops(device)
    return None if peak is None else flops_per_token(model) * tokens_per_second / peak


def sync(device):
    """Wait for the work queued on a GPU (it runs behind the Python that queues it), so that a clock measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


clock = time.perf_counter  # (the tests give Throughput a clock of their own)


class Throughput:
    """
    Tokens a second over each log interval: the device synchronised at both ends, so that a GPU's queued work is
    counted where it ran; evaluations, saves and stories left out (restart after them); and the first interval
    not shown, as it holds the compiler's work and the first allocations.
    """

    def __init__(self, device, tokens_per_step):
        self.device, self.tokens_per_step, self.first = device, tokens_per_step, True
        self.since, self.start = 0, clock()

    def restart(self, step):
        """The interval starts again with this step's training."""
        sync(self.device)
        self.since, self.start = step, clock()

    def measure(self, step):
        """Tokens/s of the training steps since the interval started, this one included; None for the first."""
        sync(self.device)
        now = clock()
        rate = None if self.first else self.tokens_per_step * (step + 1 - self.since) / (now - self.start)
        self.first, self.since, self.start = False, step + 1, now
        return rate


def use_tf32(device, dtype):
    """A float32 run on a GPU of compute capability 8.0 or later multiplies in TF32 (float32's range, 10 bits of
    mantissa where bf16 has 7), several times float32's rate. Older GPUs have no TF32 and ignore this."""
    if device.type == "cuda" and dtype == "float32":
        torch.set_float32_matmul_precision("high")


@contextmanager
def errors_as_one_line(cfg):
    """What a user can cause, or a machine, ends in one line and a non-zero exit status, never a traceback."""
    try:
        yield
        if dist.is_initialized():  # gloo aborts a process whose peer hangs up while it still talks: leave together
            dist.barrier()
    except UserError as e:
        sys.exit(f"error: {e}")
    except OSError as e:  # e.g. a full disk while saving: the previous checkpoint is still in place
        sys.exit(f"error: {e.strerror or e} ({e.filename}); files already in {cfg['out_dir']} are untouched")
    except KeyboardInterrupt:  # Ctrl-C before the loop takes the signals over (StopRequest), or in --eval_only
        print("stopped by Ctrl-C before training: nothing was saved", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
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
