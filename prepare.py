"""
TinyStories -> token ids of a compact GPT-2 vocabulary -> {data_dir}/train.bin, validation.bin, meta.json

    python prepare.py                                  # Hugging Face roneneldan/TinyStories (demo corpus if offline)
    python prepare.py --dataset=TinyStories-train.txt  # a local file, split into train/validation
    python prepare.py --dataset=path/to/folder         # files named *train* and *valid*: .txt(.gz), .jsonl, .json, .parquet
    python prepare.py --vocab_size=50257               # GPT-2's own ids instead of the 4,096 most used tokens

First the GPT-2 tokens of the first COUNT_BYTES of train text are counted and the vocab_size most used are kept
(tokenizer.py: every byte is kept too, so nothing is lost); then every story is encoded with that vocabulary.
The bins are flat little-endian uint16 arrays, each story followed by the end-of-text id (the vocabulary's last)
so the model learns where a story ends; read them with np.memmap. meta.json records the vocabulary (its GPT-2
ids) and the token, story and byte counts per split, so a truncated bin is detected. The bins are written under
temporary names and moved into place when complete, with meta.json marking them unfinished in between: an
interrupted run never leaves bins that look finished.
"""
import codecs
import gzip
import json
import os
import re
import sys
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from tqdm import tqdm

from config import SCRIPTS, UserError, get_config
from tokenizer import GPT2_VOCAB_SIZE, choose_vocab, get_tokenizer

HUB_DATASET = "roneneldan/TinyStories"
DEMO_CORPUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo_stories.txt")
SPLITS = ("train", "validation")
FORMATS = (".txt", ".txt.gz", ".jsonl", ".json", ".parquet")
CHUNK = 1024  # stories per unit of work: big enough to amortise overhead, small enough to bound memory
META_VERSION = 2  # bump when the bins' layout changes, so old data gets rebuilt
# The vocabulary is chosen from the first 16 MB of train text: all of a small dataset, about 1% of TinyStories'
# 1.9 GB train split (counting then adds about 1% to the run). On the TinyStories text of the tests' shared data,
# sets chosen from 4 MB and from all 9 MB share 92% of their tokens and encode validation into 1.008x and 1.006x
# GPT-2's tokens: the rare tokens at the edge of the set change, the compression hardly does.
COUNT_BYTES = 16 << 20


# -----------------------------------------------------------------------------
# Reading stories. Every reader yields (list of stories, progress made), progress in the bar's unit.

# Bytes that are not UTF-8 become U+FFFD; we count them and report the count rather than fail.
invalid_utf8 = [0]


def replace_and_count(err):
    invalid_utf8[0] += 1
    return "\ufffd", err.end


codecs.register_error("replace_and_count", replace_and_count)


def open_bytes(path):
    """The file as a byte stream, and the underlying file, whose position tells the progress."""
    raw = open(path, "rb")
    return (gzip.GzipFile(fileobj=raw) if path.endswith(".gz") else raw), raw


def read_txt(path):
    """TinyStories-train.txt format: stories separated by lines holding only <|endoftext|>."""
    stream, raw = open_bytes(path)
    decoder = codecs.getincrementaldecoder("utf-8")("replace_and_count")
    pending, done = "", 0
    with stream, raw:
        while True:
            block = stream.read(1 << 20)
            pending += decoder.decode(block, final=not block)
            parts = pending.split("<|endoftext|>")
            pending = parts.pop() if block else ""  # the last part may be a story cut by the block edge
            yield parts, raw.tell() - done
            done = raw.tell()
            if not block:
                return


def read_jsonl(path):
    """One JSON object per line, with a "text" field."""
    stream, raw = open_bytes(path)
    decoder = codecs.getincrementaldecoder("utf-8")("replace_and_count")
    stories, done = [], 0
    with stream, raw:
        for lineno, line in enumerate(stream, 1):
            if line.strip():
                stories.append(text_field(parse_json(decoder.decode(line), path, lineno), path, lineno))
            if len(stories) == CHUNK:
                yield stories, raw.tell() - done
                stories, done = [], raw.tell()
        yield stories, raw.tell() - done


