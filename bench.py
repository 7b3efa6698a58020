"""
Benchmarks: the figures in README and RESULTS.md come from here. Each section compares with its baseline in the
same run, because a shared machine's speed drifts.

    python bench.py vocab --data=PATH         # what a compact vocabulary costs in tokens, and how stable it is
    python bench.py prepare --data=PATH       # prepare.py's tokens/s (counting included) vs tiktoken's own ceiling
    python bench.py train [--nanogpt=PATH]    # the training step: train.py's vs a plain loop, and nanoGPT's own
    python bench.py sample                    # generation: sample.py (and serve.py's page) vs the bare decoding loop
                                              # vs nanoGPT-style
    python bench.py quality --data=PATH [--rows=a,b|all] [--out=DIR]   # recipes trained at equal budget, scored
                                              # on the whole validation split, beside count baselines (each row:
                                              # minutes); --out keeps each row's run (log.jsonl, loss.png)
    python bench.py sizes --data=PATH [--out=DIR]   # model sizes at one compute: probes and bits/byte, model_sizes.png
    python bench.py probes --checkpoint=PATH[,PATH] [--data=PATH]   # coherence probes per kind (probes.py), beside
                                              # chance, the model untrained and (with --data) trigram counts, and
                                              # whether each model copies from its context
    python bench.py llama --checkpoint=PATH [--data=PATH]   # the GGUF export in llama.cpp: logits, greedy, tokens/s
    python bench.py hour --data=PATH --out=DIR [--rows=a,b]   # models given one hour of a CPU, scored at every
                                              # checkpoint (bits/byte, probes, copy check, stories): cpu_hour.png
    python bench.py gpu [--data=DIR] [--out=DIR]   # every GPU figure in one run; on a CPU, a tiny model in seconds

--data is TinyStories text: a folder of .txt(.gz) files named *train* and *valid* (as prepare.py reads them), or
for `gpu` a data_dir prepare.py wrote. --nanogpt is a checkout of github.com/karpathy/nanoGPT.
"""
import contextlib
import io
import itertools
import json
import math
import os
import platform
import re
import shutil
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


def default_device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name(device):
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else machine()


def sync(device):
    """Wait for the work queued on a GPU, so that a timer measures it (runtime.sync, which train.py's clock uses)."""
    import runtime

    runtime.sync(device)


def peak_memory_gib(device):
    """The most memory held so far: allocated on the GPU, or this process's peak RSS on a CPU."""
    import resource

    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux counts KiB


def run_script(script, *args, env=None):
    """One of the project's scripts as a user runs it; its stdout, or exit with its last error line."""
    r = subprocess.run([sys.executable, os.path.join(HERE, script), *args], capture_output=True, text=True,
                       env={**os.environ, **(env or {})})
    if r.returncode:
        lines = r.stderr.strip().splitlines() or [f"exit status {r.returncode}"]
        sys.exit(f"error: {script} {' '.join(args)} failed: {lines[-1]}")
    return r.stdout


def scores(stdout):
    """(bits/byte, nats/token) from the line `train.py --eval_only=True` prints last."""
    line = stdout.strip().splitlines()[-1]  # validation (...): B bits/byte | loss L nats/token (...) | perplexity P
    return float(line.split("): ")[1].split()[0]), float(line.split("loss ")[1].split()[0])


def save_random_checkpoint(out_dir, model_config, seed=0):
    """A checkpoint of a model with random weights (speed does not depend on them), as train.py writes one; its
    vocabulary is GPT-2's first tokens."""
    import torch

    import config
    import checkpoint
    from model import GPT
    from tokenizer import GPT2_VOCAB_SIZE, choose_vocab

    vocab = None if model_config.vocab_size == GPT2_VOCAB_SIZE else choose_vocab(np.zeros(GPT2_VOCAB_SIZE), model_config.vocab_size)
    torch.manual_seed(seed)
    torch.save(dict(version=checkpoint.VERSION, model=GPT(model_config).state_dict(), vocab=vocab, chosen=[],
                    config={**config.config, **vars(model_config)}), os.path.join(out_dir, "ckpt.pt"))


# -----------------------------------------------------------------------------
# prepare


def read_stories(data):
    """Every story in the .txt / .txt.gz files at `data` (a file or a folder)."""
    import gzip

    files = [data] if os.path.isfile(data) else sorted(
        os.path.join(data, f) for f in os.listdir(data) if f.endswith((".txt", ".txt.gz")))
    stories = []
    for path in files:
        with (gzip.open(path, "rt") if path.endswith(".gz") else open(path)) as f:
            stories += [s.strip() for s in f.read().split("<|endoftext|>") if s.strip()]
    return stories


# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across exec
CHILD = """
import os, sys, time
sys.path.insert(0, {here!r})
import prepare, sources, tokenizer
tokenizer.gpt2_encoding()  # loaded once, as in any run; not what is measured
cfg = dict(dataset={path!r}, data_dir={out!r}, val_fraction=0.05, force=True, vocab_size={vocab_size})
t = time.time()
prepare.count_gpt2_tokens(sources.find_source(cfg["dataset"], cfg["val_fraction"]), os.cpu_count())
counting = time.time() - t
t = time.time()
meta = prepare.prepare(cfg)
seconds = time.time() - t
tokens = sum(s["tokens"] for s in meta["splits"].values())
peak_kb = open("/proc/self/status").read().split("VmHWM:")[1].split()[0]
print("RESULT", tokens, seconds, counting, peak_kb)
"""


