"""
Every default of prepare.py, train.py, sample.py, export.py and serve.py, in one plain dict, and the --key=value parser.

    python train.py --batch_size=32 --learning_rate=3e-4 --compile=False
    python train.py --preset=cpu          # a named set of overrides, see `presets` below

Values are Python literals (3e-4, True, None, 'text'); a bare word is taken as a string.
"""
import ast
import difflib
import re
import sys

# Each group is the set of keys one part of the project reads; `config` below merges them.
DATA = dict(
    dataset="roneneldan/TinyStories",  # Hugging Face name, or a local .txt/.txt.gz/.jsonl/.json/.parquet file or dir
    val_fraction=0.05,  # a single local file: every round(1/val_fraction)-th story goes to validation
    vocab_size=4096,  # GPT-2's most used tokens in the train text (tokenizer.py); 50257 keeps all of GPT-2's
    force=False,  # prepare.py: rebuild the bins even if they are up to date
)
PATHS = dict(
    data_dir="data",  # train.bin, validation.bin, meta.json
    out_dir="out",  # checkpoints, log, loss curve
    # what sample.py, export.py and --eval_only read: ckpt.pt (latest) or best.pt in out_dir, or a path to a checkpoint
    checkpoint="ckpt.pt",
)
SYSTEM = dict(
    device="auto",  # auto picks cuda, then mps, then cpu
    # auto: bfloat16 on GPUs of compute capability 8.0 or later (A100, RTX 30xx, H100), float16 + grad scaler before
    # (T4, V100); bfloat16 for training on a CPU with bf16 dot products (AVX512-BF16, AMX), else float32;
    # export.py: float32 or float16 weights
    dtype="auto",
    compile=True,  # torch.compile on CUDA; on a CPU only if --compile=True is given (eager is faster there)
    seed=1337,
)
MODEL = dict(
    n_layer=6,
    n_head=6,
    n_embd=384,
    block_size=128,  # context length in tokens
    dropout=0.0,
    bias=False,  # biases in Linear and LayerNorm: no gain for small models, a little slower
    value_embed=False,  # a second token embedding added to the attention values of every layer (see model.py)
)
TRAINING = dict(
    init_from="scratch",  # 'scratch' or 'resume' (from out_dir/ckpt.pt)
    eval_only=False,  # with init_from=resume: score ckpt.pt on the whole validation split and exit
    batch_size=64,  # micro-batch size, sequences of block_size tokens
    gradient_accumulation_steps=1,  # micro-batches per optimizer step, on each DDP process
    max_iters=5000,  # optimizer steps
    # Muon + AdamW at these LRs trained this model fastest of the recipes tried (RESULTS.md, the default's recipe)
    optimizer="muon",  # muon: Muon for the blocks' matrices, AdamW for the rest; adamw: AdamW for everything
    learning_rate=0.02,  # AdamW's peak LR, after warmup (beside Muon: the embeddings'; AdamW alone: ADAMW_ALONE below)
    min_lr=0.002,  # AdamW's LR at the end of the cosine (above learning_rate it rises); Muon's ends at the same ratio
    muon_lr=0.02,  # Muon's peak LR, for the blocks' weight matrices; it follows the same schedule
    momentum_warmup=300,  # steps over which Muon's momentum rises from 0.85 to 0.95; 0: 0.95 from the start
    warmup_iters=-1,  # -1: 2% of max_iters
    lr_decay_iters=-1,  # -1: max_iters
    weight_decay=0.1,  # AdamW's, on its matrices and embeddings only (never norms, biases, or Muon's matrices)
    muon_weight_decay=0.0,  # Muon's, on the blocks' matrices; both shrink each weight by LR x decay a step
    beta1=0.9,
    beta2=0.95,
    grad_clip=1.0,  # max global grad norm; 0 disables
    eval_interval=250,  # steps between evaluations and checkpoints
    eval_iters=50,  # batches per split for each evaluation
    log_interval=10,  # steps between progress-bar updates (each costs a GPU sync)
    eval_sample=48,  # tokens of the story written at each evaluation, from "Once upon a time"; 0: none
    keep_checkpoints=False,  # also keep each evaluation's checkpoint as ckpt_<step>.pt (bench.py hour scores them)
)
SAMPLING = dict(
    start="",  # prompt text, or FILE:path; empty starts a fresh story (from EOT)
    num_samples=3,
    max_new_tokens=256,
    temperature=0.8,  # 0 = greedy
    top_k=200,  # keep the k most likely tokens; None keeps all
    top_p=0.95,  # keep the smallest set with this much probability; 1.0 keeps all
    stop_at_eot=True,  # end a story at the end-of-text token
)
EXPORT = dict(
    format="transformers",  # export.py: transformers (a GPT-2 folder) or gguf (one file for llama.cpp)
    export_dir="",  # where export.py writes; empty means {out_dir}/hf, or {out_dir}/gguf for gguf
)
SERVING = dict(
    host="127.0.0.1",  # serve.py listens here: this machine only; 0.0.0.0 is every network interface (it warns)
    port=8000,  # 0: any free port (its line says which)
    max_streams=2,  # stories written at once; each takes a share of the CPU or GPU
    max_waiting=16,  # requests that may wait for a turn; one more gets 429
)
# --optimizer=adamw: AdamW alone, the blocks' matrices too, at LRs of its own unless a flag sets them; learning_rate
# and min_lr above are AdamW's beside Muon, on the embeddings (RESULTS.md: AdamW alone)
ADAMW_ALONE = dict(learning_rate=3e-3, min_lr=3e-4)
config = {**DATA, **PATHS, **SYSTEM, **MODEL, **TRAINING, **SAMPLING, **EXPORT, **SERVING, "preset": ""}
# The keys each script reads
SCRIPTS = {
    "prepare.py": [DATA, ["data_dir"]],
    "train.py": [PATHS, SYSTEM, MODEL, TRAINING],
    "sample.py": [["out_dir", "checkpoint", "device", "dtype", "seed"], SAMPLING],
    "export.py": [["out_dir", "checkpoint", "dtype"], EXPORT],
    "serve.py": [["out_dir", "checkpoint", "device", "dtype"], SERVING],
}

