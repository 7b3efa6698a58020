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


def prompt_ids(enc, prompt, block_size):
    """The prompt's tokens after an end-of-text token: stories in the training data follow one, so starting from
    one says "a new story begins". A prompt the context cannot hold is refused."""
    ids = [enc.eot_token] + enc.encode_ordinary(prompt)
    if len(ids) > block_size:
        raise UserError(f"the prompt is {len(ids) - 1} tokens, longer than the model's context of "
                        f"{block_size - 1} tokens after the end-of-text token: shorten it")
    return ids


def story_tokens(model, enc, prompt_ids, cfg, generator, top=5):
    """
    The story after prompt_ids, written by model.py's generate with cfg's settings, one token at a time. Yields
    (text, token, p, choices) for each: the text it adds to the story, its probability p, and the `top` most likely
    tokens at that point as (token, probability), most likely first. The probabilities are the model's own, before
    temperature, top-k and top-p narrow its choice. At the end-of-text token (with stop_at_eot) the story ends,
    that token adding no text; a story cut in the middle of a character ends with ("\ufffd", None, None, []).
    """
    # a token can end in the middle of a multi-byte character: decode bytes incrementally, never per token
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    device = next(model.parameters()).device
    idx = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    for token, logits in generate(model, idx, cfg["max_new_tokens"], cfg["temperature"], cfg["top_k"], cfg["top_p"],
                                  generator):
        token = token.item()
        probs = logits[0].softmax(dim=-1)
        best = probs.topk(top)
        the_end = token == enc.eot_token and cfg["stop_at_eot"]
        text = "" if the_end else decoder.decode(enc.decode_single_token_bytes(token))
        yield text, token, probs[token].item(), list(zip(best.indices.tolist(), best.values.tolist()))
        if the_end:
            break
    tail = decoder.decode(b"", final=True)
    if tail:
        yield tail, None, None, []


def generate_text(model, enc, prompt_ids, cfg, generator, out=None):
    """One story after prompt_ids; each piece is written to `out` as soon as it is whole UTF-8."""
    pieces = []
    for text, *_ in story_tokens(model, enc, prompt_ids, cfg, generator):
        pieces.append(text)
        if out is not None:
            out.write(text)
            out.flush()
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
    ids = prompt_ids(enc, prompt, model.config.block_size)
    generator = torch.Generator(device=device).manual_seed(cfg["seed"])
    stories = []
    with ctx:
        for i in range(cfg["num_samples"]):
            if out is not None:
                out.write(prompt)
            stories.append(prompt + generate_text(model, enc, ids, cfg, generator, out))
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
