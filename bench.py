"""
Benchmarks: the figures in README come from here. Each section compares with its baseline in the same run,
because a shared machine's speed drifts.

    python bench.py prepare [--data=PATH]   # prepare.py's tokens/s and peak memory vs tiktoken's own ceiling
    python bench.py train                   # training tokens/s: train.py's step vs a plain eager loop (MFU on CUDA)
    python bench.py sample                  # generation: sample.py vs the bare decoding loop vs nanoGPT-style
    python bench.py quality [--rows=a,b|all]  # recipes trained at equal budget and scored on the whole validation
                                            # split, beside bigram and trigram count baselines (about an hour)
    python bench.py                         # prepare, train and sample

--data is a folder or file of TinyStories .txt(.gz) text; the default is ../shared/data beside the checkout.
"""
import contextlib
import gzip
import io
import math
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

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
# train, and what the sections share


def default_device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name(device):
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else machine()


def sync(device):
    """Wait for the work queued on a GPU, so that a timer measures it; a CPU has none queued."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_gib(device):
    """The most memory held so far: allocated on the GPU, or this process's peak RSS on a CPU."""
    import resource

    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux counts KiB


class RandomTokens:
    """Stands in for train.py's Bin: windows of random token ids, so the benchmark needs no prepared data."""

    def __init__(self, vocab_size, num_tokens=1 << 20):
        import torch

        self.tokens = torch.randint(0, vocab_size, (num_tokens,), generator=torch.Generator().manual_seed(0))
        self.num_tokens = num_tokens

    def read(self, start, count):
        return self.tokens[start:start + count]


def bench_train(device=None, model_config=None, dtype="auto", compile=None, batch_size=16, steps=None,
                sweep=(16, 64, 128, 256), peak_flops=None):
    """
    Tokens/s of train.py's own step (train.train_step) against a plain eager loop; the default model on this
    machine's GPU, else its CPU. compile=None compiles where train.py does by default (CUDA); on a CPU a third row
    shows what --compile=True gives there. Where a peak FLOP/s is known (train.PEAK_FLOPS or peak_flops), larger
    batches follow with their MFU. The tests run this on a CPU with a tiny model, compiled, in bf16 and against a
    made-up peak: the branches a GPU takes then run in CI too. Returns the figures it printed.
    """
    import torch

    import config
    import train
    from model import GPT, GPTConfig, autocast_context

    device = device or default_device()
    model_config = model_config or GPTConfig()
    ctx, dtype = autocast_context(device, dtype)
    peak_flops = peak_flops or train.PEAK_FLOPS.get(device.type)
    steps = steps or (3 if device.type == "cpu" else 30)
    T = model_config.block_size
    cfg = {**config.config, **{k: getattr(model_config, k) for k in config.model}, "batch_size": batch_size}
    data = RandomTokens(model_config.vocab_size)
    print(f"train: {model_config.n_layer} layers, {model_config.n_embd} wide, random tokens, in {dtype}, on "
          f"{device_name(device)}")

    def make(project, compiled):
        torch.manual_seed(0)
        model = GPT(model_config).to(device)
        model.fused_loss = project and device.type == "cpu" and not compiled  # as train.py sets it
        if project:
            optimizers = train.make_optimizers(model, cfg, device)
        else:  # nanoGPT's loop: the default (foreach) AdamW, the loss over the full logits
            optimizers = [torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)]
        step_model = torch.compile(model, dynamic=False) if compiled else model
        return dict(model=model, step_model=step_model, optimizers=optimizers,
                    scaler=torch.amp.GradScaler(device.type, enabled=dtype == "float16"))

    def rate(runner, batch, n):
        """Tokens/s over n optimizer steps of train.py's train_step (batches, loss, backward, clip, step)."""
        step_cfg = {**cfg, "batch_size": batch}
        generator = torch.Generator().manual_seed(0)
        sync(device)
        start = time.perf_counter()
        for _ in range(n):
            train.train_step(runner["step_model"], runner["optimizers"], runner["scaler"], data, generator, 1,
                             step_cfg, ctx, device)
        sync(device)
        return batch * T * n / (time.perf_counter() - start)

    by_default = train.wants_compile(dict(compile=True), device, explicit=())
    compiled = by_default if compile is None else compile
    optimizer = f"--optimizer={cfg['optimizer']}"
    project = f"train.py's path ({'torch.compile' if compiled else 'fused linear cross-entropy'}, {optimizer})"
    runners = {"plain eager loop (full logits + F.cross_entropy, foreach AdamW)": make(False, False),
               project: make(True, compiled)}
    if compile is None and not by_default:  # a CPU: what asking for it gives
        runners[f"train.py --compile=True (torch.compile, plain loss, {optimizer})"] = make(True, True)
    for name, runner in runners.items():  # warm up: allocations, and compiling
        start = time.perf_counter()
        rate(runner, batch_size, 1 if device.type == "cpu" else 5)
        if runner["step_model"] is not runner["model"]:
            print(f"{name}: compiled in {time.perf_counter() - start:.0f} s (the first step)")
    rates = {name: [] for name in runners}
    for _ in range(2):  # alternate, so drift hits all alike
        for name, runner in runners.items():
            rates[name].append(rate(runner, batch_size, steps))
    best = {name: max(r) for name, r in rates.items()}
    print(f"| loop (batch {batch_size} x {T}) | tokens/s | s/step |")
    print("|---|---|---|")
    for name, r in best.items():
        print(f"| {name} | {r:,.0f} | {batch_size * T / r:.2f} |")
    plain = best[next(iter(best))]
    print(f"speed-up of train.py's path: {best[project] / plain:.2f}x")
    flops_step = runners[project]["model"].flops_per_token() * batch_size * T
    if device.type == "cpu":
        # what the matmuls alone allow: the step's FLOPs at the rate of one big fp32 matmul on this machine
        a = torch.randn(batch_size * T, model_config.n_embd)
        b = torch.randn(model_config.n_embd, model_config.padded_vocab_size)
        a @ b
        start = time.perf_counter()
        for _ in range(3):
            a @ b
        gflops = 3 * 2 * a.size(0) * a.size(1) * b.size(1) / (time.perf_counter() - start) / 1e9
        floor = flops_step / (gflops * 1e9)
        print(f"matmul rate {gflops:.0f} GFLOP/s; {flops_step / 1e9:.1f} GFLOP per step -> floor {floor:.2f} s/step "
              f"({batch_size * T / floor:,.0f} tokens/s); train.py reaches "
              f"{batch_size * T / best[project] / floor:.2f}x the floor's time")
    results = dict(rates=best, sweep=[])
    if peak_flops:  # larger batches use the GPU better: MFU against the device's peak
        runner = runners[project]
        for batch in sweep:
            try:
                r = rate(runner, batch, steps)
            except torch.OutOfMemoryError:
                print(f"batch {batch} x {T}: out of memory")
                break
            mfu = runner["model"].estimate_mfu(r, peak_flops)
            results["sweep"].append((batch, r, mfu))
            print(f"batch {batch} x {T}: {r:,.0f} tokens/s, MFU {100 * mfu:.1f}% of {peak_flops / 1e12:g} TFLOP/s, "
                  f"peak memory {peak_memory_gib(device):.1f} GiB")
    return results


