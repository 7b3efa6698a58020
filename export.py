"""
Export a trained model where people run small models: a folder Hugging Face transformers loads as GPT-2, or one
GGUF file that llama.cpp (and the tools built on it) runs. Offline, both.

    python export.py                                       # out/ckpt.pt -> out/hf/, for transformers
    python export.py --format=gguf                         # out/ckpt.pt -> out/gguf/model.gguf, for llama.cpp
    python export.py --format=gguf --dtype=float16         # half the size
    python export.py --checkpoint=best.pt --export_dir=my-stories-model

The model is GPT-2's architecture, so transformers' own GPT2LMHeadModel and llama.cpp's gpt2 run it unchanged; with
value embeddings (as the CPU presets train) the transformers folder has a model type of its own and carries the few
lines that add them (hf_value_embed.py, trust_remote_code=True), and llama.cpp cannot run it. The transformers
folder holds config.json, model.safetensors, generation_config.json and the tokenizer in GPT-2's format (vocab.json
and merges.txt, restricted to the checkpoint's vocabulary and numbered as the model numbers it); the GGUF file holds
the same weights and tokenizer. test_all.py checks that transformers and llama.cpp compute the same token ids, logits
and greedy stories as this project.
"""
import errno
import json
import os
import shutil
import sys
import tempfile

import torch
from safetensors.torch import save as safetensors_bytes

import checkpoint
from config import SAMPLING, SCRIPTS, UserError, get_config
from model import GPT
from tokenizer import gpt2_merges, read_packaged

# Every file export() writes. A folder holding only these, with MARKER in its config.json or in the GGUF file's
# metadata, is an earlier export that may be replaced; export.py never replaces anything else.
FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer_config.json", "vocab.json",
         "merges.txt", "modeling_tinystories_gpt.py")
REMOTE_CODE = FILES[-1]  # hf_value_embed.py, in a folder of a model with value embeddings
GGUF_FILE = "model.gguf"
MARKER = "tinystories_gpt"


def export(cfg):
    """Write the checkpoint cfg names in cfg["format"]; returns the folder's path."""
    path = checkpoint.find(cfg)
    export_dir = export_path(cfg)
    ckpt = checkpoint.load(path)
    model = GPT.from_checkpoint(ckpt)
    if model.config.value_embed and cfg["format"] == "gguf":
        raise UserError(f"{path} has value embeddings (--value_embed=True, as the CPU presets train), which "
                        f"llama.cpp's GPT-2 lacks: export it for transformers (python export.py), or train with "
                        f"--value_embed=False")
    check_export_dir(export_dir)
    try:  # from the same two files tokenizer.py builds its encoding from, checked against the same hashes
        tokenizer = (token_strings if cfg["format"] == "gguf" else tokenizer_files)(ckpt["vocab"])
    except (ImportError, ValueError) as e:
        raise UserError(f"cannot read GPT-2's tokenizer files: {e}")
    provenance = {"checkpoint": cfg["checkpoint"], "step": ckpt.get("step")}
    dtype = torch.float16 if cfg["dtype"] == "float16" else torch.float32
    if cfg["format"] == "gguf":
        n = write_gguf(model, tokenizer, export_dir, dtype, provenance)
        what = f"{os.path.join(export_dir, GGUF_FILE)}: GPT-2 for llama.cpp"
    else:
        n = write_transformers(model, tokenizer, export_dir, dtype, provenance)
        what = f"{export_dir}: GPT-2 for transformers" + (" (trust_remote_code=True: value embeddings)"
                                                          if model.config.value_embed else "")
    print(f"wrote {what}, {n:,} weights in {str(dtype).removeprefix('torch.')} and a {model.config.vocab_size:,}-token "
          f"vocabulary from {path}")
    return export_dir


def export_path(cfg):
    return cfg["export_dir"] or os.path.join(cfg["out_dir"], "gguf" if cfg["format"] == "gguf" else "hf")


# -----------------------------------------------------------------------------
# transformers: GPT2LMHeadModel's weights, config and tokenizer files


