"""
Benchmarks: the figures in README come from here. Each section compares with its baseline in the same run,
because a shared machine's speed drifts.

    python bench.py prepare [--data=PATH]   # prepare.py's tokens/s and peak memory vs tiktoken's own ceiling
    python bench.py train                   # training tokens/s: this project vs a plain eager loop (MFU on CUDA)
    python bench.py sample                  # generation tokens/s: KV cache vs recomputation vs the memory floor
    python bench.py                         # all three

--data is a folder or file of TinyStories .txt(.gz) text; the default is ../shared/data beside the checkout.
"""
import gzip
import os
import platform
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext

HERE = os.path.dirname(os.path.abspath(__file__))


def machine():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores"


# -----------------------------------------------------------------------------
# prepare


def read_stories(data):
    """Every story in the .txt / .txt.gz files at `data` (a file or a folder)."""
    files = [data] if os.path.isfile(data) else sorted(
        os.path.join(data, f) for f in os.listdir(data) if f.endswith((".txt", ".txt.gz")))
    stories = []
    for path in files:
        with (gzip.open(path, "rt") if path.endswith(".gz") else open(path)) as f:
            stories += [s.strip() for s in f.read().split("<|endoftext|>") if s.strip()]
    return stories


# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across exec
CHILD = """
import sys, time
sys.path.insert(0, {here!r})
import prepare
t = time.time()
meta = prepare.prepare(dict(dataset={path!r}, data_dir={out!r}, val_fraction=0.05, force=True))
seconds = time.time() - t
tokens = sum(s["tokens"] for s in meta["splits"].values())
peak_kb = open("/proc/self/status").read().split("VmHWM:")[1].split()[0]
print("RESULT", tokens, seconds, peak_kb)
"""


