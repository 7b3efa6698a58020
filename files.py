"""
Writing a file whole or not at all: into a temporary file beside it, flushed to disk, then renamed over it. A crash,
a kill -9 or a full disk leaves the earlier file (or none), never half of one. Checkpoints, meta.json, log.jsonl and
loss.png are all written so.
"""
import os


def write_atomically(path, write, mode="wb"):
    """Write `path` by calling write(file) on a temporary file, then move it into place."""
    tmp = path + ".tmp"
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename makes it visible
    except BaseException as e:  # a full disk, say: drop the partial file, keep the old one
        if os.path.exists(tmp):
            os.remove(tmp)
        # torch.save reports a failed write (ENOSPC, EFBIG) as a RuntimeError raised while handling the OSError
        error = e if isinstance(e, OSError) else e.__context__
        if isinstance(error, OSError):
            raise OSError(error.errno, error.strerror, path) from None
        raise
    os.replace(tmp, path)
