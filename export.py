"""
Export a trained model to a folder that Hugging Face transformers loads as GPT-2, offline.

    python export.py                                       # out/ckpt.pt -> out/hf/
    python export.py --checkpoint=best.pt --export_dir=my-stories-model

    from transformers import pipeline
    generate = pipeline("text-generation", model="out/hf")
    print(generate("Once upon a time", max_new_tokens=50)[0]["generated_text"])

The model is GPT-2's architecture, so transformers' own GPT2LMHeadModel runs it unchanged. The folder holds
config.json, model.safetensors, generation_config.json and the tokenizer in GPT-2's format: GPT-2's vocab.json and
merges.txt, restricted to the checkpoint's vocabulary and numbered as the model numbers it. test_all.py checks
that transformers computes the same logits, greedy tokens and token ids as this project.
"""
import json
import os
import shutil
import sys
import tempfile

import torch
from safetensors.torch import save as safetensors_bytes

from config import SAMPLING, SCRIPTS, UserError, get_config
from model import load_checkpoint, model_from_checkpoint
from tokenizer import gpt2_merges, read_packaged

# Every file export() writes. A folder holding only these, with MARKER in its config.json, is an earlier export
# that may be replaced; export.py never replaces anything else.
FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer_config.json", "vocab.json",
         "merges.txt")
MARKER = "tinystories_gpt"


def gpt2_weights(model):
    """model.py's weights under GPT2LMHeadModel's names and in its layout."""
    c = model.config
    sd = model.state_dict()
    out = {"transformer.wte.weight": sd["wte.weight"][:c.vocab_size],  # the padded rows are never used
           "transformer.wpe.weight": sd["wpe.weight"]}
    for name, w in sd.items():
        if name.startswith(("h.", "ln_f.")):
            # GPT-2 uses a Conv1D that stores a Linear's (out, in) weight transposed, as (in, out)
            out["transformer." + name] = w.t() if w.dim() == 2 else w
    for name, w in list(out.items()):
        if name.startswith(("transformer.h.", "transformer.ln_f.")) and name.endswith(".weight"):
            # GPT-2 has a bias in every Linear and LayerNorm: zeros compute what a model without them does
            out.setdefault(name[:-len("weight")] + "bias", torch.zeros(w.size(-1), dtype=w.dtype))
    # safetensors wants every tensor contiguous and owning its storage (not a slice of a bigger one)
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in out.items()}


def gpt2_config(model, provenance):
    """config.json: transformers' GPT2Config fields for this model."""
    c = model.config
    eot = c.vocab_size - 1  # <|endoftext|> is the last id of every vocabulary
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": c.vocab_size,
        "n_positions": c.block_size,  # learned positions: the model cannot see further than block_size tokens
        "n_embd": c.n_embd,
        "n_layer": c.n_layer,
        "n_head": c.n_head,
        "n_inner": 4 * c.n_embd,
        "activation_function": "gelu_new",  # GELU's tanh approximation, as in model.py's MLP
        "layer_norm_epsilon": 1e-5,  # nn.LayerNorm's default
        "resid_pdrop": c.dropout,  # model.py uses one dropout rate everywhere (only fine-tuning sees it)
        "embd_pdrop": c.dropout,
        "attn_pdrop": c.dropout,
        "scale_attn_weights": True,  # 1 / sqrt(head size), as scaled_dot_product_attention does
        "bos_token_id": eot,
        "eos_token_id": eot,
        "tie_word_embeddings": True,
        "dtype": str(model.wte.weight.dtype).removeprefix("torch."),
        MARKER: provenance,  # says export.py wrote this folder, and from which checkpoint
    }


def generation_config(eot):
    """sample.py's defaults, so transformers' generate() and pipeline() sample as sample.py does."""
    return {
        "bos_token_id": eot,
        "eos_token_id": eot,  # a story ends at the end-of-text token, as with sample.py's stop_at_eot
        "pad_token_id": eot,  # GPT-2 has no padding token; this also keeps generate() from warning about it
        "do_sample": SAMPLING["temperature"] > 0,
        "temperature": SAMPLING["temperature"],
        "top_k": SAMPLING["top_k"],
        "top_p": SAMPLING["top_p"],
    }


def tokenizer_config(model):
    return {
        "tokenizer_class": "GPT2Tokenizer",
        "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "add_prefix_space": False,
        # stories in the training data follow an end-of-text token, and sample.py starts every prompt with one:
        # so does this tokenizer (and with it pipeline()); add_special_tokens=False gives the bare ids
        "add_bos_token": True,
        "model_max_length": model.config.block_size,
    }