# Named overrides, applied before any other flag: `--preset=cpu`.
presets = dict(
    # A 2-core laptop, in minutes. Every value won at equal compute against the bench.py quality rows RESULTS.md
    # lists beside it.
    cpu=dict(
        optimizer="muon", muon_lr=0.02,
        learning_rate=0.04, min_lr=0.004, weight_decay=0.0,  # the embeddings learn fastest without decay
        n_layer=4, n_head=4, n_embd=96,  # wider or deeper costs more steps than it gains, at this budget
        value_embed=True,
        batch_size=32, block_size=128,
        max_iters=1000,
        eval_interval=250, eval_iters=5, compile=False,
    ),
)
# For about 3x cpu's time: at that length a longer context, an LR ending at zero and Muon's weight decay pay
presets["cpu_long"] = {**presets["cpu"], "n_embd": 128, "batch_size": 16, "block_size": 256, "min_lr": 0.0,
                       "muon_weight_decay": 0.1, "max_iters": 2086, "eval_interval": 500}
# An hour of one core with bf16 dot products (52-54 core-minutes on an AMD EPYC Zen 4): cpu_long for 3.45x its steps.
# It beat a 13.8M model given the same hour, 0.820 bits/byte against 0.891, probes even (RESULTS.md, bench.py hour)
presets["cpu_hour"] = {**presets["cpu_long"], "max_iters": 7200, "eval_interval": 1200}


