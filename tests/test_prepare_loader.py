"""The best-fit packer: batch for batch identical to a plain reference of upstream's loop,
on random documents and on the real builtin data; the backend adapters; eval rows."""
import importlib.util
import itertools
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import prepare  # noqa: E402
from harness import packing, prefetch  # noqa: E402

_spec = importlib.util.spec_from_file_location("bench_dataloader", REPO / "bench" / "dataloader.py")
bench_dataloader = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_dataloader)
reference_pack_rows = bench_dataloader.reference_pack_rows

BOS = 8188



def random_doc_batches(seed, n_docs, T, epochs, batch=16):
    """(docs, epoch) batches over `epochs` epochs (None: endless). Lengths drawn from a few values
    (many ties, so tie-breaking matters), plus short and over-long documents (the crop path)."""
    rng = np.random.default_rng(seed)
    lengths = np.where(rng.random(n_docs) < 0.7, rng.choice([2, 3, 5, T // 4, T // 3, T // 2 + 1], n_docs),
                       rng.integers(2, 3 * T, n_docs))
    docs = []
    for n in lengths:
        doc = rng.integers(0, 8000, n).astype(np.uint16)
        doc[0] = BOS
        docs.append(doc)
    one_epoch = [docs[i:i + batch] for i in range(0, n_docs, batch)]
    epoch_numbers = itertools.count(1) if epochs is None else range(1, epochs + 1)
    return ((b, e) for e in epoch_numbers for b in one_epoch)


def as_lists(batches):
    return (([d.tolist() for d in docs], e) for docs, e in batches)


@pytest.mark.parametrize("B,T,buffer_size,n_docs", [
    (4, 63, 40, 400),     # several documents per row, lots of ties
    (2, 255, 1000, 1200),  # upstream's buffer size; the epoch turns while the buffer refills
    (8, 16, 10, 200),     # rows shorter than most documents: mostly the crop path
])
def test_packer_equals_upstream_reference_on_random_documents(B, T, buffer_size, n_docs):
    fast = packing.pack_rows(random_doc_batches(B * T, n_docs, T, None), B, T, buffer_size)
    ref = reference_pack_rows(as_lists(random_doc_batches(B * T, n_docs, T, None)), B, T, buffer_size)
    epochs_seen = set()
    n_batches = 150
    for step, ((rows, epoch), (ref_rows, ref_epoch)) in enumerate(zip(itertools.islice(fast, n_batches),
                                                                    itertools.islice(ref, n_batches))):
        assert rows.shape == (B, T + 1) and rows.dtype == np.int64
        assert np.array_equal(rows, ref_rows), f"batch {step} differs"
        assert epoch == ref_epoch
        assert (rows[:, 0] == BOS).all()
        epochs_seen.add(epoch)
    assert len(epochs_seen) >= 2  # the comparison crossed an epoch boundary


def test_draining_packer_uses_each_document_once_and_matches_upstream_until_the_data_ends():
    T = 63
    batches = list(random_doc_batches(seed=7, n_docs=300, T=T, epochs=1))
    total_tokens = sum(len(d) for docs, _ in batches for d in docs)
    drained = np.concatenate([r for r, _ in packing.pack_rows(iter(batches), 1, T, 50)])
    assert len(drained) * (T + 1) <= total_tokens
    assert len({row.tobytes() for row in drained}) == len(drained)
    # upstream would cycle the data; up to the point where it reads the second epoch, rows agree
    ref = reference_pack_rows(as_lists(random_doc_batches(seed=7, n_docs=300, T=T, epochs=None)), 1, T, 50)
    same = 0
    for row, (ref_row, epoch) in zip(drained, ref):
        if epoch > 1:
            break
        assert np.array_equal(row, ref_row[0])
        same += 1
    assert same > len(drained) // 2


def upstream_document_batches(path):
    """Upstream's document order, read independently: row groups, slices of 128, cycled."""
    epoch = 1
    while True:
        pf = pq.ParquetFile(path)
        for rg in range(pf.num_row_groups):
            texts = pf.read_row_group(rg).column("text").to_pylist()
            for i in range(0, len(texts), 128):
                yield texts[i:i + 128], epoch
        epoch += 1


@pytest.mark.parametrize("split,shard", [("train", "shard_00000.parquet"), ("val", "val.parquet")])
def test_make_dataloader_equals_upstream_reference_on_builtin(builtin, builtin_cache, split, shard):
    tok = builtin
    path = Path(builtin_cache["AUTORESEARCH_CACHE"]) / "builtin" / "data" / shard
    ref = reference_pack_rows(((tok.encode(texts, prepend=BOS), e) for texts, e in upstream_document_batches(path)),
                              8, 256)
    loader = prepare.make_dataloader(tok, 8, 256, split)
    for (x, y, epoch), (ref_rows, ref_epoch) in itertools.islice(zip(loader, ref), 25):
        assert np.array_equal(x, ref_rows[:, :-1]) and np.array_equal(y, ref_rows[:, 1:])
        assert epoch == ref_epoch


def test_backend_adapters_hand_out_the_same_batches(builtin):
    import mlx.core as mx
    tok = builtin
    expected = [b for b in itertools.islice(prepare.make_dataloader(tok, 4, 128, "train"), 3)]
    for (x, y, e), (ex, ey, ee) in zip(prepare.make_dataloader(tok, 4, 128, "train", backend="mlx"), expected):
        assert isinstance(x, mx.array) and x.dtype == mx.int32 and x.shape == (4, 128)
        assert np.array_equal(np.array(x), ex) and np.array_equal(np.array(y), ey) and e == ee
    torch = pytest.importorskip("torch")
    for (x, y, e), (ex, ey, ee) in zip(prepare.make_dataloader(tok, 4, 128, "train", backend="torch",
                                                               device="cpu"), expected):
        assert isinstance(x, torch.Tensor) and x.dtype == torch.int64 and x.device.type == "cpu"
        assert np.array_equal(x.numpy(), ex) and np.array_equal(y.numpy(), ey) and e == ee
    with pytest.raises(prepare.HarnessError, match="valid: numpy, mlx, torch"):
        next(prepare.make_dataloader(tok, 4, 128, "train", backend="jax"))
    with pytest.raises(prepare.HarnessError, match="'train' or 'val'"):
        next(prepare.make_dataloader(tok, 4, 128, "test"))


def test_eval_rows_of_every_profile_are_distinct(builtin):
    tok = builtin
    for profile in prepare.PROFILES.values():
        rows = prepare.eval_rows(tok, profile)
        T = profile.seq_len
        assert rows.shape[1] == T + 1 and (rows[:, 0] == BOS).all()
        assert 0 < len(rows) <= profile.eval_tokens // T
        assert len({r.tobytes() for r in rows}) == len(rows), f"{profile.name}: a row is evaluated twice"
    # smoke fits in the builtin val shard; quick/standard want more than it holds: scored once, whole
    assert len(prepare.eval_rows(tok, prepare.PROFILES["smoke"])) == 64
    quick = prepare.eval_rows(tok, prepare.PROFILES["quick"])
    val_tokens = sum(len(ids) for ids in tok.encode(
        pq.read_table(Path(prepare.data_dir("builtin")) / "val.parquet").column("text").to_pylist(), prepend=BOS))
    # all of it but the last partial row and the cropped tails (< 256 tokens per row) is scored
    assert len(quick) * 2049 <= val_tokens < (len(quick) + 1) * 2049 + len(quick) * 256
    assert np.array_equal(quick, prepare.eval_rows(tok, prepare.PROFILES["standard"]))


def test_prefetching_keeps_order_propagates_errors_and_stops_with_its_consumer():
    import threading
    assert list(prefetch.prefetched(iter(range(50)), depth=3)) == list(range(50))

    def failing():
        yield 1
        yield 2
        raise prepare.HarnessError("shard is corrupt")

    got = []
    with pytest.raises(prepare.HarnessError, match="shard is corrupt"):
        for value in prefetch.prefetched(failing()):
            got.append(value)
    assert got == [1, 2]
    before = set(threading.enumerate())
    endless = prefetch.prefetched(itertools.count(), depth=2)
    assert next(endless) == 0
    (worker,) = [t for t in set(threading.enumerate()) - before if t.name == "autoresearch-dataloader"]
    endless.close()  # e.g. the trainer's loop ends: the worker thread must not live on
    worker.join(5)
    assert not worker.is_alive()