def bench_prepare(data):
    from tokenizer import get_tokenizer

    stories = read_stories(data)
    enc = get_tokenizer()
    print(f"prepare: {len(stories):,} stories from {data}; machine: {machine()}")
    print("| input | tokens | prepare.py tok/s | tiktoken ceiling tok/s | ratio | peak RSS |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in (4, 16):
            path = os.path.join(tmp, f"stories_x{repeat}.txt")
            with open(path, "w") as f:
                for _ in range(repeat):
                    f.write("".join(f"{s}\n<|endoftext|>\n" for s in stories))
            text = [s for _ in range(repeat) for s in stories]
            # the ceiling: tiktoken alone, one thread per core, the stories already in memory
            t = time.time()
            ceiling_tokens = sum(map(len, enc.encode_ordinary_batch(text, num_threads=os.cpu_count())))
            ceiling = ceiling_tokens / (time.time() - t)
            del text
            code = CHILD.format(here=HERE, path=path, out=os.path.join(tmp, "out"))
            r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
            tokens, seconds, rss_kb = r.stdout.split("RESULT")[1].split()
            rate = int(tokens) / float(seconds)
            size = os.path.getsize(path) / 1e6
            print(f"| {size:.0f} MB of text (x{repeat}) | {int(tokens):,} | {rate / 1e6:.2f}M | {ceiling / 1e6:.2f}M "
                  f"| {rate / ceiling:.2f} | {int(rss_kb) / 1024:.0f} MB |")


# -----------------------------------------------------------------------------
# train


def bench_train():
    import torch

    import train
    from model import GPT, GPTConfig

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"train: default model, random tokens, on {torch.cuda.get_device_name() if device.type == 'cuda' else machine()}")
    cfg = dict(learning_rate=1e-3, beta1=0.9, beta2=0.95, weight_decay=0.1)
    torch.manual_seed(0)

    def make(fused):
        model = GPT(GPTConfig()).to(device)
        model.fused_loss = fused and device.type == "cpu"
        if fused:
            optimizer = train.make_optimizer(model, cfg, device)
        else:  # nanoGPT's loop: the default (foreach) AdamW, the loss over the full logits
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
        step_model = torch.compile(model) if fused and device.type == "cuda" else model
        return model, step_model, optimizer

    def run_steps(step_model, optimizer, batch_size, n):
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
        x, y = torch.randint(0, 50257, (2, batch_size, 128), device=device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.time()
        for _ in range(n):
            with ctx:
                _, loss = step_model(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(step_model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return batch_size * 128 * n / (time.time() - t)

    n = 3 if device.type == "cpu" else 30
    plain, fused = make(False), make(True)
    for runner in (plain, fused):  # warm up: allocations, (on CUDA) compilation
        run_steps(runner[1], runner[2], 16, 1 if device.type == "cpu" else 5)
    rates = {"plain": [], "project": []}
    for _ in range(2):  # alternate, so drift hits both alike
        rates["plain"].append(run_steps(plain[1], plain[2], 16, n))
        rates["project"].append(run_steps(fused[1], fused[2], 16, n))
    best = {k: max(v) for k, v in rates.items()}
    model = fused[0]
    flops_step = model.flops_per_token() * 16 * 128
    print("| loop (batch 16 x 128) | tokens/s | s/step |")
    print("|---|---|---|")
    for name, label in (("plain", "plain eager loop (full logits + F.cross_entropy, foreach AdamW)"),
                        ("project", "train.py's path (fused linear cross-entropy, fused AdamW)")):
        print(f"| {label} | {best[name]:,.0f} | {16 * 128 / best[name]:.2f} |")
    print(f"speed-up: {best['project'] / best['plain']:.2f}x")
    if device.type == "cpu":
        # what the matmuls alone allow: the step's FLOPs at the rate of one big fp32 matmul on this machine
        a, b = torch.randn(2048, 384), torch.randn(384, 50304)
        a @ b
        t = time.time()
        for _ in range(3):
            a @ b
        gflops = 3 * 2 * 2048 * 384 * 50304 / (time.time() - t) / 1e9
        floor = flops_step / (gflops * 1e9)
        print(f"matmul rate {gflops:.0f} GFLOP/s; {flops_step / 1e9:.0f} GFLOP per step -> floor {floor:.2f} s/step "
              f"({16 * 128 / floor:,.0f} tokens/s); train.py reaches {16 * 128 / best['project'] / floor:.2f}x the floor's time")
    else:
        peak = 989e12  # H100 SXM bf16 dense
        for batch_size in (16, 64, 128, 256):
            rate = run_steps(fused[1], fused[2], batch_size, n)
            print(f"batch {batch_size} x 128: {rate:,.0f} tokens/s, MFU {100 * model.estimate_mfu(rate, peak):.1f}% "
                  f"of 989 TFLOP/s, peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


# -----------------------------------------------------------------------------
# sample


def bench_sample():
    import torch

    from model import GPT, GPTConfig, sample_token

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"sample: default model (random weights: speed does not depend on them), 256 new tokens, on "
          f"{torch.cuda.get_device_name() if device.type == 'cuda' else machine()}")
    torch.manual_seed(0)
    model = GPT(GPTConfig()).to(device).eval()
    block_size = model.config.block_size

    @torch.no_grad()
    def recompute(idx, n, generator):
        """nanoGPT's generate: the whole (cropped) context at every step, the head on the last position only."""
        for _ in range(n):
            ctx = idx[:, -block_size:]
            pos = torch.arange(ctx.size(1), device=device)
            x = model.wte(ctx) + model.wpe(pos)
            for block in model.h:
                x = block(x)
            logits = model.lm_head(model.ln_f(x[:, -1]))[:, :model.config.vocab_size]
            idx = torch.cat((idx, sample_token(logits, 1.0, generator=generator)), dim=1)
        return idx

    @torch.no_grad()
    def cached(idx, n, generator):
        for _ in model.generate(idx, n, temperature=1.0, generator=generator):
            pass

    def rate(fn, batch):
        idx = torch.full((batch, 1), 50256, device=device)
        g = torch.Generator(device=device).manual_seed(0)
        fn(idx, 8, g)  # warm up
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.time()
        fn(idx, 256, g)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return batch * 256 / (time.time() - t), (time.time() - t) / 256

    # The floor for one token at batch 1: reading every weight matrix once, one plain matvec each. The head
    # (2/3 of the weights) reads faster as the (n_embd, vocab) copy generate() uses: the second floor.
    body = [p for p in model.parameters() if p.dim() == 2 and p is not model.wpe.weight and p is not model.wte.weight]

    def read_all_weights(head):
        """Seconds for one matvec with each (n_in, n_out) matrix, the best of 20: what the machine can do."""
        matrices = [w.t() for w in body] + [head]
        vectors = [torch.randn(1, m.size(0), device=device) for m in matrices]
        best = float("inf")
        for _ in range(20):
            t = time.time()
            for m, v in zip(matrices, vectors):
                v @ m
            best = min(best, time.time() - t)
        return best

    floor, floor_t = read_all_weights(model.lm_head.weight.t()), read_all_weights(model.decoding_head())
    print("| batch | KV cache tok/s | recompute tok/s | cache speed-up | ms/token (cache) |")
    print("|---|---|---|---|---|")
    for batch in (1, 8):
        (fast, ms), (slow, _) = rate(cached, batch), rate(recompute, batch)
        print(f"| {batch} | {fast:,.0f} | {slow:,.0f} | {fast / slow:.1f}x | {1000 * ms:.1f} |")
        if batch == 1:
            ms_1 = ms
            if device.type == "cpu":  # why sample.py stays in float32 on a CPU without bf16 instructions
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    bf16, ms_bf16 = rate(cached, 1)
                print(f"| 1, bf16 autocast | {bf16:,.0f} | | | {1000 * ms_bf16:.1f} |")
    print(f"batch 1 floor, one plain matvec per weight matrix: {1000 * floor:.1f} ms/token, the cache takes "
          f"{ms_1 / floor:.2f}x that; with the head read as (n_embd, vocab): {1000 * floor_t:.1f} ms/token, "
          f"{ms_1 / floor_t:.2f}x")


if __name__ == "__main__":
    sections = [a for a in sys.argv[1:] if not a.startswith("--")] or ["prepare", "train", "sample"]
    data = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--data=")),
                os.path.join(HERE, "..", "shared", "data"))
    for section in sections:
        if section not in ("prepare", "train", "sample"):
            sys.exit(f"error: unknown section {section!r}: choose prepare, train or sample")
        if section == "prepare":
            bench_prepare(data)
        elif section == "train":
            bench_train()
        else:
            bench_sample()
        print()