def gpt2_weights(model, dtype):
    """model.py's weights under GPT2LMHeadModel's names and in its layout."""
    c = model.config
    sd = model.state_dict()
    out = {"transformer.wte.weight": sd["wte.weight"][:c.vocab_size],  # the padded rows are never used
           "transformer.wpe.weight": sd["wpe.weight"]}
    for name, w in sd.items():
        if name.startswith(("h.", "ln_f.")):
            # GPT-2 uses a Conv1D that stores a Linear's (out, in) weight transposed, as (in, out); with value
            # embeddings, hf_value_embed.py wraps c_attn, and holds each layer's gate beside it
            name = name.replace("attn.c_attn.", "attn.c_attn.c_attn.") if c.value_embed else name
            out["transformer." + name.replace("attn.ve_gate", "attn.c_attn.ve_gate")] = w.t() if w.dim() == 2 else w
    if c.value_embed:
        out["vte.weight"] = sd["vte.weight"][:c.vocab_size]
    for name, w in list(out.items()):
        if name.startswith(("transformer.h.", "transformer.ln_f.")) and name.endswith(".weight"):
            # GPT-2 has a bias in every Linear and LayerNorm: zeros compute what a model without them does
            out.setdefault(name[:-len("weight")] + "bias", torch.zeros(w.size(-1), dtype=w.dtype))
    # safetensors wants every tensor contiguous and owning its storage (not a slice of a bigger one)
    return {k: v.detach().to("cpu", dtype).contiguous().clone() for k, v in out.items()}


def gpt2_config(model, dtype, provenance):
    """config.json: transformers' GPT2Config fields for this model."""
    c = model.config
    eot = c.vocab_size - 1  # <|endoftext|> is the last id of every vocabulary
    architecture = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}
    if c.value_embed:  # transformers' GPT-2 and the code in hf_value_embed.py, which the folder carries: a model
        # type of its own, which transformers refuses to load without trust_remote_code=True, never as plain GPT-2
        code = REMOTE_CODE.removesuffix(".py")
        architecture = {"architectures": ["GPT2WithValueEmbeddings"], "model_type": "gpt2_value_embed",
                        "auto_map": {"AutoConfig": f"{code}.GPT2WithValueEmbeddingsConfig",
                                     "AutoModelForCausalLM": f"{code}.GPT2WithValueEmbeddings"}}
    return {
        **architecture,
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
        "dtype": str(dtype).removeprefix("torch."),
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


def token_strings(vocab):
    """(the vocabulary's tokens as GPT-2 writes them, in the model's id order; its merges, "left right", in rank
    order). GPT-2 spells each token's bytes as printable characters (a space is "Ġ"); a compact vocabulary keeps its
    tokens and the merges that make them (each one's two parts are kept too). None: GPT-2's own."""
    names = {gpt2_id: name for name, gpt2_id in json.loads(read_packaged("encoder.json")).items()}
    vocab = range(len(names)) if vocab is None else vocab
    kept = set(vocab)
    merges = [f"{names[left]} {names[right]}" for left, right, merged in gpt2_merges() if merged in kept]
    return [names[t] for t in vocab], merges


def tokenizer_files(vocab):
    """vocab.json and merges.txt, transformers' GPT-2 tokenizer files: GPT-2's own (its encoder.json and vocab.bpe,
    as they are), or the compact vocabulary's."""
    if vocab is None:
        return read_packaged("encoder.json"), read_packaged("vocab.bpe")
    tokens, merges = token_strings(vocab)
    encoder = json.dumps({token: i for i, token in enumerate(tokens)}, ensure_ascii=False)
    return encoder, "\n".join(["#version: 0.2", *merges]) + "\n"


def write_transformers(model, tokenizer, export_dir, dtype, provenance):
    """The transformers folder for `model` and its tokenizer_files(); returns how many weights it holds."""
    encoder, merges = tokenizer
    weights = gpt2_weights(model, dtype)
    as_json = lambda d: (json.dumps(d, indent=2) + "\n").encode()
    files = {
        "config.json": as_json(gpt2_config(model, dtype, provenance)),
        "generation_config.json": as_json(generation_config(model.config.vocab_size - 1)),
        "model.safetensors": safetensors_bytes(weights, metadata={"format": "pt"}),
        "tokenizer_config.json": as_json(tokenizer_config(model)),
        "vocab.json": encoder.encode(),
        "merges.txt": merges.encode(),
    }
    if model.config.value_embed:
        with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf_value_embed.py"), "rb") as f:
            files[REMOTE_CODE] = f.read()
    write_folder(export_dir, files)
    return sum(w.numel() for w in weights.values())


# -----------------------------------------------------------------------------
# GGUF: llama.cpp's gpt2, written with the gguf package (llama.cpp's own writer of the format)


def gguf_tensors(model, dtype):
    """{GGUF name: array} in llama.cpp's gpt2 layout. A Linear's (out, in) weight is already the (in, out) matrix
    llama.cpp reads: GGUF lists a tensor's dimensions innermost first. llama.cpp's gpt2 has a bias in every
    Linear and LayerNorm, so zeros stand in for absent ones; the embedding loses its padding rows."""
    c = model.config
    sd = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
    names = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
             "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
    out = {"token_embd.weight": sd["wte.weight"][:c.vocab_size], "position_embd.weight": sd["wpe.weight"]}
    # (no "output": llama.cpp's gpt2 then scores tokens with token_embd, tied as in model.py)
    pairs = [("ln_f", "output_norm")] + [(f"h.{i}.{ours}", f"blk.{i}.{theirs}") for i in range(c.n_layer)
                                         for ours, theirs in names.items()]
    for ours, theirs in pairs:
        weight = sd[f"{ours}.weight"]
        out[f"{theirs}.weight"] = weight
        out[f"{theirs}.bias"] = sd.get(f"{ours}.bias", torch.zeros(weight.size(0)))
    # llama.cpp keeps norms and biases in float32 whatever the file's type
    return {k: (v.to(dtype) if v.dim() == 2 else v).contiguous().numpy() for k, v in out.items()}


def write_gguf(model, tokenizer, export_dir, dtype, provenance):
    """export_dir/model.gguf for `model` and its token_strings(); returns how many weights it holds."""
    import gguf  # only here: nothing else needs it

    c = model.config
    eot = c.vocab_size - 1  # <|endoftext|> is the last id of every vocabulary
    tokens, merges = tokenizer
    tensors = gguf_tensors(model, dtype)

    def write(path):
        writer = gguf.GGUFWriter(path, arch="gpt2")
        writer.add_name("tinystories-gpt")
        writer.add_string(f"{MARKER}.provenance", json.dumps(provenance))
        writer.add_context_length(c.block_size)  # learned positions: llama.cpp must not go past them
        writer.add_embedding_length(c.n_embd)
        writer.add_feed_forward_length(4 * c.n_embd)
        writer.add_block_count(c.n_layer)
        writer.add_head_count(c.n_head)
        writer.add_layer_norm_eps(1e-5)  # nn.LayerNorm's
        writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == torch.float16 else gguf.LlamaFileType.ALL_F32)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("gpt-2")  # GPT-2's pre-tokenizer regex: without it llama.cpp splits text otherwise
        writer.add_token_list(tokens)
        writer.add_token_types([gguf.TokenType.NORMAL] * eot + [gguf.TokenType.CONTROL])
        writer.add_token_merges(merges)
        # every story follows an end-of-text token, as sample.py starts them: it begins and ends a sequence
        writer.add_bos_token_id(eot)
        writer.add_eos_token_id(eot)
        writer.add_add_bos_token(True)
        for name, array in tensors.items():
            writer.add_tensor(name, array)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    write_folder(export_dir, {GGUF_FILE: write})
    return sum(a.size for a in tensors.values())