# -----------------------------------------------------------------------------
# sample

PROMPT = "Once upon a time"


def nanogpt_generate(model, idx, max_new_tokens, temperature=0.8, top_k=200):
    """nanoGPT's generate, on our model: the whole cropped context recomputed for every token, the head on the
    last position only, top-k by masking, torch.multinomial over the whole vocabulary."""
    import torch
    import torch.nn.functional as F

    block_size, vocab_size = model.config.block_size, model.config.vocab_size
    for _ in range(max_new_tokens):
        idx_cond = idx if idx.size(1) <= block_size else idx[:, -block_size:]
        logits = model.lm_head(model.hidden(idx_cond)[:, [-1], :])[:, -1, :vocab_size] / temperature
        if top_k is not None:
            v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
            logits[logits < v[:, [-1]]] = -float("Inf")
        probs = F.softmax(logits, dim=-1)
        idx = torch.cat((idx, torch.multinomial(probs, num_samples=1)), dim=1)
    return idx


def nanogpt_sample(out_dir, start, max_new_tokens, device):
    """nanoGPT's sample.py on our checkpoint: load, generate every token, then decode and print the story."""
    import torch

    from model import load_checkpoint, model_from_checkpoint
    from tokenizer import EOT, get_tokenizer

    path = os.path.join(out_dir, "ckpt.pt")
    model = model_from_checkpoint(load_checkpoint(path), path).to(device).eval()
    enc = get_tokenizer()
    x = torch.tensor([[EOT] + enc.encode_ordinary(start)], device=device)
    torch.manual_seed(1337)
    with torch.no_grad():
        y = nanogpt_generate(model, x, max_new_tokens)
    print(enc.decode(y[0, 1:].tolist()))


def sample_commands(out_dir, device):
    """n -> the command line a user runs, for sample.py and for the nanoGPT-style sampler on the same checkpoint."""
    def sample_py(n):
        return [sys.executable, os.path.join(HERE, "sample.py"), f"--out_dir={out_dir}", f"--start={PROMPT}",
                "--num_samples=1", f"--max_new_tokens={n}", "--stop_at_eot=False", f"--device={device.type}"]

    def nanogpt(n):
        code = f"import sys; sys.path.insert(0, {HERE!r}); import bench; " \
               f"bench.nanogpt_sample({out_dir!r}, {PROMPT!r}, {n}, {device.type!r})"
        return [sys.executable, "-c", code]
    return sample_py, nanogpt