def bench_prepare(data, vocab_size=None, repeats=(16, 64)):
    """prepare.py on the stories repeated (so the run is long enough to time), counting pass included, against
    tiktoken's own ceiling with the same vocabulary: encode_ordinary_batch on every core, the text in memory."""
    import config
    from tokenizer import get_tokenizer

    vocab_size = vocab_size or config.DATA["vocab_size"]
    stories = read_stories(data)
    print(f"prepare: {len(stories):,} stories from {data}, a {vocab_size:,}-token vocabulary; machine: {machine()}")
    print("| input | tokens | prepare.py tok/s (counting included) | of which counting | tiktoken ceiling tok/s | ratio | peak RSS |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in repeats:
            path = os.path.join(tmp, f"stories_x{repeat}.txt")
            with open(path, "w") as f:
                for _ in range(repeat):
                    f.write("".join(f"{s}\n<|endoftext|>\n" for s in stories))
            code = CHILD.format(here=HERE, path=path, out=os.path.join(tmp, "out"), vocab_size=vocab_size)
            r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
            tokens, seconds, counting, rss_kb = r.stdout.split("RESULT")[1].split()[:4]
            with open(os.path.join(tmp, "out", "meta.json")) as f:
                enc = get_tokenizer(json.load(f)["vocab"])
            text = [s for _ in range(repeat) for s in stories]
            t = time.time()
            ceiling = sum(map(len, enc.encode_ordinary_batch(text, num_threads=os.cpu_count()))) / (time.time() - t)
            del text
            rate = int(tokens) / float(seconds)
            print(f"| {os.path.getsize(path) / 1e6:.0f} MB of text (x{repeat}) | {int(tokens):,} | {rate / 1e6:.2f}M | "
                  f"{float(counting):.1f} s of {float(seconds):.1f} s | {ceiling / 1e6:.2f}M | {rate / ceiling:.2f} | "
                  f"{int(rss_kb) / 1024:.0f} MB |")
            os.remove(path)


def bench_vocab(data, sizes=(4096, 8192, 16384), samples_mb=(2, 4, 8)):
    """What a compact vocabulary costs: validation tokens against GPT-2's whole vocabulary, and how much the kept
    set depends on how much train text was counted (prepare.py counts the first COUNT_BYTES)."""
    from prepare import COUNT_BYTES
    from tokenizer import GPT2_VOCAB_SIZE, choose_vocab, get_tokenizer

    gpt2 = get_tokenizer()
    train = read_stories(os.path.join(data, next(f for f in sorted(os.listdir(data)) if "train" in f))) \
        if os.path.isfile(data) else [s for f in sorted(os.listdir(data)) if "train" in f
                                      for s in read_stories(os.path.join(data, f))]
    valid = [s for f in sorted(os.listdir(data)) if "valid" in f for s in read_stories(os.path.join(data, f))]
    train_ids = [gpt2.encode_ordinary(s) for s in train]
    valid_ids = [gpt2.encode_ordinary(s) for s in valid]
    n_valid = sum(map(len, valid_ids))
    sizes_of = np.cumsum([len(s.encode()) + 1 for s in train])

    def counts(n_bytes):
        n = int(np.searchsorted(sizes_of, n_bytes)) + 1
        return np.bincount(np.concatenate([np.array(x, dtype=np.int64) for x in train_ids[:n]]), minlength=GPT2_VOCAB_SIZE)

    print(f"vocab: counted in the train files of {data} ({sizes_of[-1] / 2**20:.1f} MB, {len(train):,} stories); "
          f"{n_valid:,} GPT-2 tokens in its {len(valid):,} validation stories; prepare.py counts the first "
          f"{COUNT_BYTES / 2**20:.0f} MB")
    print("| kept tokens | validation tokens kept as GPT-2 has them | validation tokens (x GPT-2's) | "
          + " | ".join(f"set from the first {mb} MB: shared with all / validation tokens" for mb in samples_mb) + " |")
    print("|---|---|---|" + "---|" * len(samples_mb))
    everything = counts(sizes_of[-1])
    for size in sizes:
        vocab = choose_vocab(everything, size)
        kept, enc = set(vocab), get_tokenizer(vocab)
        share = sum(t in kept for ids in valid_ids for t in ids) / n_valid
        ratio = sum(len(enc.encode_ordinary(s)) for s in valid) / n_valid
        cells = []
        for mb in samples_mb:
            partial = choose_vocab(counts(mb * 2**20), size)
            cells.append(f"{len(kept & set(partial)) / size:.1%} / "
                         f"{sum(len(get_tokenizer(partial).encode_ordinary(s)) for s in valid) / n_valid:.4f}x")
        print(f"| {size:,} | {share:.2%} | {ratio:.4f}x | " + " | ".join(cells) + " |")


# -----------------------------------------------------------------------------
# train


class RandomTokens:
    """Stands in for train.py's Bin: random token ids, so the benchmark needs no prepared data."""

    def __init__(self, vocab_size, num_tokens=1 << 20):
        self.ids = np.random.default_rng(0).integers(0, vocab_size, num_tokens, dtype=np.uint16)
        self.num_tokens = num_tokens

    def tokens(self):
        return self.ids


def bench_train(device=None, model_config=None, dtype="auto", compile=None, batch_size=16, steps=None,
                sweep=(16, 64, 128, 256), peak_flops=None, optimizer="muon"):
    """
    Tokens/s of train.py's own step (train.train_step) against a plain eager loop (nanoGPT's: the loss over the
    full logits, foreach AdamW); the default model on this machine's GPU, else its CPU. On a CPU a row in float32
    shows what bf16 gains where auto chose it, a row with the plain loss what the fused one gains, and a row
    --compile=True what compiling gives. Where a peak FLOP/s
    is known (runtime.peak_flops, or peak_flops), larger batches follow with their MFU. The tests run this on a CPU
    with a tiny model, compiled, in bf16 and against a made-up peak: the branches a GPU takes then run in CI too.
    Returns the figures it printed.
    """
    import torch

    import config
    import runtime
    import model as model_py
    import train
    from model import GPT, GPTConfig

    device = device or default_device()
    model_config = model_config or GPTConfig()
    dtype = runtime.autocast_context(device, dtype, training=True)[1]  # what auto means here
    peak_flops = peak_flops or runtime.peak_flops(device)
    steps = steps or (3 if device.type == "cpu" else 30)
    T = model_config.block_size
    cfg = {**config.config, **{k: getattr(model_config, k) for k in config.MODEL}, "batch_size": batch_size,
           "optimizer": optimizer}
    data = RandomTokens(model_config.vocab_size)
    print(f"train: {model_config.n_layer} layers, {model_config.n_embd} wide, a {model_config.vocab_size:,}-token "
          f"vocabulary, random tokens, in {dtype}, on {device_name(device)}")

    def make(project, compiled, fused, step_dtype=dtype):
        torch.manual_seed(0)
        model = GPT(model_config).to(device)
        if project:
            optimizers = train.make_optimizers(model, cfg, device, step_dtype)
        else:  # nanoGPT's loop: the default (foreach) AdamW, the loss over the full logits
            optimizers = [torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)]
        step_model = torch.compile(model, dynamic=False) if compiled else model
        return dict(model=model, step_model=step_model, optimizers=optimizers, fused=fused,
                    ctx=runtime.autocast_context(device, step_dtype)[0],
                    scaler=torch.amp.GradScaler(device.type, enabled=step_dtype == "float16"))

    def rate(runner, batch, n):
        """Tokens/s over n optimizer steps of train.py's train_step (batches, loss, backward, clip, step)."""
        step_cfg = {**cfg, "batch_size": batch}
        generator = torch.Generator().manual_seed(0)
        model_py.FUSED_LOSS = runner["fused"]  # model.py's switch: on a CPU, the fused loss or the plain one
        try:
            sync(device)
            start = time.perf_counter()
            for _ in range(n):
                train.train_step(runner["step_model"], runner["optimizers"], runner["scaler"], data, generator,
                                 step_cfg, runner["ctx"], device)
            sync(device)
        finally:
            model_py.FUSED_LOSS = True
        return batch * T * n / (time.perf_counter() - start)

    by_default = runtime.wants_compile(dict(compile=True), device, chosen=())
    compiled = by_default if compile is None else compile
    project = f"train.py's step ({'torch.compile' if compiled else 'fused loss'}, --optimizer={optimizer})"
    runners = {"plain eager loop (full logits + F.cross_entropy, foreach AdamW)": make(False, False, False),
               project: make(True, compiled, device.type == "cpu" and not compiled)}
    if compile is None and not by_default:  # a CPU: what bf16 and the fused loss gain, and what compiling gives
        if dtype != "float32":  # auto chose bf16 on this CPU (runtime.cpu_multiplies_bf16)
            runners[f"train.py's step in float32 (fused loss, --optimizer={optimizer})"] = make(True, False, True,
                                                                                                  "float32")
        runners[f"train.py's step with the plain loss (--optimizer={optimizer})"] = make(True, False, False)
        runners[f"train.py --compile=True (torch.compile, plain loss, --optimizer={optimizer})"] = make(True, True, False)
    compile_seconds = None
    for name, runner in runners.items():  # warm up: allocations, and compiling
        start = time.perf_counter()
        rate(runner, batch_size, 1 if device.type == "cpu" else 5)
        if runner["step_model"] is not runner["model"]:
            compile_seconds = time.perf_counter() - start
            print(f"{name}: compiled in {compile_seconds:.0f} s (the first step)")
    rates = {name: [] for name in runners}
    for _ in range(2):  # alternate, so drift hits all alike
        for name, runner in runners.items():
            rates[name].append(rate(runner, batch_size, steps))
    best = {name: max(r) for name, r in rates.items()}
    print(f"| loop (batch {batch_size} x {T}) | tokens/s | s/step |")
    print("|---|---|---|")
    for name, r in best.items():
        print(f"| {name} | {r:,.0f} | {batch_size * T / r:.3f} |")
    plain = best[next(iter(best))]
    print(f"speed-up of train.py's step over the plain loop: {best[project] / plain:.2f}x")
    results = dict(rates=best, sweep=[], compile_seconds=compile_seconds)
    if peak_flops:  # larger batches use the GPU better: MFU against the device's peak
        runner = runners[project]
        for batch in sweep:
            try:
                r = rate(runner, batch, steps)
            except torch.OutOfMemoryError:
                print(f"batch {batch} x {T}: out of memory")
                break
            mfu = runtime.flops_per_token(runner["model"]) * r / peak_flops
            results["sweep"].append((batch, r, mfu, peak_memory_gib(device)))
            print(f"batch {batch} x {T}: {r:,.0f} tokens/s, MFU {100 * mfu:.1f}% of {peak_flops / 1e12:g} TFLOP/s, "
                  f"peak memory {peak_memory_gib(device):.1f} GiB")
    return results


def write_random_bins(data_dir, vocab_size, num_tokens=1 << 20):
    """train.bin and validation.bin of random tokens with the meta.json train.py reads, for speed runs."""
    from tokenizer import GPT2_VOCAB_SIZE, choose_vocab

    os.makedirs(data_dir, exist_ok=True)
    rng = np.random.default_rng(0)
    splits = {}
    for split in ("train", "validation"):
        rng.integers(0, vocab_size, num_tokens, dtype=np.uint16).tofile(os.path.join(data_dir, f"{split}.bin"))
        splits[split] = dict(tokens=num_tokens, stories=1, bytes=4 * num_tokens)
    vocab = None if vocab_size == GPT2_VOCAB_SIZE else choose_vocab(np.zeros(GPT2_VOCAB_SIZE), vocab_size)
    with open(os.path.join(data_dir, "meta.json"), "w") as f:
        json.dump(dict(version=2, complete=True, vocab_size=vocab_size, eot=vocab_size - 1, vocab=vocab,
                       splits=splits, source="random tokens"), f)