def tokenizer_files(vocab):
    """vocab.json and merges.txt for the vocabulary (None: GPT-2's own files, as they are). GPT-2's encoder.json
    is transformers' vocab.json and its vocab.bpe is merges.txt; a compact vocabulary keeps its tokens, numbered
    as the model numbers them, and the merges that make them (each one's two parts are kept too)."""
    encoder, merges = read_packaged("encoder.json"), read_packaged("vocab.bpe")
    if vocab is None:
        return encoder, merges
    compact = {gpt2_id: i for i, gpt2_id in enumerate(vocab)}
    names = {gpt2_id: name for name, gpt2_id in json.loads(encoder).items()}
    encoder = json.dumps({names[t]: i for t, i in compact.items()}, ensure_ascii=False)
    kept = [f"{names[left]} {names[right]}" for left, right, merged in gpt2_merges() if merged in compact]
    return encoder, "\n".join(["#version: 0.2", *kept]) + "\n"


def check_export_dir(path):
    """Refuse a file, or a folder holding anything export.py did not write: those are never replaced."""
    if not os.path.lexists(path):
        return
    if os.path.islink(path) or not os.path.isdir(path):
        raise UserError(f"--export_dir={path} is not a folder: pick another --export_dir")
    names = sorted(os.listdir(path))
    foreign = [n for n in names if n not in FILES]
    if not names or not foreign and is_marked(os.path.join(path, "config.json")):
        return  # empty, or an earlier export: it may be replaced
    raise UserError(f"{path} holds files export.py did not write ({', '.join((foreign or names)[:3])}): refusing "
                    f"to replace it; pick another --export_dir")


def is_marked(config_json):
    try:
        with open(config_json) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and MARKER in config


def write_folder(path, files):
    """
    Write {file name: bytes} as the folder `path`: first into a temporary folder beside it, then renamed into
    place, so a crash or a full disk leaves the earlier export (or nothing) whole. (A kill between the two
    renames below leaves the earlier export in .{name}.tmp-*.old beside it.)
    """
    parent, name = os.path.split(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
    umask = os.umask(0o22)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the export is an ordinary folder
    try:
        for file, data in files.items():
            with open(os.path.join(tmp, file), "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())  # on disk before the rename makes it visible
        if os.path.exists(path):  # an earlier export (checked): moved aside, dropped once the new one is in place
            old = tmp + ".old"
            os.rename(path, old)
            try:
                os.rename(tmp, path)
            except OSError:
                os.rename(old, path)
                raise
            shutil.rmtree(old)
        else:
            os.rename(tmp, path)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)


def write_export(model, vocab, export_dir, provenance):
    """Write the folder for `model` and its vocabulary; returns how many weights it holds."""
    check_export_dir(export_dir)
    try:
        # from the same two files tokenizer.py builds its encoding from, checked against the same hashes
        encoder, merges = tokenizer_files(vocab)
    except (ImportError, ValueError) as e:
        raise UserError(f"cannot read GPT-2's tokenizer files: {e}")
    weights = gpt2_weights(model)
    as_json = lambda d: (json.dumps(d, indent=2) + "\n").encode()
    write_folder(export_dir, {
        "config.json": as_json(gpt2_config(model, provenance)),
        "generation_config.json": as_json(generation_config(model.config.vocab_size - 1)),
        "model.safetensors": safetensors_bytes(weights, metadata={"format": "pt"}),
        "tokenizer_config.json": as_json(tokenizer_config(model)),
        "vocab.json": encoder.encode(),
        "merges.txt": merges.encode(),
    })
    return sum(w.numel() for w in weights.values())


def export_path(cfg):
    return cfg["export_dir"] or os.path.join(cfg["out_dir"], "hf")


def export(cfg):
    """Write the checkpoint cfg names as a transformers folder; returns the folder's path."""
    path = os.path.join(cfg["out_dir"], cfg["checkpoint"])
    export_dir = export_path(cfg)
    ckpt = load_checkpoint(path)
    model = model_from_checkpoint(ckpt, path)
    if model.config.value_embed:
        raise UserError(f"{path} has value embeddings (--value_embed=True, as the CPU presets train), which GPT-2's "
                        f"architecture lacks: to export, train with --value_embed=False")
    n = write_export(model, ckpt["vocab"], export_dir, {"checkpoint": cfg["checkpoint"], "step": ckpt.get("step")})
    print(f"wrote {export_dir}: GPT-2 for transformers, {n:,} weights and a {model.config.vocab_size:,}-token "
          f"vocabulary from {path}")
    return export_dir


def main(argv):
    cfg, _ = get_config(argv, SCRIPTS["export.py"], "export.py")
    try:
        export(cfg)
    except UserError as e:
        sys.exit(f"error: {e}")
    except OSError as e:  # a full disk, say: the temporary folder is gone, an earlier export is untouched
        sys.exit(f"error: {e.strerror or e} ({e.filename}); {export_path(cfg)} is as it was")


if __name__ == "__main__":
    main(sys.argv[1:])