def ms_per_token(run, n_short, n_long, repeats):
    """What each token past n_short costs: (time for n_long - time for n_short) / (n_long - n_short), each the
    best of `repeats`, taken in turn so that drift hits both. Start-up, loading and the prompt cancel out."""
    best = {n_short: float("inf"), n_long: float("inf")}
    for _ in range(repeats):
        for n in best:
            start = time.perf_counter()
            run(n)
            best[n] = min(best[n], time.perf_counter() - start)
    return 1000 * (best[n_long] - best[n_short]) / (n_long - n_short)


def run_command(cmd):
    """Run a command as a user would, its output read as it comes (through a pipe, as a terminal reads it)."""
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if r.returncode:
        sys.exit(f"error: {' '.join(cmd[:2])} failed: {r.stderr.decode(errors='replace').strip()[-500:]}")


def bench_sample(device=None, model_config=None, n_long=256, n_short=16, repeats=3, commands=True, extras=True):
    """
    Generation speed at batch 1, from the prompt sample.py's command below uses, past the context (256 new
    tokens after 5, with a context of 128): sample.py's real path (its defaults: temperature 0.8, top-k 200,
    top-p 0.95, each token decoded and written out as it comes) beside the bare decoding loop (model.generate
    with plain sampling), and a nanoGPT-style sampler; in this process and as the command a user runs, all in one
    run. Then where sample.py's time goes, and (extras) batch 8, bf16 and the memory floor. The default model has
    random weights: speed does not depend on them. The tests run this on a tiny model without the commands.
    """
    import torch

    import config
    import sample
    from model import GPT, GPTConfig, autocast_context
    from tokenizer import EOT, get_tokenizer

    device = device or default_device()
    model_config = model_config or GPTConfig()
    print(f"sample: {model_config.n_layer} layers, {model_config.n_embd} wide, context {model_config.block_size} "
          f"(random weights: speed does not depend on them), on {device_name(device)}")
    with tempfile.TemporaryDirectory() as out_dir:
        torch.manual_seed(0)
        torch.save(dict(model=GPT(model_config).state_dict(), config={**config.config, **vars(model_config)}),
                   os.path.join(out_dir, "ckpt.pt"))
        cfg = {**config.sample, "out_dir": out_dir, "checkpoint": "ckpt.pt", "device": device.type, "dtype": "auto",
               "stop_at_eot": False, "start": PROMPT, "num_samples": 1}
        model = sample.load_model(cfg, device)  # sample.py's own loading
        ctx, _ = autocast_context(device, cfg["dtype"])
        enc = get_tokenizer()
        ids = [EOT] + enc.encode_ordinary(PROMPT)
        prompt = torch.tensor([ids], device=device)
        sink = open(os.devnull, "w")

        def timed(fn):
            def run(n):
                with ctx:
                    fn(n)
                sync(device)
            return run

        @timed
        def bare(n):
            for _ in model.generate(prompt, n, temperature=1.0, generator=torch.Generator(device).manual_seed(0)):
                pass

        @timed
        def sample_py(n):
            sample.generate_text(model, enc, ids, {**cfg, "max_new_tokens": n}, torch.Generator(device).manual_seed(0),
                                 sink)

        @timed
        def nanogpt(n):
            with torch.no_grad():
                nanogpt_generate(model, prompt, n)

        sample.generate_text(model, enc, ids, {**cfg, "max_new_tokens": n_short}, None, sink)  # warm up
        ms = {name: ms_per_token(fn, n_short, n_long, repeats) for name, fn in
              (("bare", bare), ("sample", sample_py), ("nanogpt", nanogpt))}
        rows = [("bare decoding loop: model.generate (KV cache), plain sampling", "bare", "nanogpt"),
                ("sample.py's path: its default settings, each token decoded and written out", "sample", "nanogpt"),
                ("nanoGPT-style sampler: context recomputed, head on the last position, torch.multinomial",
                 "nanogpt", "nanogpt")]
        if commands:
            sample_cmd, nanogpt_cmd = sample_commands(out_dir, device)
            ms["sample_cmd"] = ms_per_token(lambda n: run_command(sample_cmd(n)), n_short, n_long, repeats)
            ms["nanogpt_cmd"] = ms_per_token(lambda n: run_command(nanogpt_cmd(n)), n_short, n_long, repeats)
            rows += [(f"`python sample.py --start=\"{PROMPT}\" --num_samples=1 --max_new_tokens=N "
                      f"--stop_at_eot=False --device={device.type}`", "sample_cmd", "nanogpt_cmd"),
                     ("the nanoGPT-style sampler as a command (`python -c ...`: load, generate, print)",
                      "nanogpt_cmd", "nanogpt_cmd")]
        print(f"\nbatch 1: tokens {n_short + 1} to {n_long} after a {len(ids)}-token prompt, past the context of "
              f"{model.config.block_size} (time at N={n_long} minus time at N={n_short}, best of {repeats} each)\n")
        print("| path | ms/token | tokens/s | vs the bare loop | speed-up over nanoGPT-style |")
        print("|---|---|---|---|---|")
        for label, key, baseline in rows:
            print(f"| {label} | {ms[key]:.1f} | {1000 / ms[key]:,.0f} | {ms[key] / ms['bare']:.2f}x | "
                  f"{ms[baseline] / ms[key]:.1f}x |")
        profile_sampling(model, enc, ids, cfg, ctx, device, n_long, sink)
        if extras:
            sample_extras(model, ctx, device, n_long)
        sink.close()
        return ms