def step_seconds(times):
    """The median of per-step times, leaving out the first two (start-up, the first evaluation)."""
    times = sorted(times[2:])
    return times[len(times) // 2]


def bench_nanogpt(nanogpt, steps=8, repeats=2):
    """
    The default shape as nanoGPT trains it on a CPU (GPT-2's full vocabulary, biases, AdamW, batch 16 x 128, fp32,
    eager) with nanoGPT's own train.py, beside `python train.py --optimizer=adamw --bias=True ...` on the same
    random tokens, each as the command a user runs; alternated, so drift hits both. Per-step times: nanoGPT's
    printed `time`, train.py's log.jsonl.
    """
    shape = ["--n_layer=6", "--n_head=6", "--n_embd=384", "--block_size=128", "--batch_size=16", "--dropout=0.0",
             "--bias=True", "--device=cpu", "--compile=False", f"--max_iters={steps}", "--eval_iters=1",
             "--log_interval=1", "--gradient_accumulation_steps=1"]
    print(f"train, side by side with nanoGPT's train.py ({nanogpt}): 6 layers, 384 wide, GPT-2's 50,257 tokens, "
          f"biases, AdamW, batch 16 x 128, float32, eager; machine: {machine()}, {os.environ.get('OMP_NUM_THREADS', 'all')} threads")
    times = {"nanoGPT's train.py": [], "train.py --optimizer=adamw --bias=True": []}
    with tempfile.TemporaryDirectory() as tmp:
        # nanoGPT reads configurator.py and data/<dataset>/{train,val}.bin from where it runs: a folder of its own
        data_dir = os.path.join(tmp, "data", "tinystories")
        write_random_bins(data_dir, 50257)
        shutil.copy(os.path.join(data_dir, "validation.bin"), os.path.join(data_dir, "val.bin"))
        for name in ("train.py", "model.py", "configurator.py"):
            os.symlink(os.path.abspath(os.path.join(nanogpt, name)), os.path.join(tmp, name))
        for _ in range(repeats):
            r = subprocess.run([sys.executable, "train.py", *shape, "--dataset=tinystories", "--dtype=float32",
                                "--eval_interval=100000", f"--out_dir={tmp}/nano"], cwd=tmp, capture_output=True, text=True)
            if r.returncode:
                sys.exit(f"error: nanoGPT's train.py failed: {r.stderr.strip().splitlines()[-1]}")
            times["nanoGPT's train.py"].append(step_seconds(
                [float(line.split("time ")[1].split("ms")[0]) / 1000 for line in r.stdout.splitlines() if line.startswith("iter ")]))
            out = os.path.join(tmp, "ours")
            shutil.rmtree(out, ignore_errors=True)
            run_script("train.py", *shape, "--optimizer=adamw", "--eval_interval=100000", f"--data_dir={data_dir}",
                       f"--out_dir={out}")
            with open(os.path.join(out, "log.jsonl")) as f:
                elapsed = [json.loads(line)["elapsed"] for line in f]
            times["train.py --optimizer=adamw --bias=True"].append(step_seconds([b - a for a, b in zip(elapsed, elapsed[1:])]))
    print("| script (batch 16 x 128) | s/step (median of each run) | tokens/s |")
    print("|---|---|---|")
    for name, t in times.items():
        print(f"| {name} | {', '.join(f'{x:.2f}' for x in t)} | {2048 / min(t):,.0f} |")
    ours, theirs = min(times["train.py --optimizer=adamw --bias=True"]), min(times["nanoGPT's train.py"])
    print(f"train.py's step takes {ours / theirs:.2f}x nanoGPT's time")
    return times


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

    import checkpoint
    from tokenizer import get_tokenizer

    from model import GPT

    ckpt = checkpoint.load(os.path.join(out_dir, "ckpt.pt"))
    model = GPT.from_checkpoint(ckpt).to(device).eval()
    enc = get_tokenizer(ckpt["vocab"])
    x = torch.tensor([[enc.eot_token] + enc.encode_ordinary(start)], device=device)
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


@contextlib.contextmanager
def serve_py(out_dir, device):
    """serve.py started as a user starts it. Yields story(n): n tokens from its endpoint, read to the last line as
    the page reads them (settings POSTed as JSON, a line a token with its 5 likeliest)."""
    import urllib.request

    server = subprocess.Popen([sys.executable, os.path.join(HERE, "serve.py"), f"--out_dir={out_dir}", "--port=0",
                               f"--device={device.type}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()
        if not line.startswith("serving"):
            sys.exit(f"error: serve.py did not start: {server.stderr.read().strip()[-500:]}")
        url = line.rsplit(" at ", 1)[1].strip()
        local = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through a proxy

        def story(n):
            settings = dict(prompt=PROMPT, max_new_tokens=n, stop_at_eot=False, seed=0)
            with local.open(url + "/generate", json.dumps(settings).encode()) as answer:
                for _ in answer:
                    pass
        yield story
    finally:
        server.terminate()
        server.wait()


def ms_per_token(runs, n_short, n_long, repeats):
    """What each token past n_short costs on each of `runs` (name -> run(n)): (time for n_long - time for n_short)
    / (n_long - n_short), each the best of `repeats`, every run at both lengths in turn, so that a busy machine's
    drift hits them all. Start-up, loading and the prompt cancel out."""
    best = {(name, n): float("inf") for name in runs for n in (n_short, n_long)}
    for _ in range(repeats):
        for name, n in best:
            start = time.perf_counter()
            runs[name](n)
            best[name, n] = min(best[name, n], time.perf_counter() - start)
    return {name: 1000 * (best[name, n_long] - best[name, n_short]) / (n_long - n_short) for name in runs}


def run_command(cmd):
    """Run a command as a user would, its output read as it comes (through a pipe, as a terminal reads it)."""
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if r.returncode:
        sys.exit(f"error: {' '.join(cmd[:2])} failed: {r.stderr.decode(errors='replace').strip()[-500:]}")


def bench_sample(device=None, model_config=None, n_long=256, n_short=16, repeats=3, commands=True, extras=True):
    """
    Generation speed at batch 1, from the prompt sample.py's command below uses, past the context (256 new
    tokens after 5, with a context of 128): sample.py's real path (its defaults: temperature 0.8, top-k 200,
    top-p 0.95, each token decoded and written out as it comes) beside the bare decoding loop (model.py's generate
    with plain sampling), and a nanoGPT-style sampler; in this process, through serve.py's page endpoint, and as the
    command a user runs, all in one run. Then where sample.py's time goes, and (extras) batch 8, bf16 and the memory
    floor. The default model has random weights: speed does not depend on them. The tests run this on a tiny model
    without the commands.
    """
    import torch

    import config
    import sample
    from model import GPTConfig, generate
    from runtime import autocast_context

    device = device or default_device()
    model_config = model_config or GPTConfig()
    print(f"sample: {model_config.n_layer} layers, {model_config.n_embd} wide, context {model_config.block_size} "
          f"(random weights: speed does not depend on them), on {device_name(device)}")
    with tempfile.TemporaryDirectory() as out_dir:
        save_random_checkpoint(out_dir, model_config)
        cfg = {**config.SAMPLING, "out_dir": out_dir, "checkpoint": "ckpt.pt", "device": device.type, "dtype": "auto",
               "stop_at_eot": False, "start": PROMPT, "num_samples": 1}
        model, enc = sample.load_model(cfg, device)  # sample.py's own loading
        ctx, _ = autocast_context(device, cfg["dtype"])
        ids = [enc.eot_token] + enc.encode_ordinary(PROMPT)
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
            for _ in generate(model, prompt, n, temperature=1.0, generator=torch.Generator(device).manual_seed(0)):
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
        runs = dict(bare=bare, sample=sample_py, nanogpt=nanogpt)
        # with the commands, the page's path too: serve.py already running, so per token it is sample.py's path
        # over HTTP, timed in turn with it
        with serve_py(out_dir, device) if commands else contextlib.nullcontext() as serve_story:
            ms = ms_per_token({**runs, "serve": serve_story} if commands else runs, n_short, n_long, repeats)
        rows = [("bare decoding loop: model.py's generate (KV cache), plain sampling", "bare", "nanogpt"),
                ("sample.py's path: its default settings, each token decoded and written out", "sample", "nanogpt"),
                ("nanoGPT-style sampler: context recomputed, head on the last position, torch.multinomial",
                 "nanogpt", "nanogpt")]
        if commands:
            rows.insert(2, ("serve.py's page: its default settings POSTed to `python serve.py` (another process), "
                            "the story read to its last line, a JSON line a token with its 5 likeliest", "serve",
                            "nanogpt"))
            sample_cmd, nanogpt_cmd = sample_commands(out_dir, device)
            ms.update(ms_per_token(dict(sample_cmd=lambda n: run_command(sample_cmd(n)),
                                        nanogpt_cmd=lambda n: run_command(nanogpt_cmd(n))), n_short, n_long, repeats))
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

    from model import generate, sample_token

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
            for _ in generate(model, prompt, n, cfg["temperature"], cfg["top_k"], cfg["top_p"]):
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
    _, logits = next(generate(model, prompt, 1))
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

    from model import generate

    def rate(fn, batch):
        idx = torch.full((batch, 1), model.config.vocab_size - 1, device=device)  # end-of-text
        fn(idx, 8)  # warm up
        sync(device)
        start = time.perf_counter()
        fn(idx, n)
        sync(device)
        seconds = time.perf_counter() - start
        return batch * n / seconds, seconds / n

    @torch.no_grad()
    def cached(idx, n):
        for _ in generate(model, idx, n, temperature=1.0):
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
    head = model.lm_head.weight[:model.config.vocab_size].t().contiguous()  # as generate() reads it
    floor_t = read_all_weights(linear + [head])
    # what (n_in, n_out) copies of the blocks' matrices would allow too, as generate() has for the head
    floor_all = read_all_weights([w.t().contiguous() for w in body] + [head])
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


# A training row is train.py's own flags, as a user types them, on bins of its vocabulary; it is trained on the
# budget and scored by `train.py --eval_only=True` on the whole validation split. The budget: the compute of the
# first --preset=cpu, 600 steps of 16 x 64 tokens of a 4-layer, 128-wide model with GPT-2's whole vocabulary
# (about 10 minutes on the slower 2-core machines of this kind). A row with a cheaper head, a smaller model or
# batch trains for as many steps as the same FLOPs buy, counted with its own head; its wall time is measured too.
BUDGET_FLAGS = ["--n_layer=4", "--n_head=4", "--n_embd=128", "--block_size=64", "--batch_size=16"]
BUDGET_STEPS = 600
# --preset=cpu as it was before the compact vocabulary: the recipe the vocabulary rows compare at
CPU_BEFORE = ["--optimizer=muon", "--muon_lr=0.02", "--learning_rate=0.04", "--min_lr=0.004", "--weight_decay=0.0",
              "--n_layer=4", "--n_head=4", "--n_embd=96", "--batch_size=32", "--block_size=64", "--eval_interval=200",
              "--eval_iters=5", "--momentum_warmup=0"]
# the same with Muon's momentum warmup, the base of the shape and architecture rows
CPU_MW = CPU_BEFORE[:-1]
# The tutorial this project started from, in train.py's flags: AdamW 1e-4 with weight decay 0.1, rising along a
# cosine to 5e-4 (its CosineAnnealingLR's eta_min is above its LR), dropout 0.1, biases, gradient clipping at 0.5.
# What train.py does not copy: its 5% warmup (train.py warms for 2% of the steps), its AdamW eps of 1e-9, its decay
# of LayerNorm gains and biases, its exact (erf) GELU and its warmup from a third of the LR; at the old cpu budget
# these moved the loss by less than 0.01 nats.
SEED = ["--optimizer=adamw", "--learning_rate=1e-4", "--min_lr=5e-4", "--weight_decay=0.1", "--dropout=0.1",
        "--bias=True", "--grad_clip=0.5", "--momentum_warmup=0"]
SEED_SHAPE = BUDGET_FLAGS + ["--eval_interval=200", "--eval_iters=10"]
# --preset=cpu_long as it was: the base of the long-* rows
LONG_BEFORE = ["--preset=cpu", "--max_iters=3000", "--eval_interval=500"]
LONG_256 = [*LONG_BEFORE, "--batch_size=16", "--block_size=256"]
# --preset=cpu at context 256, and with --preset=cpu_long's schedule: the base of the probes' rows
CPU_256 = ["--preset=cpu", "--batch_size=16", "--block_size=256"]
CPU_LONG_RECIPE = [*CPU_256, "--min_lr=0.0", "--muon_weight_decay=0.1"]
# The default model at a batch a CPU can take (16 x 128), for 1.0M tokens a row
DEFAULT_SHAPE = ["--batch_size=16", "--max_iters=512", "--eval_interval=128", "--eval_iters=10"]
VOCABS = {"4096": 4096, "8192": 8192, "16384": 16384, "gpt2": 50257}

# name -> (what, vocabulary size, train.py flags or "bigram"/"trigram", budget in units of the budget above, or
# None for the flags' own max_iters)
QUALITY_ROWS = {}
for name, size in VOCABS.items():
    QUALITY_ROWS[f"bigram-{name}"] = ("interpolated bigram counts (Jelinek-Mercer)", size, "bigram", None)
    QUALITY_ROWS[f"trigram-{name}"] = ("interpolated Kneser-Ney trigram counts", size, "trigram", None)
QUALITY_ROWS.update({
    "seed-4096": ("the tutorial's recipe, 4 layers, 128 wide, 16 x 64", 4096, [*SEED_SHAPE, *SEED], 1),
    "seed-gpt2": ("the tutorial's recipe on GPT-2's vocabulary", 50257, [*SEED_SHAPE, *SEED], 1),
    "seed-long": ("the tutorial's recipe at --preset=cpu_long's compute", 4096, [*SEED_SHAPE, *SEED], 3.0),
    # the vocabulary, at --preset=cpu's recipe as it was
    "cpu-before": ("--preset=cpu before the compact vocabulary, as it was", 50257, [*CPU_BEFORE, "--max_iters=411"],
                   None),
    "vocab-4096": ("cpu-before on 4,096 tokens: more steps for the budget", 4096, CPU_BEFORE, 1),
    "vocab-8192": ("cpu-before on 8,192 tokens", 8192, CPU_BEFORE, 1),
    "vocab-16384": ("cpu-before on 16,384 tokens", 16384, CPU_BEFORE, 1),
    # then one change at a time, on 8,192 tokens
    "momentum-warmup": ("vocab-8192 with Muon's momentum warmup", 8192, CPU_MW, 1),
    "momentum-warmup-4096": ("vocab-4096 with Muon's momentum warmup", 4096, CPU_MW, 1),
    "width-128": ("momentum-warmup, 128 wide", 8192, [*CPU_MW, "--n_embd=128"], 1),
    "width-192": ("momentum-warmup, 192 wide", 8192, [*CPU_MW, "--n_embd=192"], 1),
    "depth-6": ("momentum-warmup, 6 layers 128 wide", 8192, [*CPU_MW, "--n_embd=128", "--n_layer=6"], 1),
    "heads-2": ("momentum-warmup, 2 heads", 8192, [*CPU_MW, "--n_head=2"], 1),
    "muon-0.03": ("momentum-warmup, Muon's LR 0.03", 8192, [*CPU_MW, "--muon_lr=0.03"], 1),
    "adamw-0.06": ("momentum-warmup, AdamW's LR 0.06", 8192, [*CPU_MW, "--learning_rate=0.06", "--min_lr=0.006"], 1),
    "value-embed": ("momentum-warmup with value embeddings", 8192, [*CPU_MW, "--value_embed=True"], 1),
    "batch-64": ("momentum-warmup, 64 x 64 tokens a step", 8192, [*CPU_MW, "--batch_size=64"], 1),
    "context-128": ("momentum-warmup, 16 x 128 tokens a step", 8192,
                    [*CPU_MW, "--batch_size=16", "--block_size=128"], 1),
    "batch-32x128": ("momentum-warmup, 32 x 128 tokens a step", 8192, [*CPU_MW, "--block_size=128"], 1),
    "batch-64x128": ("momentum-warmup, 64 x 128 tokens a step", 8192, [*CPU_MW, "--batch_size=64", "--block_size=128"],
                     1),
    "batch-32x128-muon-0.015": ("batch-32x128, Muon's LR 0.015", 8192, [*CPU_MW, "--block_size=128", "--muon_lr=0.015"],
                                1),
    "batch-32x128-ve": ("batch-32x128 with value embeddings", 8192, [*CPU_MW, "--block_size=128", "--value_embed=True"],
                        1),
    "batch-32x128-4096": ("batch-32x128 on 4,096 tokens", 4096, [*CPU_MW, "--block_size=128"], 1),
    "batch-32x128-4096-ve": ("batch-32x128 on 4,096 tokens with value embeddings", 4096,
                             [*CPU_MW, "--block_size=128", "--value_embed=True"], 1),
    # the presets as a user runs them: 1,000 steps fit the previous preset's wall time
    "preset": ("--preset=cpu", 4096, ["--preset=cpu"], None),
    "preset-no-ve": ("--preset=cpu without value embeddings", 4096, ["--preset=cpu", "--value_embed=False"], None),
    # the long preset: --preset=cpu for three times the steps, then one change at a time for that length; at most
    # the FLOPs of --preset=cpu_long before the compact vocabulary (1,233 steps of cpu-before's recipe)
    "long-before": ("--preset=cpu_long as it was: --preset=cpu for 3,000 steps", 4096, LONG_BEFORE, None),
    "long-context-256": ("long-before at 16 x 256 tokens a step", 4096, LONG_256, None),
    "long-batch-32x256": ("long-before at 32 x 256 tokens a step, half the steps", 4096,
                          [*LONG_BEFORE, "--batch_size=32", "--block_size=256", "--max_iters=1500", "--eval_interval=250"],
                          None),
    "long-context-256-muon-wd": ("long-context-256, Muon's weight decay 0.1", 4096,
                                 [*LONG_256, "--muon_weight_decay=0.1"], None),
    "long-lr-to-zero": ("long-context-256 with an LR that ends at zero", 4096, [*LONG_256, "--min_lr=0.0"], None),
    "long-muon-wd": ("long-lr-to-zero, Muon's weight decay 0.1", 4096,
                     [*LONG_256, "--min_lr=0.0", "--muon_weight_decay=0.1"], None),
    "long-width-128": ("long-lr-to-zero 128 wide, for long-context-256's FLOPs", 4096,
                       [*LONG_256, "--min_lr=0.0", "--n_embd=128", "--max_iters=1970"], None),
    "long-width-128-steps": ("long-width-128 for the FLOPs of --preset=cpu_long before the compact vocabulary", 4096,
                             [*LONG_256, "--min_lr=0.0", "--n_embd=128", "--max_iters=2086"], None),
    "preset-long": ("--preset=cpu_long: long-width-128-steps, Muon's weight decay 0.1", 4096, ["--preset=cpu_long"],
                    None),
    "preset-long-muon-wd-0.2": ("--preset=cpu_long, Muon's weight decay 0.2", 4096,
                                ["--preset=cpu_long", "--muon_weight_decay=0.2"], None),
    # the coherence probes (probes.py): --preset=cpu one change at a time, at its own steps
    "preset-seed-1": ("--preset=cpu, --seed=1", 4096, ["--preset=cpu", "--seed=1"], None),
    "preset-lr-to-zero": ("--preset=cpu with an LR that ends at zero", 4096, ["--preset=cpu", "--min_lr=0.0"], None),
    "preset-heads-2": ("--preset=cpu, 2 heads", 4096, ["--preset=cpu", "--n_head=2"], None),
    "preset-heads-8": ("--preset=cpu, 8 heads", 4096, ["--preset=cpu", "--n_head=8"], None),
    "preset-width-128": ("--preset=cpu 128 wide, for the same FLOPs", 4096,
                         ["--preset=cpu", "--n_embd=128", "--max_iters=770"], None),
    "preset-steps-2x": ("--preset=cpu for twice the steps", 4096, ["--preset=cpu", "--max_iters=2000"], None),
    "preset-context-256": ("--preset=cpu at 16 x 256 tokens a step", 4096, CPU_256, None),
    "preset-context-256-seed-1": ("preset-context-256, --seed=1", 4096, [*CPU_256, "--seed=1"], None),
    "preset-context-256-no-ve": ("preset-context-256 without value embeddings", 4096,
                                 [*CPU_256, "--value_embed=False"], None),
    "preset-long-recipe": ("preset-context-256 with cpu_long's LR to zero and Muon's weight decay", 4096,
                           CPU_LONG_RECIPE, None),
    "preset-long-recipe-no-ve": ("preset-long-recipe without value embeddings", 4096,
                                 [*CPU_LONG_RECIPE, "--value_embed=False"], None),
    "preset-long-recipe-no-ve-muon-0.03": ("preset-long-recipe-no-ve, Muon's LR 0.03", 4096,
                                           [*CPU_LONG_RECIPE, "--value_embed=False", "--muon_lr=0.03"], None),
    "preset-long-recipe-no-ve-adamw-0.06": ("preset-long-recipe-no-ve, AdamW's LR 0.06", 4096,
                                            [*CPU_LONG_RECIPE, "--value_embed=False", "--learning_rate=0.06"], None),
    "preset-long-recipe-no-ve-heads-2": ("preset-long-recipe-no-ve, 2 heads", 4096,
                                         [*CPU_LONG_RECIPE, "--value_embed=False", "--n_head=2"], None),
    "preset-hour": ("--preset=cpu_hour: --preset=cpu_long for 3.45x its steps", 4096, ["--preset=cpu_hour"], None),
    "preset-long-heads-8": ("--preset=cpu_long, 8 heads", 4096, ["--preset=cpu_long", "--n_head=8"], None),
    # the default model, 1.0M tokens at batch 16 x 128
    "default": ("the default recipe: Muon 0.02, AdamW 0.02, weight decay 0.1", 4096, DEFAULT_SHAPE, None),
    "default-nanogpt": ("nanoGPT's: AdamW 6e-4 for everything, cosine to 6e-5", 4096,
                        [*DEFAULT_SHAPE, "--optimizer=adamw", "--learning_rate=6e-4", "--min_lr=6e-5",
                         "--momentum_warmup=0"], None),
    "default-adamw-0.01": ("default, AdamW's LR 0.01", 4096, [*DEFAULT_SHAPE, "--learning_rate=0.01", "--min_lr=0.001"],
                           None),
    "default-adamw-0.04": ("default, AdamW's LR 0.04", 4096, [*DEFAULT_SHAPE, "--learning_rate=0.04", "--min_lr=0.004"],
                           None),
    "default-muon-0.01": ("default, Muon's LR 0.01", 4096, [*DEFAULT_SHAPE, "--muon_lr=0.01"], None),
    "default-muon-0.04": ("default, Muon's LR 0.04", 4096, [*DEFAULT_SHAPE, "--muon_lr=0.04"], None),
    "default-seed": ("the tutorial's recipe at the default shape", 4096, [*DEFAULT_SHAPE, *SEED], None),
})
# How the probes and bits/byte grow with the model's size at one compute, the budget above (1.17x --preset=cpu's;
# three times that, cpu_long's, would take a 2-core machine hours), each at --preset=cpu's recipe: the rows
# size-<layers>x<width>, one head per 32 dimensions
SIZES = [(4, 64), (4, 128), (6, 192), (8, 256), (6, 384)]
for n_layer, n_embd in SIZES:
    QUALITY_ROWS[f"size-{n_layer}x{n_embd}"] = (
        f"--preset=cpu's recipe at the budget, {n_layer} layers, {n_embd} wide", 4096,
        ["--preset=cpu", f"--n_layer={n_layer}", f"--n_embd={n_embd}", f"--n_head={n_embd // 32}"], 1)
DEFAULT_ROWS = ["bigram-4096", "trigram-4096", "seed-4096", "cpu-before", "preset", "preset-long"]


def flops_per_step(flags, vocab_size):
    """Training FLOPs of one step of the run these train.py flags describe, with a head of vocab_size rows."""
    import torch

    import config
    import runtime
    from model import GPT, GPTConfig

    cfg, _ = config.get_config(flags, config.SCRIPTS["train.py"])
    with torch.device("meta"):
        m = GPT(GPTConfig(**{k: cfg[k] for k in config.MODEL}, vocab_size=vocab_size))
    return runtime.flops_per_token(m) * cfg["batch_size"] * cfg["block_size"] * cfg["gradient_accumulation_steps"]


def train_row(name, data_dir, meta, out):
    """One training row, trained and scored as a user would: (tokens, steps, seconds, bits/byte, nats/token, the
    largest rise of the logged training loss above its lowest value so far: a spike, if the recipe has one)."""
    import torch

    _, _, flags, budget = QUALITY_ROWS[name]
    if budget is not None:
        steps = budget * BUDGET_STEPS * flops_per_step(BUDGET_FLAGS, 50257) / flops_per_step(flags, meta["vocab_size"])
        flags = [*flags, f"--max_iters={round(steps)}"]
    start = time.time()
    # a row starts over, also where --keep holds an earlier run of it
    run_script("train.py", *flags, "--device=cpu", "--init_from=scratch", f"--data_dir={data_dir}", f"--out_dir={out}")
    seconds = time.time() - start
    bpb, nats = scores(run_script("train.py", f"--out_dir={out}", "--init_from=resume", "--eval_only=True"))
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), map_location="cpu", weights_only=True)
    cfg = ckpt["config"]
    tokens = ckpt["step"] * cfg["batch_size"] * cfg["block_size"] * cfg["gradient_accumulation_steps"]
    with open(os.path.join(out, "log.jsonl")) as f:
        losses = [row["loss"] for row in map(json.loads, f) if "loss" in row]
    lowest_before = itertools.accumulate(losses, min)
    rise = max((loss - low for loss, low in zip(losses[1:], lowest_before)), default=0.0)
    return tokens, ckpt["step"], seconds, bpb, nats, rise


def count_row(name, data_dir, meta):
    """A count baseline, built from train.bin and scored on every token of validation.bin that the transformers
    score (all but the first): (train tokens, seconds, bits/byte, nats/token)."""
    train_ids, val = (np.fromfile(os.path.join(data_dir, f"{s}.bin"), dtype="<u2").astype(np.int64)
                      for s in ("train", "validation"))
    V = meta["vocab_size"]
    start = time.time()
    if QUALITY_ROWS[name][2] == "bigram":
        nats = bigram_nats(train_ids, val[:-1], val[1:], V)
    else:  # the second token has one token of context: its trigram context starts with the end-of-text id
        nats = kneser_ney_nats(train_ids, np.concatenate([[meta["eot"]], val[:-2]]), val[:-1], val[1:], V)
    bpb = nats.sum() / math.log(2) / meta["splits"]["validation"]["bytes"]
    return len(train_ids), time.time() - start, bpb, nats.mean()


def bench_quality(data, rows, keep=None):
    """Each row trained (or counted) and scored, on bits/byte and on the held-out and dev probes (probes.py); with
    keep, the bins and each trained row's out_dir stay there (checkpoints, log.jsonl, loss.png)."""
    import prepare
    import probes
    from tokenizer import get_tokenizer

    print(f"quality: trained on the train files of {data}, scored on every token of its validation file and on "
          f"the probes; machine: {machine()}, {os.environ.get('OMP_NUM_THREADS', 'all')} threads")
    print("| row | what | vocabulary | tokens | steps | wall time | bits/byte | nats/token | probes held-out | "
          "probes dev | largest loss rise |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in rows:
            what, vocab_size, flags, _ = QUALITY_ROWS[name]
            data_dir = os.path.join(keep or tmp, f"data_{vocab_size}")
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                meta = prepare.prepare(dict(dataset=data, data_dir=data_dir, val_fraction=0.05, force=False,
                                            vocab_size=vocab_size))
            scores = {}
            if flags in ("bigram", "trigram"):
                tokens, seconds, bpb, nats = count_row(name, data_dir, meta)
                steps = rise = ""
                if flags == "trigram":
                    train_ids = np.fromfile(os.path.join(data_dir, "train.bin"), dtype="<u2").astype(np.int64)
                    logprob = trigram_logprob(train_ids, get_tokenizer(meta["vocab"]), meta["vocab_size"])
                    scores = {split: probes.accuracy(probes.make_items(split), logprob)["all"] for split in PROBE_SETS}
            else:
                out = os.path.join(keep or tmp, name)
                tokens, steps, seconds, bpb, nats, rise = train_row(name, data_dir, meta, out)
                rise = f"{rise:.2f}"
                scores = {split: s["all"] for split, s in probe_scores(os.path.join(out, "ckpt.pt")).items()}
            wall = f"{seconds:.1f} s" if seconds < 60 else f"{seconds / 60:.1f} min"
            shown = [f"{100 * scores[s]:.1f}%" if s in scores else "" for s in PROBE_SETS]
            print(f"| {name} | {what} | {vocab_size:,} | {tokens / 1e6:.2f}M | {steps} | {wall} | {bpb:.3f} | "
                  f"{nats:.3f} | {shown[0]} | {shown[1]} | {rise} |", flush=True)
            results[name] = dict(tokens=tokens, seconds=seconds, bits_per_byte=bpb, probes=scores)
    return results


def bench_sizes(data, keep=None, plot="model_sizes.png"):
    """The SIZES rows (bench_quality), then a plot of their probes and bits/byte against the parameters."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from model import GPT, GPTConfig

    import config

    names = [f"size-{n_layer}x{n_embd}" for n_layer, n_embd in SIZES]
    results = bench_quality(data, names, keep)
    params = {}
    for name in names:
        cfg, _ = config.get_config(QUALITY_ROWS[name][2], config.SCRIPTS["train.py"])
        with torch.device("meta"):
            params[name] = GPT(GPTConfig(**{k: cfg[k] for k in config.MODEL}, vocab_size=4096)).num_params()[1] / 1e6
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    x = [params[n] for n in names]
    for split, marker in (("held-out", "o"), ("dev", "s")):
        left.plot(x, [100 * results[n]["probes"][split] for n in names], marker=marker, label=f"probes, {split}")
    left.axhline(50, color="gray", linestyle=":", label="chance")
    left.set(xscale="log", xlabel="parameters in all (millions)", ylabel="probes right (%)")
    right.plot(x, [results[n]["bits_per_byte"] for n in names], marker="o")
    right.set(xscale="log", xlabel="parameters in all (millions)", ylabel="bits/byte, validation")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    left.legend()
    fig.suptitle("one compute (1.17x --preset=cpu's), shared among model sizes")
    fig.tight_layout()
    fig.savefig(plot, dpi=100)
    print(f"wrote {plot}; parameters in all: " + ", ".join(f"{n} {params[n]:.1f}M" for n in names))
    return results


# -----------------------------------------------------------------------------
# probes: does a model keep track of who has what (probes.py), beside chance, an untrained model and counts


PROBE_SETS = ("held-out", "dev")


def trigram_logprob(train_ids, enc, vocab_size):
    """probes' logprob() for the interpolated Kneser-Ney trigram counts of train_ids, as count_row scores them."""
    def logprob(prefixes, continuations):
        u, v, w, owner = [], [], [], []
        for i, (prefix, cont) in enumerate(zip(prefixes, continuations)):
            c = enc.encode_ordinary(cont)
            ids = [enc.eot_token, enc.eot_token] + enc.encode_ordinary(prefix) + c
            for j in range(len(ids) - len(c), len(ids)):
                u.append(ids[j - 2]), v.append(ids[j - 1]), w.append(ids[j]), owner.append(i)
        nats = kneser_ney_nats(train_ids, np.array(u), np.array(v), np.array(w), vocab_size)
        return list(-np.bincount(owner, weights=nats, minlength=len(prefixes)))
    return logprob


def probe_scores(checkpoint_path, device=None):
    """{probe set: {kind: accuracy, "all": ...}} of a checkpoint, on both sets."""
    import checkpoint
    import probes
    from model import GPT
    from tokenizer import get_tokenizer

    device = device or default_device()
    ckpt = checkpoint.load(checkpoint_path)
    logprob = probes.model_logprob(GPT.from_checkpoint(ckpt).to(device), get_tokenizer(ckpt["vocab"]), device)
    return {split: probes.accuracy(probes.make_items(split), logprob) for split in PROBE_SETS}


def bench_probes(checkpoints, data=None):
    """Each checkpoint on the dev and the held-out probes, per kind, beside chance, the same model untrained and
    (with --data, text prepared in the checkpoint's vocabulary) the Kneser-Ney trigram counts; then each model's
    copy check (probes.copy_check). Returns ({column: accuracies}, {model: (nats read once, read again)})."""
    import torch

    import checkpoint
    import prepare
    import probes
    from model import GPT
    from tokenizer import get_tokenizer

    device = default_device()
    first = checkpoint.load(checkpoints[0])
    enc = get_tokenizer(first["vocab"])
    untrained = GPT.from_checkpoint(first).to(device)
    torch.manual_seed(0)
    untrained.init_weights()  # the same shape, as train.py starts it
    trigram = None
    if data is not None:
        with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            meta = prepare.prepare(dict(dataset=data, data_dir=tmp, val_fraction=0.05, force=False,
                                        vocab_size=first["config"]["vocab_size"]))
            train_ids = np.fromfile(os.path.join(tmp, "train.bin"), dtype="<u2").astype(np.int64)
        if meta["vocab"] == first["vocab"]:
            trigram = trigram_logprob(train_ids, enc, meta["vocab_size"])
    models = {path: GPT.from_checkpoint(checkpoint.load(path)).to(device) for path in checkpoints}
    columns = {}
    for split in ("dev", "held-out"):
        items = probes.make_items(split)
        columns[f"untrained, {split}"] = probes.accuracy(items, probes.model_logprob(untrained, enc, device))
        if trigram is not None:
            columns[f"trigram counts, {split}"] = probes.accuracy(items, trigram)
        for path, model in models.items():
            columns[f"{path}, {split}"] = probes.accuracy(items, probes.model_logprob(model, enc, device))
    print(f"probes: {len(probes.make_items('dev'))} items in each set, two candidates each (chance 50%); machine: "
          f"{machine()}")
    print("| kind | what | " + " | ".join(columns) + " |")
    print("|---|---|" + "---|" * len(columns))
    for kind, (what, _) in probes.KINDS.items():
        print(f"| {kind} | {what} | " + " | ".join(f"{100 * c[kind]:.0f}%" for c in columns.values()) + " |")
    print("| all | | " + " | ".join(f"**{100 * c['all']:.1f}%**" for c in columns.values()) + " |")
    copying = {name: probes.copy_check(model, enc, device)
               for name, model in {"untrained": untrained, **models}.items()}
    print("\ncopy check: nats/token on each held-out prefix (up to half the context) read once, then read again right "
          "after; a model that copies from its context reads it again almost free")
    print("| model | read once | read again |\n|---|---|---|")
    for name, (once, again) in copying.items():
        print(f"| {name} | {once:.2f} | {again:.2f} |")
    return columns, copying


# -----------------------------------------------------------------------------
# hour: models given the same hour of a CPU, each scored at every evaluation (issue 38's curves)


# name -> (what, train.py flags). Steps are sized so that each row takes about an hour of one core's time (its
# process's CPU time, which a busy machine does not inflate as it does wall time) on an AMD EPYC Zen 4 with
# AVX512-BF16, at one thread, with six evaluations: a checkpoint every ~10 minutes.
TWELVE_M = ["--n_layer=6", "--n_head=6", "--n_embd=384", "--block_size=128", "--value_embed=True",
            "--learning_rate=0.02", "--min_lr=0.0", "--muon_weight_decay=0.1", "--compile=False"]
HOUR_ROWS = {
    "hour-12m": ("the default shape (6 x 384, context 128) with value embeddings, cpu_long's LR to zero and Muon decay",
                 [*TWELVE_M, "--batch_size=16", "--max_iters=1800", "--eval_interval=300"]),
    "hour-long": ("--preset=cpu_long's shape and recipe for the hour: --preset=cpu_hour",
                  ["--preset=cpu_long", "--max_iters=7200", "--eval_interval=1200"]),
}


def read_log(path):
    """The rows of a log.jsonl."""
    with open(path) as f:
        return [json.loads(line) for line in f]


def kept_steps(out):
    """The steps of the ckpt_<step>.pt checkpoints that --keep_checkpoints=True left in out, in order."""
    names = os.listdir(out) if os.path.isdir(out) else []
    return sorted(int(n[5:-3]) for n in names if re.fullmatch(r"ckpt_\d+\.pt", n))


def score_checkpoint(path, whole=True, stories=2, story_tokens=120):
    """Bits/byte on the whole validation split and the held-out probes per kind; if whole, also the dev probes, the
    copy check and a few stories (sample.py's settings, fixed seeds): for a 12M model on one core, 2 minutes more."""
    import torch

    import checkpoint
    import probes
    from model import GPT
    from sample import short_story
    from tokenizer import get_tokenizer

    out, name = os.path.split(path)
    bpb, nats = scores(run_script("train.py", f"--out_dir={out}", f"--checkpoint={name}", "--init_from=resume",
                                  "--eval_only=True", "--device=cpu"))
    ckpt = checkpoint.load(path)
    device = torch.device("cpu")
    model, enc = GPT.from_checkpoint(ckpt).to(device), get_tokenizer(ckpt["vocab"])
    logprob = probes.model_logprob(model, enc, device)
    scored = dict(bits_per_byte=bpb, nats=nats, step=ckpt["step"])
    scored["probes"] = {split: probes.accuracy(probes.make_items(split), logprob)
                        for split in (PROBE_SETS if whole else PROBE_SETS[:1])}
    if whole:
        scored["copy"] = probes.copy_check(model, enc, device)
        scored["stories"] = [short_story(model, enc, story_tokens, seed, contextlib.nullcontext())
                             for seed in range(stories)]
    return scored


def bench_hour(data, rows, out, plot="cpu_hour.png"):
    """Each row trained for its hour (or found finished in out/<row>), every evaluation's checkpoint scored; a table
    per row, the probes per kind of each row's last checkpoint, and a plot of bits/byte and the held-out probes
    against minutes and tokens. Scores are kept in out/<row>/scores.json."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import prepare
    import probes

    data_dir = os.path.join(out, "data_4096")
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        prepare.prepare(dict(dataset=data, data_dir=data_dir, val_fraction=0.05, force=False, vocab_size=4096))
    print(f"hour: trained on the train files of {data}, scored on every token of its validation file, on both "
          f"probe sets and the copy check; machine: {machine()}, {os.environ.get('OMP_NUM_THREADS', 'all')} threads")
    curves = {}
    for name in rows:
        what, flags = HOUR_ROWS[name]
        row_dir = os.path.join(out, name)
        if not os.path.exists(os.path.join(row_dir, "done")):  # a finished row is kept as it is
            with open(os.path.join(row_dir + ".out"), "w") as stdout:  # the bar goes to the terminal, on stderr
                run = subprocess.run([sys.executable, os.path.join(HERE, "train.py"), *flags, f"--data_dir={data_dir}",
                                      f"--out_dir={row_dir}", "--init_from=scratch", "--keep_checkpoints=True"],
                                     stdout=stdout)
            if run.returncode:
                sys.exit(f"error: bench.py hour's row {name} failed (exit status {run.returncode}): see {row_dir}.out")
            open(os.path.join(row_dir, "done"), "w").close()
        scores_path = os.path.join(row_dir, "scores.json")
        scored = json.load(open(scores_path)) if os.path.exists(scores_path) else {}
        logged = {r["step"]: r for r in read_log(os.path.join(row_dir, "log.jsonl")) if "val_loss" in r}
        # the last checkpoint first and whole (it answers); the others on bits/byte and the held-out probes
        steps = kept_steps(row_dir)
        for step in reversed(steps):
            if str(step) not in scored or (step == steps[-1] and "copy" not in scored[str(step)]):
                scored[str(step)] = score_checkpoint(os.path.join(row_dir, f"ckpt_{step}.pt"), step == steps[-1])
                write_json(scores_path, scored)
        tokens_per_step = logged[max(logged)]["tokens"] // max(max(logged), 1)
        print(f"\n{name}: {what}")
        print("| step | core-minutes | wall minutes | tokens | bits/byte | probes held-out | probes dev | copy: read "
              "once | read again |")
        print("|---|---|---|---|---|---|---|---|---|")
        curve = curves[name] = []
        for step in sorted(map(int, scored)):
            s = scored[str(step)]
            # a core's minutes: the process's CPU time at one thread, which other work on the machine does not inflate
            minutes, wall, tokens = logged[step]["cpu"] / 60, logged[step]["elapsed"] / 60, step * tokens_per_step
            curve.append((minutes, tokens, s["bits_per_byte"], s["probes"]["held-out"]["all"]))
            dev = f"{100 * s['probes']['dev']['all']:.1f}%" if "dev" in s["probes"] else ""
            copy = " | ".join(f"{nats:.2f}" for nats in s["copy"]) if "copy" in s else " | "
            print(f"| {step} | {minutes:.1f} | {wall:.1f} | {tokens / 1e6:.2f}M | {s['bits_per_byte']:.3f} | "
                  f"{100 * s['probes']['held-out']['all']:.1f}% | {dev} | {copy} |")
        print(f"its last checkpoint writes: {s['stories'][0]!r}")
    last = {name: json.load(open(os.path.join(out, name, "scores.json"))) for name in rows}
    last = {name: s[max(s, key=int)] for name, s in last.items()}
    print("\nprobes per kind at each row's last checkpoint (held-out / dev)")
    print("| kind | " + " | ".join(rows) + " |\n|---|" + "---|" * len(rows))
    for kind in [*probes.KINDS, "all"]:
        print(f"| {kind} | " + " | ".join(f"{100 * s['probes']['held-out'][kind]:.0f} / "
                                         f"{100 * s['probes']['dev'][kind]:.0f}%" for s in last.values()) + " |")
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for name, curve in curves.items():
        minutes, tokens, bpb, held_out = zip(*curve)
        for col, x in enumerate((minutes, [t / 1e6 for t in tokens])):
            axes[0][col].plot(x, bpb, marker="o", label=name)
            axes[1][col].plot(x, [100 * p for p in held_out], marker="o", label=name)
    for col, xlabel in enumerate(("minutes of one core (CPU time)", "tokens seen (millions)")):
        # an untrained model's ~3.1 would flatten the rest: it stays above the top
        axes[0][col].set(xlabel=xlabel, ylabel="bits/byte, validation (untrained: above the top)", ylim=(None, 1.5))
        axes[1][col].set(xlabel=xlabel, ylabel="held-out probes right (%)")
        axes[1][col].axhline(50, color="gray", linestyle=":", label="chance")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.suptitle("the same hour of one CPU core, each model scored at every checkpoint")
    fig.tight_layout()
    fig.savefig(plot, dpi=100)
    print(f"wrote {plot}")
    return curves


def write_json(path, value):
    from files import write_atomically
    write_atomically(path, lambda f: json.dump(value, f, indent=1), mode="w")


# -----------------------------------------------------------------------------
# llama: the exported GGUF file in llama.cpp beside the project, on the same checkpoint and machine


def bench_llama(checkpoint_path, data=None, windows=16, repeats=3):
    """
    The checkpoint exported with `export.py --format=gguf` (float32 and float16) and run by llama.cpp
    (llama-cpp-python): how far its logits are from model.py's on validation stories (or the demo corpus), whether
    its greedy tokens are sample.py's, and its tokens/s at batch 1 beside sample.py's path, up to the end of the
    context (llama.cpp cannot go past it), the best of `repeats`.
    """
    import llama_cpp
    import torch

    import checkpoint
    import config
    import export
    import sample
    import sources
    from tokenizer import get_tokenizer

    from model import GPT

    ckpt = checkpoint.load(checkpoint_path)
    model = GPT.from_checkpoint(ckpt).eval()
    enc = get_tokenizer(ckpt["vocab"])
    T = model.config.block_size
    text_source = data if data is not None else sources.DEMO_CORPUS
    rows = [[enc.eot_token] + enc.encode_ordinary(s)[:T - 1] for s in read_stories(text_source)]
    rows = [r for r in rows if len(r) == T][:windows]
    prompt = [enc.eot_token] + enc.encode_ordinary(PROMPT)
    n = T - len(prompt)
    threads = torch.get_num_threads()
    print(f"llama: {checkpoint_path} ({model.config.n_layer} layers, {model.config.n_embd} wide, context {T}) in "
          f"llama.cpp {llama_cpp.__version__} and in sample.py, {threads} threads; machine: {machine()}")
    print("| run | largest logit difference (largest logit) | greedy tokens equal to sample.py's | tokens/s, batch 1 |")
    print("|---|---|---|---|")
    cfg = {**config.SAMPLING, "max_new_tokens": n, "temperature": 0.0, "stop_at_eot": False}

    def sample_py():
        return sample.generate_text(model, enc, prompt, cfg, None)
    story = sample_py()  # (and a warm-up)
    best = min(timed(sample_py)[0] for _ in range(repeats))
    results = {"sample.py": dict(tokens_per_s=n / best)}
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in ("float32", "float16"):
            folder = os.path.join(tmp, dtype)
            with contextlib.redirect_stdout(io.StringIO()):
                export.main([f"--out_dir={os.path.dirname(checkpoint_path)}", f"--checkpoint={os.path.basename(checkpoint_path)}",
                             f"--export_dir={folder}", "--format=gguf", f"--dtype={dtype}"])
            llm = llama_cpp.Llama(os.path.join(folder, export.GGUF_FILE), n_ctx=T, logits_all=True, verbose=False,
                                  n_threads=threads)
            worst, largest = 0.0, 0.0
            for row in rows:
                llm.reset()
                llm.eval(row)
                theirs = torch.tensor(np.array(llm.scores[:T]))
                with torch.no_grad():
                    logits = model(torch.tensor([row]))[0][0, :, :model.config.vocab_size]
                worst, largest = max(worst, (theirs - logits).abs().max().item()), max(largest, logits.abs().max().item())

            def llama_generate():
                return list(itertools.islice(llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0), n))
            llama_generate()
            seconds, tokens = min((timed(llama_generate) for _ in range(repeats)), key=lambda r: r[0])
            same = enc.decode(tokens) == story
            llm.close()
            results[f"llama.cpp {dtype}"] = dict(tokens_per_s=n / seconds, worst=worst, largest=largest, same=same)
            print(f"| llama.cpp, GGUF {dtype} | {worst:.1e} ({largest:.1f}) | {'yes' if same else 'no'} | "
                  f"{n / seconds:,.0f} |")
    print(f"| sample.py (its own loop, KV cache, each token decoded) | | | {results['sample.py']['tokens_per_s']:,.0f} |")
    print(f"{len(rows)} windows of {T} tokens from {text_source}; {n} tokens generated after a {len(prompt)}-token prompt")
    return results


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


# -----------------------------------------------------------------------------
# gpu: every figure a lent GPU is for, in one run

TINY_SHAPE = dict(n_layer=2, n_head=2, n_embd=32, block_size=16)  # the CPU's stand-in for the default model


def bench_gpu(out, data=None, device=None, train_seconds=120):
    """
    On a CUDA machine, in about 5 minutes: the CUDA tests; the default model's compiled step (bf16, fp16 before
    compute capability 8.0) at growing batches (compile time, tokens/s, MFU against the GPU's dense bf16 peak, peak memory); then the default recipe
    trained for about train_seconds on `data` (a data_dir prepare.py wrote) beside nanoGPT's AdamW recipe for the
    same steps, both scored on the whole validation split. Prints one table and writes it to out/gpu.json. On a
    CPU the same run takes a tiny model and the demo corpus, in about a minute, so the path is tested before a
    GPU is lent.
    """
    import torch

    import config
    import prepare
    import runtime
    import sources
    from model import GPTConfig

    device = device or default_device()
    gpu = device.type == "cuda"
    shape = {} if gpu else TINY_SHAPE
    report = dict(device=device_name(device), torch=torch.__version__, model=shape or "default")
    print(f"gpu: {report['device']}, torch {report['torch']}")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider",
                        os.path.join(HERE, "test_all.py")], capture_output=True, text=True, cwd=HERE)
    report["cuda_tests"] = (r.stdout.strip().splitlines() or [f"exit status {r.returncode}"])[-1]
    print(f"CUDA tests: {report['cuda_tests']}")

    model_config = GPTConfig(**shape)
    peak = runtime.peak_flops(device) or (None if gpu else 1e12)  # a CPU has no listed peak: a stand-in one
    batch = 64 if gpu else 4
    report["dtype"] = runtime.autocast_context(device, "auto", training=True)[1] if gpu else "bfloat16"
    speed = bench_train(device, model_config, dtype=report["dtype"], compile=True, batch_size=batch,
                        steps=20 if gpu else 2, sweep=(16, 32, 64, 128, 256, 512) if gpu else (batch,), peak_flops=peak)
    report["compile_seconds"] = speed["compile_seconds"]
    report["sweep"] = [dict(batch=b, tokens_per_s=r, mfu=m, peak_gib=g) for b, r, m, g in speed["sweep"]]
    rate = next((r for b, r, _, _ in speed["sweep"] if b == batch), max(speed["rates"].values()))

    with tempfile.TemporaryDirectory() as tmp:
        if data is None:  # the demo corpus: enough to run the path, not to learn English
            data = os.path.join(tmp, "data")
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                prepare.prepare(dict(dataset=sources.DEMO_CORPUS, data_dir=data, val_fraction=0.05, force=False,
                                     vocab_size=config.DATA["vocab_size"]))
        flags = [f"--{k}={v}" for k, v in shape.items()] + [f"--batch_size={batch}", f"--data_dir={data}"]
        steps = max(10, min(5000, round(train_seconds * rate / (batch * model_config.block_size))))
        report["training"] = []
        for name, recipe in (("the default recipe (Muon + AdamW)", []),
                             ("nanoGPT's AdamW (6e-4, cosine to 6e-5)", ["--optimizer=adamw", "--learning_rate=6e-4",
                                                                         "--min_lr=6e-5", "--momentum_warmup=0"])):
            run_dir = os.path.join(tmp, f"run{len(report['training'])}")
            start = time.time()
            run_script("train.py", *flags, *recipe, f"--max_iters={steps}", f"--out_dir={run_dir}")
            seconds = time.time() - start
            bpb, nats = scores(run_script("train.py", f"--out_dir={run_dir}", "--init_from=resume", "--eval_only=True"))
            report["training"].append(dict(recipe=name, steps=steps, tokens=steps * batch * model_config.block_size,
                                           seconds=seconds, bits_per_byte=bpb, nats_per_token=nats))
    print(f"\n| {report['device']} | figure |\n|---|---|")
    print(f"| CUDA tests | {report['cuda_tests']} |")
    print(f"| torch.compile, the first step | {report['compile_seconds']:.0f} s |")
    for s in report["sweep"]:
        print(f"| batch {s['batch']} x {model_config.block_size}, {report['dtype']}, compiled | {s['tokens_per_s']:,.0f} tokens/s, "
              f"MFU {100 * s['mfu']:.1f}%, peak memory {s['peak_gib']:.1f} GiB |")
    for t in report["training"]:
        print(f"| {t['recipe']}: {t['steps']} steps, {t['tokens'] / 1e6:.1f}M tokens in {t['seconds']:.0f} s | "
              f"{t['bits_per_byte']:.3f} bits/byte ({t['nats_per_token']:.3f} nats/token) |")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "gpu.json"), "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {os.path.join(out, 'gpu.json')}")
    return report


def main(argv):
    sections = [a for a in argv if not a.startswith("--")] or ["prepare", "train", "sample"]
    options = dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)
    unknown = set(options) - {"data", "rows", "nanogpt", "out", "checkpoint"}
    if unknown or any(a.startswith("--") and "=" not in a for a in argv):
        sys.exit(f"error: bench.py takes --data=, --rows=, --nanogpt= and --out=, not {', '.join(sorted(unknown)) or argv}")
    table = HOUR_ROWS if "hour" in argv else QUALITY_ROWS  # the rows --rows picks from
    rows = options.get("rows", ",".join(HOUR_ROWS if "hour" in argv else DEFAULT_ROWS)).split(",")
    rows = list(table) if rows == ["all"] else rows
    if set(rows) - set(table):
        sys.exit(f"error: unknown --rows={','.join(sorted(set(rows) - set(table)))}: choose from "
                 f"{', '.join(table)} or all")
    for section in sections:
        if section not in ("vocab", "prepare", "train", "sample", "quality", "sizes", "probes", "llama", "gpu",
                           "hour"):
            sys.exit(f"error: unknown section {section!r}: choose vocab, prepare, train, sample, quality, sizes, "
                     f"probes, llama, gpu or hour")
        if section in ("probes", "llama") and "checkpoint" not in options:
            sys.exit(f"error: bench.py {section} needs --checkpoint=PATH: a checkpoint train.py wrote")
        if section == "hour" and "out" not in options:
            sys.exit("error: bench.py hour needs --out=DIR: where each row's run and checkpoints are kept")
        if section in ("vocab", "prepare", "quality", "sizes", "hour") and "data" not in options:
            sys.exit(f"error: bench.py {section} needs --data=PATH: a folder of TinyStories .txt(.gz) files named "
                     f"*train* and *valid* (README: your own data)")
    for section in sections:
        if section == "vocab":
            bench_vocab(options["data"])
        elif section == "prepare":
            bench_prepare(options["data"])
        elif section == "train":
            bench_train()
            if default_device().type == "cpu":  # and the model a CPU trains: --preset=cpu's, at its batch
                import config
                from model import GPTConfig

                cpu = config.presets["cpu"]
                print()
                bench_train(model_config=GPTConfig(**{k: cpu.get(k, v) for k, v in config.MODEL.items()}),
                            batch_size=cpu["batch_size"], steps=10)
            if "nanogpt" in options:
                print()
                bench_nanogpt(options["nanogpt"])
        elif section == "sample":
            bench_sample()
        elif section == "quality":
            bench_quality(options["data"], rows, keep=options.get("out"))
        elif section == "sizes":
            bench_sizes(options["data"], keep=options.get("out"))
        elif section == "probes":
            bench_probes(options["checkpoint"].split(","), options.get("data"))
        elif section == "llama":
            bench_llama(options["checkpoint"], options.get("data"))
        elif section == "hour":
            bench_hour(options["data"], rows, options["out"])
        else:
            bench_gpu(options.get("out", "bench_gpu"), options.get("data"))
        print()


if __name__ == "__main__":
    main(sys.argv[1:])
