"""
TinyStories -> token ids of a compact GPT-2 vocabulary -> {data_dir}/train.bin, validation.bin, meta.json

    python prepare.py                                  # Hugging Face roneneldan/TinyStories (demo corpus if offline)
    python prepare.py --dataset=TinyStories-train.txt  # a local file, split into train/validation
    python prepare.py --dataset=path/to/folder         # files named *train* and *valid*: .txt(.gz), .jsonl, .json, .parquet
    python prepare.py --vocab_size=50257               # GPT-2's own ids instead of the 4,096 most used tokens

Three steps: count GPT-2's tokens in the first COUNT_BYTES of the train text; keep the vocab_size most used (every
byte is kept too, so any text still encodes: tokenizer.py); encode every story with that vocabulary, end-of-text
after each, so the model learns where a story ends. The bins are flat little-endian uint16 arrays (np.memmap reads
them); meta.json records the vocabulary (as GPT-2 ids) and each split's token, story and byte counts, so a
truncated bin is detected. Where the stories come from, and in which formats: sources.py.
"""
import json
import os
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from tqdm import tqdm

import sources
from bins import META_VERSION
from config import SCRIPTS, UserError, get_config
from files import write_atomically
from sources import SPLITS, describe, find_source, read_splits
from tokenizer import GPT2_VOCAB_SIZE, choose_vocab, get_tokenizer

# The vocabulary is chosen from the first 16 MB of train text: all of a small dataset, about 1% of TinyStories'
# 1.9 GB train split, so counting adds about 1% to the run; more text hardly changes the set (RESULTS.md)
COUNT_BYTES = 16 << 20


def prepare(cfg):
    """Build (or find up to date) the bins for cfg['dataset'] in cfg['data_dir']; returns the meta dict."""
    data_dir = cfg["data_dir"]
    source = find_source(cfg["dataset"], cfg["val_fraction"])
    meta = read_meta(data_dir)
    if (not cfg["force"] and is_complete(meta, data_dir) and meta["source"] == source
            and meta["vocab_size"] == cfg["vocab_size"]):
        print(f"{data_dir}/train.bin and validation.bin are up to date for {describe(source)} "
              f"({meta['splits']['train']['tokens']:,} + {meta['splits']['validation']['tokens']:,} tokens); "
              f"--force=True rebuilds them.")
        return meta
    # Only ever replace bins this script wrote: a wrong --data_dir must not clobber someone else's files.
    bins = [os.path.join(data_dir, f"{s}.bin") for s in SPLITS]
    if meta is None and any(os.path.exists(b) for b in bins) and not cfg["force"]:
        raise UserError(f"{data_dir} holds a train.bin or validation.bin without prepare.py's meta.json; "
                        f"refusing to overwrite it (pick another --data_dir, or --force=True)")
    os.makedirs(data_dir, exist_ok=True)
    workers = os.cpu_count() or 1

    # the vocabulary: GPT-2's tokens counted in the train text, the most used kept
    vocab, counted = None, 0
    if cfg["vocab_size"] < GPT2_VOCAB_SIZE:
        counts, counted = count_gpt2_tokens(source, workers)
        vocab = choose_vocab(counts, cfg["vocab_size"])
    enc = get_tokenizer(vocab)

    # every story encoded with it into the bins, under temporary names until both are whole
    print(f"Tokenizing {describe(source)} with GPT-2 BPE, {enc.n_vocab:,} tokens"
          f"{f' (the most used in {counted / 1e6:.1f} MB of train text)' if vocab else ''}, on {workers} threads into {data_dir}/")
    sources.invalid_utf8[0] = 0
    try:
        splits = write_bins(enc, source, {split: path + ".tmp" for split, path in zip(SPLITS, bins)}, workers)
        meta = dict(version=META_VERSION, complete=False, tokenizer=enc.name, vocab_size=enc.n_vocab,
                    eot=enc.eot_token, vocab=vocab, dtype="uint16", source=source, splits=splits,
                    invalid_utf8_replaced=sources.invalid_utf8[0])
        # meta.json says "unfinished" while the bins are swapped in, and "complete" only once both are in place:
        # an interrupted run never leaves bins that look finished
        write_json(os.path.join(data_dir, "meta.json"), meta)
        for path in bins:
            os.replace(path + ".tmp", path)
        meta["complete"] = True
        write_json(os.path.join(data_dir, "meta.json"), meta)
    finally:
        for path in bins:
            if os.path.exists(path + ".tmp"):
                os.remove(path + ".tmp")
    for split in SPLITS:
        c = splits[split]
        print(f"{split:>10}: {c['stories']:,} stories, {c['tokens']:,} tokens, {c['bytes']:,} bytes of text")
    if sources.invalid_utf8[0]:
        print(f"warning: {sources.invalid_utf8[0]:,} invalid UTF-8 byte sequences were replaced by U+FFFD")
    return meta


