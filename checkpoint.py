"""
Checkpoints: what train.py writes so that a run can go on exactly where it stopped, and the one loader that
train.py, sample.py, export.py, bench.py and `--eval_only` share (model.py's GPT.from_checkpoint makes the model).

A checkpoint is a dict, loadable with torch.load(weights_only=True): the model's weights (the uncompiled model's),
its settings and vocabulary, and for ckpt.pt what the run needs to go on: the optimizers' state, the fp16 loss scale,
the step, the best validation loss, and every process's RNG states. It is written whole or not at all (files.py).
"""
import os
import shutil

import torch
import torch.distributed as dist

from config import MODEL, UserError, check_config
from files import write_atomically

VERSION = 2  # bump when what a checkpoint holds changes (2: the vocabulary travels with it)
RUN_KEYS = ("init_from", "eval_only", "checkpoint", "out_dir")  # what a command does, not the run's settings


def save(path, model, cfg, chosen, vocab, **extra):
    """The weights, the settings they were trained with (and which of them the user chose), the vocabulary, and
    whatever else the caller adds (step, optimizer, ...)."""
    state = dict(version=VERSION, model=model.state_dict(), vocab=vocab,
                 config={**cfg, "vocab_size": model.config.vocab_size}, chosen=sorted(chosen), **extra)
    write_atomically(path, lambda f: torch.save(state, f))


def keep_copy(path, step):
    """A copy of the checkpoint at path, as ckpt_<step>.pt beside it (--keep_checkpoints=True: one for each
    evaluation, which the next one's ckpt.pt replaces)."""
    with open(path, "rb") as saved:
        write_atomically(os.path.join(os.path.dirname(path), f"ckpt_{step}.pt"), lambda f: shutil.copyfileobj(saved, f))


def find(cfg):
    """The checkpoint --checkpoint names: a file in --out_dir (ckpt.pt, best.pt), or a path (out_cpu/best.pt)."""
    name = cfg["checkpoint"]
    return name if os.path.dirname(name) else os.path.join(cfg["out_dir"], name)


def load(path):
    """The checkpoint dict at path (GPT.from_checkpoint makes its model), or one line saying why not."""
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path}: train one first (python train.py)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, random bytes, or not a torch file at all
        raise UserError(f"{path} is not a readable checkpoint ({type(e).__name__}): truncated or corrupt?")
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise UserError(f"{path} is not a checkpoint written by train.py")
    if ckpt.get("version") != VERSION:
        raise UserError(f"{path} was written by another version of train.py (checkpoint version "
                        f"{ckpt.get('version', 1)}, this one reads {VERSION}): train it again")
    return ckpt


def refuse_to_replace(path):
    """A run that was not told --init_from stops where another run has saved: forgetting --init_from=resume must
    not cost hours of training."""
    if not os.path.exists(path):
        return
    try:
        what = f"a run at step {load(path)['step']}"
    except UserError:  # unreadable, or from another version: still not ours to replace
        what = "a checkpoint"
    raise UserError(f"{path} holds {what}: continue it with --init_from=resume, start over with --init_from=scratch "
                    f"(replacing its ckpt.pt, best.pt and log.jsonl), or train into another --out_dir")


def describe(ckpt, path):
    """The checkpoint as a script names it on loading it: 'out/ckpt.pt (step 1000, 0.987 bits/byte)', the bits per
    byte of the validation split at the latest evaluation (checkpoints written before train.py saved it have none)."""
    facts = [f"step {ckpt['step']}"] if "step" in ckpt else []
    if ckpt.get("bits_per_byte") is not None:
        facts.append(f"{ckpt['bits_per_byte']:.3f} bits/byte")
    return f"{path} ({', '.join(facts)})" if facts else path


def run_settings(cfg, chosen, ckpt, path):
    """
    The settings of the run and the keys the user chose (by flag or preset). A new run has cfg: the defaults, then
    the preset, then the flags. A resumed run goes on with the settings it was started with: the checkpoint's
    replace the defaults, and only what is chosen now replaces those; the model's shape cannot change. What the
    machine picks for one process (short evaluations on a CPU, compiling or not) is never a setting: runtime.py
    reads `chosen` for those, so a run resumed elsewhere picks again.
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


def check_vocab(ckpt, path, meta, data_dir):
    """A checkpoint trains on only the bins of its own vocabulary."""
    if ckpt["vocab"] != meta["vocab"]:
        raise UserError(f"{path} was trained on a {ckpt['config']['vocab_size']:,}-token vocabulary, but the bins in "
                        f"{data_dir}/ use another ({meta['vocab_size']:,} tokens): prepare them with "
                        f"--vocab_size={ckpt['config']['vocab_size']}, or point --data_dir at the bins it was trained on")


def rng_states(generator, device, world):
    """Every process's RNG states (its batch generator, and torch's, which dropout draws from): all processes call
    this together."""
    mine = dict(batch=generator.get_state(), torch=dict(
        cpu=torch.get_rng_state(), cuda=torch.cuda.get_rng_state(device) if device.type == "cuda" else None))
    if world == 1:
        return [mine]
    ranks = [None] * world
    dist.all_gather_object(ranks, mine)
    return ranks


def resume(ckpt, path, optimizers, scaler, generator, cfg, rank, world, device):
    """Go on from the checkpoint: its optimizer state, its fp16 loss scale and this process's RNG states. Returns
    (step, best val loss)."""
    try:
        load_optimizer_state(optimizers, ckpt["optimizer"])
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{path}: its optimizer state does not fit --optimizer={cfg['optimizer']}: resume with the "
                        f"optimizer it was trained with, or start from scratch")
    if scaler.is_enabled() and ckpt.get("scaler"):  # fp16 then and now (a bf16 or float32 run saved none)
        scaler.load_state_dict(ckpt["scaler"])
    step = ckpt["step"]
    if len(ckpt["ranks"]) == world:
        mine = ckpt["ranks"][rank]
        generator.set_state(mine["batch"])
        torch.set_rng_state(mine["torch"]["cpu"])
        if mine["torch"]["cuda"] is not None and device.type == "cuda":
            torch.cuda.set_rng_state(mine["torch"]["cuda"], device)
    else:  # each process draws anew, from a seed of its own for this step: the run goes on, not bit for bit
        generator.manual_seed(cfg["seed"] + rank + 1_000_003 * step)
        torch.manual_seed(cfg["seed"] + rank + 1_000_003 * step)
        if rank == 0:
            print(f"note: {path} was saved by {len(ckpt['ranks'])} processes, this run has {world}: every process "
                  f"draws its batches anew from here, so the run goes on but not exactly as it would have")
    return step, ckpt["best_val_loss"]


def load_optimizer_state(optimizers, states):
    """The checkpoint's moments and step counts, with this run's settings (weight decay, betas): load_state_dict
    would bring back the saved ones too, and a flag given on resume would silently do nothing."""
    for optimizer, state in zip(optimizers, states, strict=True):
        settings = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
        optimizer.load_state_dict(state)
        for group, ours in zip(optimizer.param_groups, settings, strict=True):
            group.update(ours)