def read_json(path):
    """A .json file: a list of {"text": ...} objects, or JSON lines."""
    with open(path, "rb") as f:
        first = f.read(64).lstrip()[:1]
    if first != b"[":
        yield from read_jsonl(path)
        return
    with open(path, "rb") as f:
        rows = parse_json(f.read().decode("utf-8", "replace_and_count"), path, None)
    stories = [text_field(row, path, i) for i, row in enumerate(rows, 1)]
    for i in range(0, len(stories), CHUNK):
        yield stories[i:i + CHUNK], os.path.getsize(path) if i + CHUNK >= len(stories) else 0


def parse_json(text, path, lineno):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}{f' line {lineno}' if lineno else ''}: not valid JSON ({e.msg})")


def text_field(row, path, where):
    if not isinstance(row, dict) or not isinstance(row.get("text"), str):
        raise UserError(f'{path} record {where}: expected an object with a "text" string field')
    return row["text"]


def read_parquet(path):
    import pyarrow.parquet as pq  # installed with `datasets`

    try:
        table = pq.ParquetFile(path)
    except Exception as e:
        raise UserError(f"{path}: not a readable parquet file ({e})")
    if "text" not in table.schema_arrow.names:
        raise UserError(f'{path}: no "text" column (columns: {", ".join(table.schema_arrow.names)})')
    for batch in table.iter_batches(batch_size=CHUNK, columns=["text"]):
        yield [s or "" for s in batch.column(0).to_pylist()], batch.nbytes


READERS = {".txt": read_txt, ".txt.gz": read_txt, ".jsonl": read_jsonl, ".jsonl.gz": read_jsonl,
           ".json": read_json, ".parquet": read_parquet}


def file_format(path):
    return next((ext for ext in READERS if path.endswith(ext)), None)


def read_hub(name, split):
    import datasets  # only here: training and sampling never need it

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # network, cache or format trouble: all reported the same way
        raise UserError(f"loading {name} ({split}) from the hub failed: {str(e).splitlines()[0]}")
    if "text" not in ds.column_names:
        raise UserError(f'{name} split {split}: no "text" column')
    for batch in ds.iter(batch_size=CHUNK):
        yield [s or "" for s in batch["text"]], len(batch["text"])


def hub_offline():
    """Whether the user told Hugging Face's libraries to stay offline (datasets then reads only its cache)."""
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() not in ("", "0", "false", "no", "off")


