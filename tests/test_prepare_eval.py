"""evaluate_bpb: equal to an independent float64 computation for simple MLX and torch
models, independent of the batch size, and chunked so its extra memory stays bounded."""
import math
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import prepare  # noqa: E402

mx = pytest.importorskip("mlx.core")
import mlx.nn as nn  # noqa: E402

# A small eval (16 rows of 64 tokens) keeps these tests fast; the rows come from the same code path.
TINY = prepare.Profile("smoke", 64, 15, 16 * 64)
DIM = 8


@pytest.fixture
def builtin(builtin_cache, monkeypatch):
    monkeypatch.setattr(prepare, "CACHE_DIR", builtin_cache["AUTORESEARCH_CACHE"])
    monkeypatch.setattr(prepare, "DATASET", "builtin")
    monkeypatch.setattr(prepare, "PROFILE", TINY)
    for last in ("_last_eval_tokens", "_last_unigram_bpb", "_last_tokenizer"):   # what evaluate_bpb leaves behind
        monkeypatch.setattr(prepare, last, [None])
    return prepare.Tokenizer.from_directory()


def weights(vocab, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(0, 1, (vocab, DIM)).astype(np.float32), rng.normal(0, 0.5, (vocab, DIM)).astype(np.float32)


class MLXBigram(nn.Module):
    def __init__(self, emb, head):
        super().__init__()
        self.wte = nn.Embedding(*emb.shape)
        self.lm_head = nn.Linear(DIM, head.shape[0], bias=False)
        self.wte.weight, self.lm_head.weight = mx.array(emb), mx.array(head)

    def __call__(self, x):
        return self.lm_head(self.wte(x))


def independent_bpb(tok, rows, emb, head):
    """The metric from its definition, in float64 numpy: nats of every target whose token is
    not special, over the UTF-8 bytes of those targets, in bits."""
    special = set(prepare.SPECIAL_TOKENS)
    nbytes = np.array([0 if tok.decode([i]) in special else len(tok.decode([i]).encode()) for i in
                       range(tok.get_vocab_size())])
    nats, total_bytes = 0.0, 0
    for row in rows:
        x, y = row[:-1], row[1:]
        logits = emb[x].astype(np.float64) @ head.T.astype(np.float64)
        m = logits.max(axis=1, keepdims=True)
        lse = (m + np.log(np.exp(logits - m).sum(axis=1, keepdims=True)))[:, 0]
        loss = lse - logits[np.arange(len(y)), y]
        nats += float((loss * (nbytes[y] > 0)).sum())
        total_bytes += int(nbytes[y].sum())
    return nats / (math.log(2) * total_bytes)


@pytest.mark.parametrize("numpy_cross_entropy", [True, False], ids=["numpy-ce", "mlx-ce"])
def test_mlx_evaluate_bpb_matches_independent_computation_at_any_batch_size(builtin, monkeypatch,
                                                                             numpy_cross_entropy):
    # MLX on a CPU device hands the float32 chunks to numpy; on a GPU it runs a compiled MLX function
    monkeypatch.setattr(prepare, "_mlx_cross_entropy_in_numpy", lambda: numpy_cross_entropy)
    tok = builtin
    emb, head = weights(tok.get_vocab_size())
    model = MLXBigram(emb, head)
    rows = prepare.eval_rows(tok)
    assert rows.shape == (16, 65)
    expected = independent_bpb(tok, rows, emb, head)
    for batch_size in (16, 5, 1):  # 5 does not divide 16: the padded last batch must not count
        assert prepare.evaluate_bpb(model, tok, batch_size) == pytest.approx(expected, rel=1e-5)
    fields = prepare.summary_fields(tok)
    assert {k: fields[k] for k in ("dataset", "profile", "eval_tokens")} == \
        {"dataset": "builtin", "profile": "smoke", "eval_tokens": 16 * 64}


def test_torch_evaluate_bpb_matches_independent_computation_at_any_batch_size(builtin):
    torch = pytest.importorskip("torch")
    tok = builtin
    emb, head = weights(tok.get_vocab_size(), seed=1)

    class TorchBigram(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = torch.nn.Embedding(*emb.shape)
            self.lm_head = torch.nn.Linear(DIM, head.shape[0], bias=False)
            with torch.no_grad():
                self.wte.weight.copy_(torch.from_numpy(emb))
                self.lm_head.weight.copy_(torch.from_numpy(head))

        def forward(self, x):
            assert x.dtype == torch.int64
            return self.lm_head(self.wte(x))

    model = TorchBigram()
    expected = independent_bpb(tok, prepare.eval_rows(tok), emb, head)
    for batch_size in (16, 3):
        assert prepare.evaluate_bpb(model, tok, batch_size) == pytest.approx(expected, rel=1e-5)
    # the same weights in MLX give the same number: both backends share the harness
    assert prepare.evaluate_bpb(MLXBigram(emb, head), tok, 4) == pytest.approx(expected, rel=1e-5)


def test_bf16_logits_are_scored_in_float32(builtin):
    tok = builtin
    emb, head = weights(tok.get_vocab_size(), seed=2)
    model = MLXBigram(emb, head)
    bf16 = prepare.evaluate_bpb(lambda x: model(x).astype(mx.bfloat16), tok, 8, backend="mlx")
    fp32 = prepare.evaluate_bpb(model, tok, 8)
    assert bf16 == pytest.approx(fp32, rel=2e-2) and bf16 != fp32


def test_unknown_model_type_is_a_clear_error(builtin):
    with pytest.raises(prepare.HarnessError, match="cannot tell the backend"):
        prepare.evaluate_bpb(lambda x: x, builtin, 4)


class FixedLogits(nn.Module):
    """Returns precomputed logits, so the memory measured is the harness's own."""

    def __init__(self, logits):
        super().__init__()
        self._logits = logits

    def __call__(self, x):
        return self._logits


def _peak_rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


def _extra_memory(run):
    """Peak memory `run()` adds: MLX's own peak counter, and on Linux the peak RSS (which
    also sees numpy and torch temporaries)."""
    run()  # warm-up: caches, allocator pools, compiled functions
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    rss = sys.platform.startswith("linux")
    if rss:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS to the current RSS
        rss_base = _peak_rss()
    run()
    return max(mx.get_peak_memory() - base, _peak_rss() - rss_base if rss else 0)


ROWS, T = 8, 256
LOGITS_FP32 = ROWS * T * 8192 * 4  # 64 MB


@pytest.mark.parametrize("numpy_cross_entropy", [True, False], ids=["numpy-ce", "mlx-ce"])
def test_chunking_bounds_extra_memory_mlx(builtin, monkeypatch, numpy_cross_entropy):
    tok = builtin
    monkeypatch.setattr(prepare, "_mlx_cross_entropy_in_numpy", lambda: numpy_cross_entropy)
    monkeypatch.setattr(prepare, "PROFILE", prepare.Profile("smoke", T, 15, ROWS * T))
    logits = mx.random.normal((ROWS, T, tok.get_vocab_size())).astype(mx.bfloat16)
    mx.eval(logits)
    model = FixedLogits(logits)
    monkeypatch.setattr(prepare, "EVAL_CHUNK_BYTES", 2 ** 40)  # one chunk: the whole batch in float32
    unchunked = _extra_memory(lambda: prepare.evaluate_bpb(model, tok, ROWS))
    monkeypatch.setattr(prepare, "EVAL_CHUNK_BYTES", 4 * 2 ** 20)  # 128 tokens at a time
    chunked = _extra_memory(lambda: prepare.evaluate_bpb(model, tok, ROWS))
    assert unchunked > LOGITS_FP32
    assert chunked < 24 * 2 ** 20


def test_chunking_bounds_extra_memory_torch(builtin, monkeypatch):
    torch = pytest.importorskip("torch")
    tok = builtin
    monkeypatch.setattr(prepare, "PROFILE", prepare.Profile("smoke", T, 15, ROWS * T))
    logits = torch.randn(ROWS, T, tok.get_vocab_size()).bfloat16()

    class Fixed(torch.nn.Module):
        def forward(self, x):
            return logits

    monkeypatch.setattr(prepare, "EVAL_CHUNK_BYTES", 2 ** 40)
    unchunked = _extra_memory(lambda: prepare.evaluate_bpb(Fixed(), tok, ROWS))
    monkeypatch.setattr(prepare, "EVAL_CHUNK_BYTES", 4 * 2 ** 20)
    chunked = _extra_memory(lambda: prepare.evaluate_bpb(Fixed(), tok, ROWS))
    if sys.platform.startswith("linux"):
        assert unchunked > LOGITS_FP32 * 0.9
    assert chunked < 24 * 2 ** 20


def test_default_chunk_keeps_extra_memory_under_512mb():
    # float32 chunk + one temporary of its size (+ MLX's fused kernel output): < 3 chunks at vocab 8192
    assert prepare._chunk_tokens(8192) * 8192 * 4 <= prepare.EVAL_CHUNK_BYTES
    assert 3 * prepare.EVAL_CHUNK_BYTES < 512 * 2 ** 20


class MLXUnigram(nn.Module):
    """Logits that ignore the context: the same log-probabilities at every position."""
    def __init__(self, logp):
        super().__init__()
        self.logp = mx.array(logp.astype(np.float32))

    def __call__(self, x):
        return mx.broadcast_to(self.logp, (*x.shape, self.logp.shape[0]))


def test_unigram_floor_is_the_score_of_a_token_frequency_model(builtin, monkeypatch):
    """The floor in every summary equals what evaluate_bpb gives a model predicting each token
    with its add-one-smoothed training frequency, the counts are those of the whole training
    split of builtin (BOS included), and they are cached with the tokenizer."""
    import pyarrow.parquet as pq
    tok = builtin
    data = Path(prepare.data_dir())
    docs = [t for f in sorted(data.glob("shard_*.parquet")) for t in pq.read_table(f).column("text").to_pylist()]
    counts = np.bincount(np.concatenate(tok.encode(docs, prepend=tok.get_bos_token_id())), minlength=8192)
    logp = np.log((counts + 1.0) / (counts.sum() + len(counts)))
    cache = Path(prepare.tokenizer_dir()) / "unigram_counts.npz"
    cache.unlink(missing_ok=True)
    floor = prepare.unigram_bpb(tok)
    assert floor == pytest.approx(prepare.evaluate_bpb(MLXUnigram(logp), tok, 8), rel=1e-5)
    assert cache.exists() and (np.load(cache)["counts"] == counts).all()
    assert 2.5 < floor < 4.5   # Shakespeare, 8192-token BPE: about 3.1 to 3.2 bits per byte
    # the cache belongs to its tokenizer: a changed fingerprint recounts instead of reusing it
    np.savez(cache, counts=np.ones(8192, np.int64), fingerprint=np.array("another tokenizer"))
    assert prepare.unigram_bpb(tok) == pytest.approx(floor, abs=1e-9)
    np.savez(cache, counts=np.ones(8192, np.int64), fingerprint=np.load(cache)["fingerprint"])
    assert prepare.unigram_bpb(tok) != pytest.approx(floor, abs=1e-3)   # the saved counts are used
    cache.unlink()
