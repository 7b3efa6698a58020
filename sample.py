"""
Write stories with a trained model.

    python sample.py                                     # 3 stories from out/ckpt.pt
    python sample.py --start="Once upon a time, a frog"  # continue a prompt
    python sample.py --start=FILE:prompt.txt --temperature=0 --checkpoint=best.pt

Tokens are printed as they are made. The model shape comes from the checkpoint, never from the flags.
"""
import codecs
import sys

import torch

import checkpoint
from config import SAMPLING, SCRIPTS, UserError, get_config
from model import GPT, generate
from runtime import autocast_context, pick_device
from tokenizer import get_tokenizer


def read_prompt(start):
    """The prompt text: `start` itself, or the contents of the file after FILE:."""
    if not start.startswith("FILE:"):
        return start
    path = start[len("FILE:"):]
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise UserError(f"cannot read the prompt file {path}: {e.strerror}")
    except UnicodeDecodeError:
        raise UserError(f"the prompt file {path} is not UTF-8 text")
    if not text.strip():
        raise UserError(f"the prompt file {path} is empty")
    return text


def load_model(cfg, device):
    """The checkpoint's model, on device, and its tokenizer: the checkpoint's vocabulary. Which checkpoint it is, its
    step and its bits/byte, goes to stderr: stdout holds the stories alone."""
    path = checkpoint.find(cfg)
    ckpt = checkpoint.load(path)
    print(f"sampling {checkpoint.describe(ckpt, path)}", file=sys.stderr)
    return GPT.from_checkpoint(ckpt).to(device).eval(), get_tokenizer(ckpt["vocab"])


def generate_text(model, enc, prompt_ids, cfg, generator, out=None):
    """One story after prompt_ids; each piece is written to `out` as soon as it is whole UTF-8."""
    # a token can end in the middle of a multi-byte character: decode bytes incrementally, never per token
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    device = next(model.parameters()).device
    idx = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    pieces = []
    for token, _ in generate(model, idx, cfg["max_new_tokens"], cfg["temperature"], cfg["top_k"], cfg["top_p"],
                             generator):
        token = token.item()
        if token == enc.eot_token and cfg["stop_at_eot"]:
            break
        pieces.append(decoder.decode(enc.decode_single_token_bytes(token)))
        if out is not None:
            out.write(pieces[-1])
            out.flush()
    pieces.append(decoder.decode(b"", final=True))
    if out is not None:
        out.write(pieces[-1])
    return "".join(pieces)


@torch.no_grad()
def short_story(model, enc, max_new_tokens, seed, ctx, prompt="Once upon a time"):
    """The prompt and what the model writes after it, at this script's default settings and the given seed
    (train.py writes one at every evaluation)."""
    ids = [enc.eot_token] + enc.encode_ordinary(prompt)
    if len(ids) > model.config.block_size:  # a context too short for the prompt: a story from nothing
        ids, prompt = ids[:1], ""
    training = model.training
    model.eval()  # no dropout
    generator = torch.Generator(next(model.parameters()).device).manual_seed(seed)
    with ctx:
        story = generate_text(model, enc, ids, {**SAMPLING, "max_new_tokens": max_new_tokens}, generator)
    model.train(training)
    return prompt + story


def sample(cfg, out=sys.stdout):
    """Print (and return) cfg['num_samples'] stories."""
    prompt = read_prompt(cfg["start"])
    device = pick_device(cfg["device"])
    ctx, _ = autocast_context(device, cfg["dtype"])
    model, enc = load_model(cfg, device)
    # stories in the training data follow an end-of-text token: starting from one says "a new story begins"
    prompt_ids = [enc.eot_token] + enc.encode_ordinary(prompt)
    block_size = model.config.block_size
    if len(prompt_ids) > block_size:
        raise UserError(f"the prompt is {len(prompt_ids) - 1} tokens, longer than the model's context of "
                        f"{block_size - 1} tokens after the end-of-text token: shorten it")
    generator = torch.Generator(device=device).manual_seed(cfg["seed"])
    stories = []
    with ctx:
        for i in range(cfg["num_samples"]):
            if out is not None:
                out.write(prompt)
            stories.append(prompt + generate_text(model, enc, prompt_ids, cfg, generator, out))
            if out is not None:
                out.write("\n" + "-" * 40 + "\n" if i < cfg["num_samples"] - 1 else "\n")
    return stories


def main(argv):
    cfg, _ = get_config(argv, SCRIPTS["sample.py"], "sample.py")
    try:
        sample(cfg)
    except UserError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main(sys.argv[1:])