def hub_reachable(timeout=3.0):
    """True if the Hugging Face hub answers a request within `timeout` seconds. The request goes as datasets' would:
    through the proxy HTTPS_PROXY (or HTTP_PROXY) names, unless NO_PROXY lists the hub. A resolver that does not
    answer can hang for minutes, so the request runs in a thread that is given up on when the time is up."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(os.environ.get("HF_ENDPOINT", "https://huggingface.co"), method="HEAD")
    answered = []

    def ask():
        try:
            urllib.request.build_opener().open(request, timeout=timeout).close()  # proxies as set now
            answered.append(True)
        except urllib.error.HTTPError:  # an answer, if not a welcome one: the hub is there
            answered.append(True)
        except (OSError, ValueError):  # no route, no name, no proxy, refused, timed out
            pass
    thread = threading.Thread(target=ask, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answered)


def hub_cached(name):
    """True if datasets can load both splits from its cache, as it must under HF_HUB_OFFLINE."""
    import datasets

    try:
        for split in SPLITS:
            datasets.load_dataset(name, split=split)
        return True
    except Exception:  # not in the cache: datasets says so in many ways
        return False


def find_source(dataset, val_fraction):
    """What to read: a dict saying where each split comes from, also the fingerprint stored in meta.json."""
    if os.path.isdir(dataset):
        files = sorted(os.path.join(dataset, f) for f in os.listdir(dataset) if file_format(f))
        split_files = {"train": [f for f in files if "train" in os.path.basename(f).lower()],
                       "validation": [f for f in files if "valid" in os.path.basename(f).lower()]}
        for split, found in split_files.items():
            if not found:
                raise UserError(f"{dataset}: no {' or '.join(FORMATS)} file with "
                                   f"'{'train' if split == 'train' else 'valid'}' in its name")
        return dict(kind="files", files={s: [file_stamp(f) for f in fs] for s, fs in split_files.items()})
    if os.path.isfile(dataset):
        if not file_format(dataset):
            raise UserError(f"{dataset}: unknown file type, expected one of {', '.join(FORMATS)} or a folder")
        return dict(kind="one_file", file=file_stamp(dataset), val_every=max(2, round(1 / val_fraction)))
    if re.fullmatch(r"[\w.-]+/[\w.-]+", dataset) and not file_format(dataset):
        if hub_cached(dataset) if hub_offline() else hub_reachable():
            return dict(kind="hub", name=dataset)
        why, fix = "Cannot reach the Hugging Face hub", "pass --dataset=PATH (a TinyStories .txt/.jsonl/.parquet file or folder)"
        if hub_offline():
            why, fix = f"HF_HUB_OFFLINE is set and {dataset} is not in the datasets cache", f"unset HF_HUB_OFFLINE, or {fix}"
        if dataset != HUB_DATASET:
            raise UserError(f"{why}: cannot download {dataset}; {fix}")
        print(f"{why}: preparing the small demo corpus {os.path.basename(DEMO_CORPUS)} instead. For real data, {fix}.")
        return find_source(DEMO_CORPUS, val_fraction)
    raise UserError(f"--dataset={dataset}: no such file or folder")


def file_stamp(path):
    st = os.stat(path)
    return dict(path=os.path.abspath(path), size=st.st_size, mtime_ns=st.st_mtime_ns)


def cleaned(stories):
    """The one rule for every format: a story is its text without surrounding whitespace, and an empty one is
    no story at all (it would only add a lone end-of-text token)."""
    return [s for s in (text.strip() for text in stories) if s]


def read_splits(source):
    """(split, stories, progress) chunks of both splits, in one pass over the input; and the bar's total and unit."""
    if source["kind"] == "hub":
        chunks = ((split, cleaned(stories), n) for split in SPLITS for stories, n in read_hub(source["name"], split))
        return chunks, None, "rows"
    if source["kind"] == "files":
        stamps = [(split, s) for split in SPLITS for s in source["files"][split]]
        chunks = ((split, cleaned(stories), n) for split, s in stamps
                  for stories, n in READERS[file_format(s["path"])](s["path"]))
        return chunks, sum(s["size"] for _, s in stamps), "B"
    # One file for both splits: every val_every-th story is validation, the rest train. Deterministic,
    # streaming, and spread evenly over the file.
    path, every = source["file"]["path"], source["val_every"]

    def split_file():
        index = 0
        for stories, progress in READERS[file_format(path)](path):
            stories = cleaned(stories)
            is_val = [(i % every == every - 1) for i in range(index, index + len(stories))]
            index += len(stories)
            yield "train", [s for s, v in zip(stories, is_val) if not v], progress
            yield "validation", [s for s, v in zip(stories, is_val) if v], 0

    return split_file(), source["file"]["size"], "B"


# -----------------------------------------------------------------------------
# Tokenizing and writing


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


def describe(source):
    if source["kind"] == "hub":
        return source["name"]
    if source["kind"] == "one_file":
        return source["file"]["path"]
    return ", ".join(s["path"] for split in SPLITS for s in source["files"][split])


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
    """Write atomically: readers see the old file or the new one, never half of one."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
    vocab, counted = None, 0
    if cfg["vocab_size"] < GPT2_VOCAB_SIZE:
        counts, counted = count_gpt2_tokens(source, workers)
        vocab = choose_vocab(counts, cfg["vocab_size"])
    enc = get_tokenizer(vocab)
    print(f"Tokenizing {describe(source)} with GPT-2 BPE, {enc.n_vocab:,} tokens"
          f"{f' (the most used in {counted / 1e6:.1f} MB of train text)' if vocab else ''}, on {workers} threads into {data_dir}/")
    invalid_utf8[0] = 0
    try:
        splits = write_bins(enc, source, {split: path + ".tmp" for split, path in zip(SPLITS, bins)}, workers)
        # meta says "incomplete" while the bins are swapped in, and "complete" only once both are in place
        meta = dict(version=META_VERSION, complete=False, tokenizer=enc.name, vocab_size=enc.n_vocab,
                    eot=enc.eot_token, vocab=vocab, dtype="uint16", source=source, splits=splits,
                    invalid_utf8_replaced=invalid_utf8[0])
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
    if invalid_utf8[0]:
        print(f"warning: {invalid_utf8[0]:,} invalid UTF-8 byte sequences were replaced by U+FFFD")
    return meta


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
