"""What the data preparers share: progress lines, human-readable sizes, sha256 of a file,
and atomically written climbmix-format parquet shards."""
import hashlib
import os
import time


def human_bytes(n):
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024


class Progress:
    """Prints a progress line at most every `every` seconds (and always at the end)."""

    def __init__(self, what, every=2.0):
        self.what, self.every = what, every
        self.t0 = self.last = time.time()

    def update(self, text, force=False):
        now = time.time()
        if force or now - self.last >= self.every:
            self.last = now
            print(f"  {self.what}: {text} ({now - self.t0:.0f}s)", flush=True)


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def write_parquet(path, texts, row_group_size=1024):
    """Write documents as a climbmix-format shard (one `text` column, zstd), atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    tmp = f"{path}.tmp-{os.getpid()}"
    pq.write_table(pa.table({"text": pa.array(texts, type=pa.string())}), tmp,
                   compression="zstd", row_group_size=row_group_size)
    os.replace(tmp, path)
