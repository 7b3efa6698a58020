"""
The token bins prepare.py writes and train.py reads: train.bin and validation.bin, flat little-endian uint16 token
ids, each story followed by the end-of-text id; and meta.json, which says how many tokens each holds and which
vocabulary they use. Opening them checks all of that first, so a wrong folder stops at once, in one line.
"""
import json
import os

import numpy as np

from config import UserError

META_VERSION = 2  # meta.json's layout; bump when it changes, so old data gets rebuilt (2: the vocabulary)


class Bin:
    """A token bin, its size checked against meta.json. tokens() maps it anew at each call: a memmap kept for the
    whole run would keep every page it touched resident (https://stackoverflow.com/questions/45132940)."""

    def __init__(self, path, expected_tokens):
        if not os.path.isfile(path):
            raise UserError(f"{path} not found: run prepare.py first (python prepare.py --data_dir={os.path.dirname(path)})")
        size = os.path.getsize(path)
        if size != 2 * expected_tokens:
            raise UserError(f"{path} holds {size} bytes but meta.json says {expected_tokens} uint16 tokens: "
                            f"a truncated or foreign file; run prepare.py again")
        self.path, self.num_tokens = path, expected_tokens

    def tokens(self):
        return np.memmap(self.path, dtype="<u2", mode="r")


def load_bins(data_dir, block_size):
    """({"train": Bin, "validation": Bin}, meta), after checking them against meta.json and the context."""
    try:
        with open(os.path.join(data_dir, "meta.json")) as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise UserError(f"no prepared data in {data_dir}/: run prepare.py first (python prepare.py --data_dir={data_dir})")
    except ValueError:
        raise UserError(f"{data_dir}/meta.json is corrupt: run prepare.py again")
    if meta.get("version") != META_VERSION:  # before the compact vocabulary: no "vocab" to give the checkpoints
        raise UserError(f"{data_dir}/ was prepared by an older prepare.py (meta.json version {meta.get('version')}, "
                        f"this one reads {META_VERSION}): run prepare.py again")
    if not meta.get("complete"):
        raise UserError(f"{data_dir}/ holds an unfinished prepare.py run: run prepare.py again")
    bins = {}
    for split in ("train", "validation"):
        bins[split] = Bin(os.path.join(data_dir, f"{split}.bin"), meta["splits"][split]["tokens"])
        if bins[split].num_tokens <= block_size:
            raise UserError(f"{split}.bin holds {bins[split].num_tokens} tokens, not more than block_size="
                            f"{block_size}: use a smaller --block_size or more data")
    return bins, meta