def count_gpt2_tokens(source, workers):
    """How often each GPT-2 id occurs in the first COUNT_BYTES of the train split's text."""
    chunks, _, _ = read_splits(source)
    train_chunks = ((split, stories, 0) for split, stories, _ in chunks if split == "train")
    counts, seen = np.zeros(GPT2_VOCAB_SIZE, dtype=np.int64), 0
    for _, ids, nbytes, _, _ in tqdm(tokenize(get_tokenizer(), train_chunks, workers), desc="counting tokens",
                                     unit=" chunks", dynamic_ncols=True, leave=False):
        counts += np.bincount(ids, minlength=GPT2_VOCAB_SIZE)
        seen += nbytes
        if seen >= COUNT_BYTES:
            break
    return counts, seen


def encode_chunk(enc, stories):
    """Token ids of the stories, end-of-text after each, as uint16; and the UTF-8 size of their text."""
    ids = []
    for story in stories:  # encode_ordinary, not encode_ordinary_batch: that starts new threads every call
        ids.extend(enc.encode_ordinary(story))
        ids.append(enc.eot_token)
    return np.array(ids, dtype=np.uint16), len("".join(stories).encode())


def tokenize(enc, chunks, workers):
    """(split, ids, text bytes, stories, progress) for each chunk of stories, in order. tiktoken releases the GIL,
    so threads tokenize in parallel; the window of chunks in flight bounds memory."""
    with ThreadPoolExecutor(workers) as pool:
        in_flight = deque()
        for split, stories, progress in chunks:
            in_flight.append((split, pool.submit(encode_chunk, enc, stories), len(stories), progress))
            while len(in_flight) > 2 * workers or (in_flight and in_flight[0][1].done()):
                split, future, n, progress = in_flight.popleft()
                yield split, *future.result(), n, progress
        while in_flight:
            split, future, n, progress = in_flight.popleft()
            yield split, *future.result(), n, progress


def write_bins(enc, source, paths, workers):
    """Tokenize both splits into paths[split] (temporary names); returns the counts of each split."""
    chunks, total, unit = read_splits(source)
    counts = {split: dict(tokens=0, stories=0, bytes=0) for split in SPLITS}
    bar = tqdm(total=total, unit=unit, unit_scale=True, desc="tokenizing", dynamic_ncols=True)
    start = time.time()
    files = {split: open(paths[split], "wb") for split in SPLITS}
    try:
        for split, ids, nbytes, stories, progress in tokenize(enc, chunks, workers):
            files[split].write(ids.tobytes())
            for key, n in (("tokens", len(ids)), ("bytes", nbytes), ("stories", stories)):
                counts[split][key] += n
            tokens = sum(c["tokens"] for c in counts.values())
            bar.set_postfix_str(f"{tokens / (time.time() - start) / 1e6:.2f}M tok/s", refresh=False)
            bar.update(progress)
        for f in files.values():
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the file gets its final name
    finally:
        for f in files.values():
            f.close()
    bar.close()
    for split in SPLITS:
        if counts[split]["stories"] == 0:
            raise UserError(f"the {split} split of {describe(source)} holds no stories")
    return counts


def read_meta(data_dir):
    """meta.json if it is there and readable, else None."""
    try:
        with open(os.path.join(data_dir, "meta.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def is_complete(meta, data_dir):
    """True if meta.json says the bins are finished and both have exactly the size it records."""
    if not meta or not meta.get("complete") or meta.get("version") != META_VERSION:
        return False
    for split in SPLITS:
        path = os.path.join(data_dir, f"{split}.bin")
        if not os.path.isfile(path) or os.path.getsize(path) != 2 * meta["splits"][split]["tokens"]:
            return False
    return True


def write_json(path, obj):
    write_atomically(path, lambda f: json.dump(obj, f, indent=2), mode="w")


def main(argv):
    cfg, _ = get_config(argv, SCRIPTS["prepare.py"], "prepare.py")
    try:
        prepare(cfg)
    except UserError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit(f"interrupted: {cfg['data_dir']}/ holds the earlier bins, whole, or bins its meta.json marks unfinished "
                 f"(train.py refuses those); run prepare.py again to finish")
    except OSError as e:  # raised while writing the temporary bins, before anything is replaced
        sys.exit(f"error: {e.strerror or e} ({e.filename or cfg['data_dir']}); the bins already in place, if any, are untouched")


if __name__ == "__main__":
    main(sys.argv[1:])


# Full TinyStories from the hub, in GPT-2's tokens: train ~2.1M stories, ~471M tokens (train.bin ~0.95 GB);
# validation ~22K stories, ~4.7M tokens (validation.bin ~9.4 MB); the 4,096-token vocabulary adds about 4.5%.
# meta.json holds the exact counts.