# What each key accepts beyond its type (parse_args checks that): key -> (test, what is valid). Every key has
# a rule, also those where any value of the right type will do; test_all.py walks through them all.
ANY = (lambda v: True, "any value")
rules = dict(
    dataset=(lambda v: v.strip() != "", "a Hugging Face dataset name or a local file or folder, not empty"),
    val_fraction=(lambda v: 0 < v < 1, "a fraction between 0 and 1, like 0.05"),
    force=ANY,
    data_dir=(lambda v: v.strip() != "", "a folder name, not empty"),
    out_dir=(lambda v: v.strip() != "", "a folder name, not empty"),
    checkpoint=(lambda v: v.strip() != "", "a file name in out_dir, like ckpt.pt or best.pt, or a path; not empty"),
    device=(lambda v: v in ("auto", "cpu", "cuda", "mps") or re.fullmatch(r"cuda:\d+", v),
            "one of auto, cpu, cuda, cuda:N, mps"),
    dtype=(lambda v: v in ("auto", "float32", "bfloat16", "float16"), "one of auto, float32, bfloat16, float16"),
    compile=ANY,
    seed=(lambda v: 0 <= v < 2**63, "an integer >= 0"),
    n_layer=(lambda v: v >= 1, "at least 1"),
    n_head=(lambda v: v >= 1, "at least 1"),
    n_embd=(lambda v: v >= 1, "at least 1"),
    block_size=(lambda v: v >= 1, "at least 1"),
    vocab_size=(lambda v: 257 <= v <= 50257, "between 257 (the 256 bytes and end-of-text) and 50257 (all of GPT-2's)"),
    dropout=(lambda v: 0 <= v < 1, "in [0, 1)"),
    bias=ANY,
    value_embed=ANY,
    momentum_warmup=(lambda v: v >= 0, ">= 0"),
    init_from=(lambda v: v in ("scratch", "resume"), "scratch or resume"),
    eval_only=ANY,
    batch_size=(lambda v: v >= 1, "at least 1"),
    gradient_accumulation_steps=(lambda v: v >= 1, "at least 1"),
    max_iters=(lambda v: v >= 1, "at least 1"),
    learning_rate=(lambda v: 0 < v < float("inf"), "a positive number"),
    min_lr=(lambda v: 0 <= v < float("inf"), "a number >= 0"),
    warmup_iters=(lambda v: v >= -1, "a number of steps >= 0, or -1 for 2% of max_iters"),
    lr_decay_iters=(lambda v: v == -1 or v >= 1, "a number of steps >= 1, or -1 for max_iters"),
    weight_decay=(lambda v: 0 <= v < float("inf"), "a number >= 0"),
    muon_weight_decay=(lambda v: 0 <= v < float("inf"), "a number >= 0"),
    beta1=(lambda v: 0 <= v < 1, "in [0, 1)"),
    beta2=(lambda v: 0 <= v < 1, "in [0, 1)"),
    grad_clip=(lambda v: 0 <= v < float("inf"), "a number >= 0 (0 disables clipping)"),
    optimizer=(lambda v: v in ("muon", "adamw"), "muon or adamw"),
    muon_lr=(lambda v: 0 < v < float("inf"), "a positive number"),
    eval_interval=(lambda v: v >= 1, "at least 1"),
    eval_iters=(lambda v: v >= 1, "at least 1"),
    log_interval=(lambda v: v >= 1, "at least 1"),
    eval_sample=(lambda v: v >= 0, "a number of tokens >= 0 (0 writes none)"),
    keep_checkpoints=ANY,
    start=ANY,
    num_samples=(lambda v: v >= 1, "at least 1"),
    max_new_tokens=(lambda v: v >= 1, "at least 1"),
    temperature=(lambda v: 0 <= v < float("inf"), "a number >= 0 (0 is greedy)"),
    top_k=(lambda v: v is None or v >= 1, "at least 1, or None to keep every token"),
    top_p=(lambda v: 0 < v <= 1, "in (0, 1]"),
    stop_at_eot=ANY,
    format=(lambda v: v in ("transformers", "gguf"), "transformers or gguf"),
    export_dir=(lambda v: v == "" or v.strip() != "", "a folder name, or empty for {out_dir}/hf or {out_dir}/gguf"),
    host=(lambda v: v.strip() != "", "an address to listen on, like 127.0.0.1 (this machine) or 0.0.0.0 (every interface)"),
    port=(lambda v: 0 <= v <= 65535, "a port from 1 to 65535, or 0 for any free one"),
    max_streams=(lambda v: v >= 1, "at least 1"),
    max_waiting=(lambda v: v >= 0, "a number of requests >= 0"),
    preset=(lambda v: v == "" or v in presets, f"one of {', '.join(presets)}"),
)
# Settings that make sense alone but not together: (keys, test, what is wrong). Checked when a script reads all the keys.
combinations = [
    (("n_embd", "n_head"), lambda c: c["n_embd"] % c["n_head"] == 0, "n_embd must be a multiple of n_head"),
    (("warmup_iters", "lr_decay_iters"), lambda c: c["lr_decay_iters"] == -1 or c["lr_decay_iters"] > max(c["warmup_iters"], 0),
     "lr_decay_iters must come after warmup_iters"),
    (("eval_only", "init_from"), lambda c: not c["eval_only"] or c["init_from"] == "resume",
     "scoring a trained model needs --init_from=resume"),
    (("format", "dtype"), lambda c: c["dtype"] in ("auto", "float32", "float16"),
     "export.py writes float32 (auto) or float16"),
]


