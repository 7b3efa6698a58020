"""
Where prepare.py's stories come from: the Hugging Face hub (TinyStories), or local files in five formats, or, offline,
the demo corpus. find_source decides, and read_splits yields the stories of both splits, chunk by chunk.

    .txt, .txt.gz    TinyStories-train.txt's format: stories separated by lines holding only <|endoftext|>
    .jsonl, .json    objects with a "text" field (a .json file may also hold a list of them)
    .parquet         a "text" column
"""
import codecs
import gzip
import json
import os
import re
import threading

from config import UserError

HUB_DATASET = "roneneldan/TinyStories"
DEMO_CORPUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo_stories.txt")
SPLITS = ("train", "validation")
FORMATS = (".txt", ".txt.gz", ".jsonl", ".json", ".parquet")
CHUNK = 1024  # stories per unit of work: big enough to amortise overhead, small enough to bound memory


# Every reader yields (list of stories, progress made), progress in the bar's unit.

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
        source = dict(kind="one_file", file=file_stamp(dataset), val_every=max(2, round(1 / val_fraction)))
        # meta.json says so: train.py then says what it trains on
        return {**source, "demo": True} if os.path.abspath(dataset) == DEMO_CORPUS else source
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


def describe(source):
    if source["kind"] == "hub":
        return source["name"]
    if source["kind"] == "one_file":
        return source["file"]["path"]
    return ", ".join(s["path"] for split in SPLITS for s in source["files"][split])