def profile_sampling(model, enc, ids, cfg, ctx, device, n, sink):
    """Where sample.py's time per token goes: the window jumps past the context, the sampler at its settings,
    decoding and writing a token, and the decoding step itself."""
    import codecs
    import statistics

    import torch

    from model import sample_token

    block_size = model.config.block_size
    slide = max(1, block_size // 4)  # as GPT.generate
    jumps, start = set(), 0
    for i in range(n):
        if len(ids) + i - start > block_size:
            start = len(ids) + i - (block_size - slide)
            jumps.add(i)
    prompt = torch.tensor([ids], device=device)
    times = []
    with ctx:
        for _ in range(3):
            stamps = [time.perf_counter()]
            for _ in model.generate(prompt, n, cfg["temperature"], cfg["top_k"], cfg["top_p"]):
                sync(device)
                stamps.append(time.perf_counter())
            times.append([b - a for a, b in zip(stamps, stamps[1:])])
    step = [min(t[i] for t in times) for i in range(n)]
    decoding = statistics.median(step[i] for i in range(1, n) if i not in jumps)
    jump = statistics.mean(step[i] for i in jumps) if jumps else 0.0
    print(f"\nwhere sample.py's time goes, per token: a decoding step {1000 * decoding:.2f} ms (median)", end="")
    if jumps:
        print(f"; a window jump (the cache rebuilt from {block_size - slide} tokens) {1000 * jump:.1f} ms, once "
              f"every {slide} tokens: {1000 * (jump - decoding) / slide:.2f} ms a token", end="")
    _, logits = next(model.generate(prompt, 1))
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    parts = dict(sampler=lambda: sample_token(logits, cfg["temperature"], cfg["top_k"], cfg["top_p"]),
                 plain=lambda: sample_token(logits, 1.0),
                 write=lambda: (sink.write(decoder.decode(enc.decode_single_token_bytes(ids[-1]))), sink.flush()))
    cost = {}
    for name, fn in parts.items():
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(100):
                fn()
            sync(device)
            best = min(best, (time.perf_counter() - start) / 100)
        cost[name] = best
    print(f"; the sampler at temperature {cfg['temperature']}, top-k {cfg['top_k']}, top-p {cfg['top_p']}: "
          f"{1000 * cost['sampler']:.2f} ms (plain sampling: {1000 * cost['plain']:.2f} ms); decoding and writing "
          f"the token: {1000 * cost['write']:.3f} ms")


def sample_extras(model, ctx, device, n):
    """Batch 8, bf16 on a CPU, and the floor at batch 1: what reading every weight once costs."""
    import torch

    def rate(fn, batch):
        idx = torch.full((batch, 1), 50256, device=device)
        fn(idx, 8)  # warm up
        sync(device)
        start = time.perf_counter()
        fn(idx, n)
        sync(device)
        seconds = time.perf_counter() - start
        return batch * n / seconds, seconds / n

    @torch.no_grad()
    def cached(idx, n):
        for _ in model.generate(idx, n, temperature=1.0):
            pass

    (fast, _), (slow, _) = rate(cached, 8), rate(torch.no_grad()(lambda idx, n: nanogpt_generate(model, idx, n)), 8)
    print(f"\nbatch 8: KV cache {fast:,.0f} tokens/s, nanoGPT-style {slow:,.0f} tokens/s: {fast / slow:.1f}x")
    _, ms_1 = rate(cached, 1)
    if device.type == "cpu":  # why sample.py stays in float32 on a CPU without bf16 instructions
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, ms_bf16 = rate(cached, 1)
        print(f"batch 1 under bf16 autocast: {1000 * ms_bf16:.1f} ms/token, float32 {1000 * ms_1:.1f} ms/token")
    # The floor for one token at batch 1: reading every weight matrix once, one plain matvec each. The head
    # (2/3 of the weights) reads faster as the (n_embd, vocab) copy generate() uses: the second floor.
    body = [p for p in model.parameters() if p.dim() == 2 and p is not model.wpe.weight and p is not model.wte.weight]

    def read_all_weights(matrices):
        """Seconds for one matvec with each (n_in, n_out) matrix, the best of 20: what the machine can do."""
        vectors = [torch.randn(1, m.size(0), device=device) for m in matrices]
        best = float("inf")
        for _ in range(20):
            sync(device)
            start = time.perf_counter()
            for m, v in zip(matrices, vectors):
                v @ m
            sync(device)
            best = min(best, time.perf_counter() - start)
        return best

    linear = [w.t() for w in body]  # as nn.Linear reads them: (n_out, n_in) weights, transposed
    floor = read_all_weights(linear + [model.lm_head.weight.t()])
    floor_t = read_all_weights(linear + [model.decoding_head()])
    # what (n_in, n_out) copies of the blocks' matrices would allow too, as decoding_head() is for the head
    floor_all = read_all_weights([w.t().contiguous() for w in body] + [model.decoding_head()])
    print(f"batch 1 floor, one plain matvec per weight matrix: {1000 * floor:.1f} ms/token, the cache takes "
          f"{ms_1 / floor:.2f}x that; with the head read as (n_embd, vocab): {1000 * floor_t:.1f} ms/token, "
          f"{ms_1 / floor_t:.2f}x; with every matrix read as (n_in, n_out): {1000 * floor_all:.1f} ms/token")


# -----------------------------------------------------------------------------
# quality: recipes trained and scored at equal budget, beside count baselines


def bigram_nats(train_ids, prev, target, vocab_size, lam=0.9, add=0.05):
    """-log p(target | prev) under interpolated bigram counts (Jelinek-Mercer): lam c(prev target) / c(prev)
    + (1 - lam) p(target), with add-`add` unigram counts; the unigram alone after a token never seen in train."""
    train_ids = train_ids.astype(np.int64)
    unigram = np.bincount(train_ids, minlength=vocab_size) + add
    unigram = unigram / unigram.sum()
    pairs, pair_counts = np.unique(train_ids[:-1] * vocab_size + train_ids[1:], return_counts=True)
    context = np.bincount(train_ids[:-1], minlength=vocab_size)[prev]
    c = counts_of(pairs, pair_counts, prev * vocab_size + target)
    p = np.where(context > 0, lam * c / np.maximum(context, 1) + (1 - lam) * unigram[target], unigram[target])
    return -np.log(p)


def kneser_ney_nats(train_ids, u, v, w, vocab_size, discount=0.75):
    """
    -log p(w | u v) under an interpolated Kneser-Ney trigram (Chen and Goodman, 1998), one discount at every
    order. Each order keeps max(count - D, 0) / total and hands the mass it took off to the order below:
      trigram   raw counts c(u v w)
      bigram    continuation counts N(. v w): the number of distinct u seen before v w
      unigram   continuation counts N(. w): the number of distinct v seen before w
      uniform   1 / vocab_size, so that a token never seen in train still has a probability
    A context never seen falls through to the order below whole.
    """
    V, t = vocab_size, train_ids.astype(np.int64)
    trigrams, trigram_counts = np.unique(t[:-2] * V * V + t[1:-1] * V + t[2:], return_counts=True)
    bigrams = np.unique(t[:-1] * V + t[1:])

    def interpolate(count, total, types, lower):
        """The count discounted, plus the discounted mass (D x types / total) shared out as `lower` says."""
        seen = total > 0
        total = np.maximum(total, 1)
        return np.where(seen, np.maximum(count - discount, 0) / total + discount * types / total * lower, lower)

    # unigram: N(. w) over all distinct bigrams
    n_before = np.bincount(bigrams % V, minlength=V)
    p = interpolate(n_before[w], len(bigrams), (n_before > 0).sum(), 1 / V)
    # bigram: N(. v w), normalised over w by N(. v .)
    vw, n_vw = np.unique(trigrams % (V * V), return_counts=True)
    p = interpolate(counts_of(vw, n_vw, v * V + w), np.bincount(vw // V, weights=n_vw, minlength=V)[v],
                    np.bincount(vw // V, minlength=V)[v], p)
    # trigram: c(u v w), normalised over w by c(u v .)
    contexts, context_counts = np.unique(t[:-2] * V + t[1:-1], return_counts=True)
    context_types, n_types = np.unique(trigrams // V, return_counts=True)
    uv = u * V + v
    p = interpolate(counts_of(trigrams, trigram_counts, uv * V + w), counts_of(contexts, context_counts, uv),
                    counts_of(context_types, n_types, uv), p)
    return -np.log(p)


def counts_of(keys, counts, queries):
    """counts[i] where keys[i] == query, else 0 (keys sorted and unique)."""
    i = np.minimum(np.searchsorted(keys, queries), len(keys) - 1)
    return np.where(keys[i] == queries, counts[i], 0)


# -- the training rows. A row is train.py's own flags (what a user would type), trained on the budget and then
# scored by `train.py --eval_only=True` on the whole validation split. Changes that train.py does not keep (they
# did not win) are patched in for their row by the functions below, each a few lines.


def seed_recipe():
    """The seed notebook's optimisation: AdamW with eps 1e-9 and weight decay 0.1 on every parameter, exact (erf)
    GELU, and its schedule (seed_lr). Its flags (SEED) set the rest: dropout, biases, clipping, LR 1e-4."""
    import torch
    import torch.nn.functional as F

    import model
    import train

    train.make_optimizers = lambda m, cfg, device: [torch.optim.AdamW(
        m.parameters(), lr=cfg["learning_rate"], betas=(0.9, 0.95), eps=1e-9, weight_decay=0.1)]
    train.get_lr = seed_lr
    model.MLP.forward = lambda self, x: self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


def seed_lr(step, cfg, eta_min=5e-4):
    """
    The seed's PyTorch LinearLR (from 1/3 of the LR) over the first 5% of steps, then CosineAnnealingLR from the
    LR towards eta_min over the rest, in closed form (test_all.py checks it against PyTorch's schedulers). The
    seed's eta_min is above its LR of 1e-4, so its LR rises; train.py would refuse such a min_lr, hence the patch.
    """
    warmup = max(1, round(0.05 * cfg["max_iters"]))
    if step < warmup:
        return cfg["learning_rate"] * (1 / 3 + (2 / 3) * step / warmup)
    progress = (step - warmup) / (cfg["max_iters"] - warmup)
    return eta_min + (cfg["learning_rate"] - eta_min) * (1 + math.cos(math.pi * progress)) / 2


def untied_head():
    """The head as a matrix of its own (GPT-2 ties it to the token embedding), trained with the same AdamW."""
    import torch

    import model

    init = model.GPT.__init__

    def untied(self, config):
        init(self, config)
        self.lm_head.weight = torch.nn.Parameter(torch.randn_like(self.wte.weight) * 0.02)
    model.GPT.__init__ = untied


def zero_init_projections():
    """The blocks' output projections start at zero (modded-nanogpt): every block starts as the identity."""
    import torch

    import model

    init = model.GPT.init_weights

    def zeroed(self):
        init(self)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.zeros_(p)
    model.GPT.init_weights = zeroed


def muon_momentum_warmup():
    """Muon's momentum from 0.85 to 0.95 over the first 300 steps (modded-nanogpt)."""
    import train

    set_lr = train.set_lr

    def with_momentum(optimizers, step, cfg):
        set_lr(optimizers, step, cfg)
        for group in (g for o in optimizers if isinstance(o, train.Muon) for g in o.param_groups):
            group["momentum"] = 0.85 + 0.10 * min(step / 300, 1)
    train.set_lr = with_momentum


def warmup_stable_decay():
    """Warmup, then the peak LR held until the last 20% of steps, which decay linearly to zero (nanochat)."""
    import train

    cosine = train.get_lr  # its warmup is train.py's own

    def wsd(step, cfg):
        warmup, _ = train.schedule_lengths(cfg)
        if step < warmup:
            return cosine(step, cfg)
        return cfg["learning_rate"] * min(1.0, (cfg["max_iters"] - step) / round(0.2 * cfg["max_iters"]))
    train.get_lr = wsd


# The budget of a row: the compute of the previous --preset=cpu, 600 steps of 16 x 64 tokens of a 4-layer,
# 128-wide model, which took 10 minutes on the slower 2-core machines of this kind (about 1,000 tokens/s). A row
# of another shape or batch trains for as many steps as the same FLOPs buy; its wall time is measured as well.
OLD_PRESET = ["--n_layer=4", "--n_head=4", "--n_embd=128", "--block_size=64", "--batch_size=16", "--optimizer=adamw",
              "--learning_rate=3e-3", "--min_lr=3e-4", "--weight_decay=0.1", "--eval_interval=200", "--eval_iters=10"]
BUDGET_STEPS = 600
SEED = [*OLD_PRESET[:5], "--learning_rate=1e-4", "--min_lr=1e-4", "--dropout=0.1", "--bias=True", "--grad_clip=0.5",
        "--eval_interval=200", "--eval_iters=10"]
PRESET = ["--preset=cpu"]
MUON_AND_ADAMW_LR = [*OLD_PRESET, "--optimizer=muon", "--learning_rate=0.04", "--min_lr=0.004"]


def preset_with(*flags):
    """The --preset=cpu recipe with one change (later flags win)."""
    return [*PRESET, *flags]


# name -> (what it is, flags, budget in units of 10 slow minutes (None: the preset's own steps), patch or None)
QUALITY_ROWS = {
    "seed": ("the seed notebook's recipe: AdamW 1e-4 rising to 5e-4, dropout 0.1, biases, erf GELU, clip 0.5",
             SEED, 1, seed_recipe),
    "old-preset": ("the previous --preset=cpu: AdamW 3e-3, cosine to 3e-4, weight decay 0.1", OLD_PRESET, 1, None),
    # from the previous preset to the new one, one change at a time
    "+muon": ("old-preset, and Muon (LR 0.02) for the blocks' matrices", [*OLD_PRESET, "--optimizer=muon"], 1, None),
    "+adamw-lr": ("+muon, and AdamW's LR (embeddings, gains) 3e-3 -> 0.04", MUON_AND_ADAMW_LR, 1, None),
    "+no-decay": ("+adamw-lr, and weight decay 0.1 -> 0", [*MUON_AND_ADAMW_LR, "--weight_decay=0.0"], 1, None),
    "+width-96": ("+no-decay, and 96 wide, not 128 (more steps for the budget)", preset_with("--batch_size=16"), 1, None),
    "preset": ("the new --preset=cpu: +width-96, and batches of 32, not 16", PRESET, None, None),
    # the new preset with one change: tried, not adopted
    "adamw-only": ("preset, AdamW for every parameter", preset_with("--optimizer=adamw"), 1, None),
    "muon-lr-0.01": ("preset, Muon's LR 0.02 -> 0.01", preset_with("--muon_lr=0.01"), 1, None),
    "muon-lr-0.04": ("preset, Muon's LR 0.02 -> 0.04", preset_with("--muon_lr=0.04"), 1, None),
    "adamw-lr-0.02": ("preset, AdamW's LR 0.04 -> 0.02", preset_with("--learning_rate=0.02", "--min_lr=0.002"), 1, None),
    "adamw-lr-0.08": ("preset, AdamW's LR 0.04 -> 0.08", preset_with("--learning_rate=0.08", "--min_lr=0.008"), 1, None),
    "decay-0.1": ("preset, weight decay 0 -> 0.1", preset_with("--weight_decay=0.1"), 1, None),
    "to-zero": ("preset, the cosine down to 0, not to 10% of the peak", preset_with("--min_lr=0.0"), 1, None),
    "wsd": ("preset, warmup-stable-decay (linear to 0 over the last 20%) instead of the cosine", PRESET, 1,
            warmup_stable_decay),
    "untied": ("preset, the head a matrix of its own, not the token embedding", PRESET, 1, untied_head),
    "zero-proj": ("preset, the blocks' output projections initialised to zero", PRESET, 1, zero_init_projections),
    "momentum-warmup": ("preset, Muon's momentum 0.85 -> 0.95 over 300 steps", PRESET, 1, muon_momentum_warmup),
    "batch-64": ("preset, batches of 64, not 32 (half the steps)", preset_with("--batch_size=64"), 1, None),
    "context-128": ("preset, context 128 in batches of 16 (the same tokens a step)",
                    preset_with("--block_size=128", "--batch_size=16"), 1, None),
    "width-64": ("preset, 64 wide", preset_with("--n_embd=64"), 1, None),
    "width-128": ("preset, 128 wide", preset_with("--n_embd=128"), 1, None),
    "depth-8": ("preset, 8 layers, not 4", preset_with("--n_layer=8"), 1, None),
    # the longer budget: about 30 minutes on a slow machine
    "seed-long": ("the seed's recipe, 3x the budget", SEED, 3, seed_recipe),
    "old-preset-long": ("the previous --preset=cpu, 3x the budget", OLD_PRESET, 3, None),
    "preset-long": ("the new --preset=cpu_long: the preset's recipe for 3x the steps", ["--preset=cpu_long"], None,
                    None),
}
DEFAULT_ROWS = ["bigram", "trigram", "seed", "old-preset", "preset", "preset-long"]


def flops_per_step(flags):
    """Training FLOPs of one step of the run these train.py flags describe."""
    import torch

    import config
    from model import GPT, GPTConfig

    cfg = config.get_config(flags, [config.model, config.train])
    with torch.device("meta"):
        m = GPT(GPTConfig(**{k: cfg[k] for k in config.model}))
    return m.flops_per_token() * cfg["batch_size"] * cfg["block_size"] * cfg["gradient_accumulation_steps"]


# A row's child process: the patch, if any, then train.py's main() twice, to train and to score (both in this
# process, so a patched model is scored as it was trained). It prints the training's wall time.
ROW = """
import sys, time
sys.path.insert(0, {here!r})
import bench, train
{patch}
start = time.time()
train.main({train_args!r})
print("TRAINED IN", time.time() - start)
train.main({eval_args!r})
"""


def train_row(name, data_dir, tmp):
    """One row, trained and scored as a user would; returns (tokens, steps, seconds, nats/token, bits/byte)."""
    what, flags, budget, patch = QUALITY_ROWS[name]
    if budget is not None:  # as many steps as the budget buys; a preset's own row keeps the preset's steps
        flags = [*flags, f"--max_iters={round(budget * BUDGET_STEPS * flops_per_step(OLD_PRESET) / flops_per_step(flags))}"]
    out = os.path.join(tmp, name)
    code = ROW.format(here=HERE, patch=f"bench.{patch.__name__}()" if patch else "",
                      train_args=[*flags, "--device=cpu", f"--data_dir={data_dir}", f"--out_dir={out}"],
                      eval_args=[f"--out_dir={out}", "--init_from=resume", "--eval_only=True"])
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"error: row {name} failed: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
    lines = r.stdout.strip().splitlines()
    seconds = float(next(line for line in lines if line.startswith("TRAINED IN")).split()[-1])
    # validation (...): loss X nats/token | perplexity Y | Z bits/byte
    nats, bpb = float(lines[-1].split("loss ")[1].split()[0]), float(lines[-1].split("| ")[-1].split()[0])
    ckpt = torch_load(os.path.join(out, "ckpt.pt"))
    cfg = ckpt["config"]
    tokens = ckpt["step"] * cfg["batch_size"] * cfg["block_size"] * cfg["gradient_accumulation_steps"]
    return tokens, ckpt["step"], seconds, nats, bpb


def torch_load(path):
    import torch
    return torch.load(path, map_location="cpu", weights_only=True)


def count_rows(data_dir):
    """The two count baselines, built from train.bin and scored on every token of validation.bin that the
    transformers score (all but the first)."""
    import json

    import numpy as np

    with open(os.path.join(data_dir, "meta.json")) as f:
        meta = json.load(f)
    train_ids, val = (np.fromfile(os.path.join(data_dir, f"{s}.bin"), dtype="<u2").astype(np.int64)
                      for s in ("train", "validation"))
    num_bytes, V = meta["splits"]["validation"]["bytes"], meta["vocab_size"]
    rows = {}
    start = time.time()
    nats = bigram_nats(train_ids, val[:-1], val[1:], V)
    rows["bigram"] = ("interpolated bigram counts (Jelinek-Mercer, lambda 0.9, add-0.05 unigram)", nats, time.time() - start)
    start = time.time()
    # the second token has one token of context: its trigram context starts with the end-of-text id
    u = np.concatenate([[meta["eot"]], val[:-2]])
    nats = kneser_ney_nats(train_ids, u, val[:-1], val[1:], V)
    rows["trigram"] = ("interpolated Kneser-Ney trigram counts (discount 0.75)", nats, time.time() - start)
    return {name: (what, len(train_ids), "", seconds, n.mean(), n.sum() / math.log(2) / num_bytes)
            for name, (what, n, seconds) in rows.items()}


def bench_quality(data, rows):
    import prepare

    print(f"quality: training on the train files of {data}, scored on every token of its validation file; machine: "
          f"{machine()}")
    print("| recipe | what | tokens | steps | wall time | val loss (nats/token) | bits/byte |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = os.path.join(tmp, "data")
        with contextlib.redirect_stdout(io.StringIO()):
            prepare.prepare(dict(dataset=data, data_dir=data_dir, val_fraction=0.05, force=False))
        counts = count_rows(data_dir) if {"bigram", "trigram"} & set(rows) else {}
        for name in rows:
            if name in counts:
                what, tokens, steps, seconds, nats, bpb = counts[name]
            else:
                what = QUALITY_ROWS[name][0]
                tokens, steps, seconds, nats, bpb = train_row(name, data_dir, tmp)
            wall = f"{seconds:.1f} s" if seconds < 60 else f"{seconds / 60:.1f} min"
            print(f"| {name} | {what} | {tokens / 1e6:.2f}M | {steps} | {wall} | {nats:.3f} | {bpb:.3f} |", flush=True)


if __name__ == "__main__":
    sections = [a for a in sys.argv[1:] if not a.startswith("--")] or ["prepare", "train", "sample"]
    data = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--data=")),
                os.path.normpath(os.path.join(HERE, "..", "shared", "data")))
    rows = next((a.split("=", 1)[1].split(",") for a in sys.argv[1:] if a.startswith("--rows=")), DEFAULT_ROWS)
    if rows == ["all"]:
        rows = ["bigram", "trigram", *QUALITY_ROWS]
    unknown = [r for r in rows if r not in ("bigram", "trigram", *QUALITY_ROWS)]
    if unknown:
        sys.exit(f"error: unknown --rows={','.join(unknown)}: choose from bigram, trigram, {', '.join(QUALITY_ROWS)} or all")
    for section in sections:
        if section not in ("prepare", "train", "sample", "quality"):
            sys.exit(f"error: unknown section {section!r}: choose prepare, train, sample or quality")
        if section == "prepare":
            bench_prepare(data)
        elif section == "train":
            bench_train()
        elif section == "sample":
            bench_sample()
        else:
            bench_quality(data, rows)
        print()