def check_config(cfg):
    """Stop with one line (exit status 2) at the first value, or combination of values, that makes no sense."""
    for key, value in cfg.items():
        valid, what = rules[key]
        if not valid(value):
            usage_error(f"--{key}={value!r}: must be {what}")
    for keys, valid, what in combinations:
        if all(k in cfg for k in keys) and not valid(cfg):
            usage_error(f"{', '.join(f'--{k}={cfg[k]!r}' for k in keys)}: {what}")


class UserError(Exception):
    """A problem the user can fix (missing data, bad path, bad value): the scripts print it as one line."""


def usage_error(message):
    """A mistake on the command line: one line on stderr, exit status 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_value(text):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word such as --device=cpu


def get_config(argv, groups, script="this script"):
    """(settings, the keys the user chose): the defaults of the keys in `groups` (the dicts above, or lists of key
    names), then a preset's values, then the flags (parse_args), all checked by check_config."""
    cfg = {k: config[k] for g in groups for k in g}
    cfg["preset"] = ""
    chosen = parse_args(argv, cfg, script)
    cfg.update(chosen)
    alone = adamw_alone(cfg, argv)
    cfg.update(alone)
    check_config(cfg)
    return cfg, set(chosen) - set(alone)


def adamw_alone(cfg, argv):
    """The LRs of an AdamW-only run that neither a flag nor a preset made for AdamW alone sets: ADAMW_ALONE's."""
    if cfg.get("optimizer") != "adamw":
        return {}
    preset = presets.get(cfg["preset"], {})
    own = {arg[2:].partition("=")[0] for arg in argv} | (set(preset) if preset.get("optimizer") == "adamw" else set())
    return {k: v for k, v in ADAMW_ALONE.items() if k not in own}


def parse_args(argv, cfg, script="this script"):
    """The values argv sets: the preset's first, then each --key=value. Only keys of cfg are allowed."""
    if "--help" in argv or "-h" in argv:
        print(f"usage: python {script} [--key=value ...]\n\nkeys and defaults:")
        for k, v in cfg.items():
            print(f"  --{k}={v!r}")
        print(f"\npresets: {', '.join(presets)}")
        sys.exit(0)
    overrides, typed = {}, {}  # typed: the text of each flag, for the error line
    for arg in argv:
        key, eq, text = arg[2:].partition("=")
        if not arg.startswith("--") or not eq or not key:
            usage_error(f"malformed argument {arg!r}: expected --key=value")
        if key not in cfg:
            close = difflib.get_close_matches(key, cfg, n=3)
            hint = f"did you mean {', '.join('--' + c for c in close)}?" if close else f"see python {script} --help"
            readers = [name for name, groups in SCRIPTS.items() if any(key in g for g in groups)]
            if readers:
                hint = f"a setting of {' and '.join(readers)}, not of {script}"
            usage_error(f"unknown key --{key} for {script}: {hint}")
        # a string key takes the text as it is, so --start=42 is the prompt "42"
        overrides[key] = text if isinstance(config[key], str) else parse_value(text)
        typed[key] = text
    preset = overrides.get("preset", "")
    if preset and preset not in presets:
        usage_error(f"--preset={preset!r}: must be {rules['preset'][1]}")
    # a preset may set keys another script does not read; a flag given with it wins, and says so
    values = {k: v for k, v in presets.get(preset, {}).items() if k in cfg}
    for k in values.keys() & overrides.keys():
        if overrides[k] != values[k]:
            print(f"note: --{k}={overrides[k]!r} replaces --preset={preset}'s {values[k]!r}", file=sys.stderr)
    return {k: check_type(k, v, config[k], typed.get(k)) for k, v in {**values, **overrides}.items()}


def check_type(key, value, default, typed=None):
    """The value for `key`, with the type of its default: an int is fine where a float is expected, and a whole
    number written as a float (1e3) where an int is. `typed`: the flag's text, as the error line echoes it."""
    if isinstance(default, float) and type(value) is int:
        return float(value)
    if type(default) is int and type(value) is float and value.is_integer():
        return int(value)
    if value is None and key == "top_k":  # the one key where None means "off"
        return value
    if type(value) is not type(default):
        usage_error(f"--{key}={typed or repr(value)}: expected {type(default).__name__}, like {default!r}")
    return value