# -----------------------------------------------------------------------------
# The folder: never replacing what export.py did not write, and replaced whole


def check_export_dir(path):
    """Refuse a file, or a folder holding anything export.py did not write: those are never replaced."""
    if not os.path.lexists(path):
        return
    if os.path.islink(path) or not os.path.isdir(path):
        raise UserError(f"--export_dir={path} is not a folder: pick another --export_dir")
    names = sorted(os.listdir(path))
    foreign = [n for n in names if n not in (*FILES, GGUF_FILE)]
    if not names or not foreign and is_marked(path, names):
        return  # empty, or an earlier export: it may be replaced
    raise UserError(f"{path} holds files export.py did not write ({', '.join((foreign or names)[:3])}): refusing "
                    f"to replace it; pick another --export_dir")


def is_marked(path, names):
    """Whether the folder's config.json or GGUF file says export.py wrote it."""
    try:
        if GGUF_FILE in names:
            import gguf

            return f"{MARKER}.provenance" in gguf.GGUFReader(os.path.join(path, GGUF_FILE)).fields
        with open(os.path.join(path, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and MARKER in config


def write_folder(path, files):
    """
    Write {file name: bytes, or a function that writes the file at the path it is given} as the folder `path`:
    first into a temporary folder beside it, then renamed into place, so a crash or a full disk leaves the earlier
    export (or nothing) whole. (A kill between the two renames below leaves the earlier export in
    .{name}.tmp-*.old beside it.)
    """
    parent, name = os.path.split(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
    umask = os.umask(0o22)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the export is an ordinary folder
    try:
        for file, data in files.items():
            if callable(data):
                try:
                    data(os.path.join(tmp, file))
                except OSError as e:
                    if e.errno is not None:
                        raise
                    # numpy (the GGUF writer's) says only that a write fell short: the OS refused the rest
                    raise OSError(errno.ENOSPC, f"the disk refused a write: full, or over a size limit ({e})", file)
            else:
                with open(os.path.join(tmp, file), "wb") as f:
                    f.write(data)
            with open(os.path.join(tmp, file), "rb+") as f:
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
