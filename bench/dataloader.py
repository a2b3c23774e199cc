"""
Dataloader benchmark: prepare.py's best-fit packer against a straightforward reference of
upstream autoresearch's packing loop, both run here on the same documents, outputs compared
batch for batch. Also times evaluate_bpb for the `quick` profile on a tiny MLX model.

    uv run bench/dataloader.py                  # uses the active dataset (prepare.py --dataset builtin)
    uv run bench/dataloader.py --batches 20 --B 16 --T 2048

Prints tokens/s for (1) packing alone (pre-tokenized documents), (2) tokenize + pack from
text, and the ratio fast / reference. The reference below is also what the tests compare
the loader against (tests/test_prepare_loader.py).
"""

import argparse
import itertools
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def reference_pack_rows(token_batches, B, T, buffer_size=1000):
    """Upstream's packing loop, kept plain: a Python list buffer scanned in full for every
    placement. token_batches yields (list of token sequences, epoch); yields (rows, epoch)."""
    row_capacity = T + 1
    doc_buffer = []
    epoch = 1
    while True:
        rows = np.empty((B, row_capacity), dtype=np.int64)
        for row_idx in range(B):
            pos = 0
            while pos < row_capacity:
                while len(doc_buffer) < buffer_size:
                    docs, epoch = next(token_batches)
                    doc_buffer.extend(docs)
                remaining = row_capacity - pos
                # Find the largest doc that fits entirely (first one in buffer order on ties)
                best_idx = -1
                best_len = 0
                for i, doc in enumerate(doc_buffer):
                    doc_len = len(doc)
                    if doc_len <= remaining and doc_len > best_len:
                        best_idx = i
                        best_len = doc_len
                if best_idx >= 0:
                    doc = doc_buffer.pop(best_idx)
                    rows[row_idx, pos:pos + len(doc)] = doc
                    pos += len(doc)
                else:
                    # No doc fits: crop the (first) shortest to fill the row
                    shortest_idx = min(range(len(doc_buffer)), key=lambda i: len(doc_buffer[i]))
                    doc = doc_buffer.pop(shortest_idx)
                    rows[row_idx, pos:pos + remaining] = doc[:remaining]
                    pos += remaining
        yield rows, epoch


def synthetic_token_batches(n_docs, seed=0, vocab=8192, batch=128, median_len=600):
    """Documents with a climbmix-like long-tailed length distribution, as (uint16 arrays, epoch) batches."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(median_len), 1.0, n_docs).astype(int), 2, 60_000)
    docs = [rng.integers(0, vocab, n, dtype=np.uint16) for n in lengths]
    for d in docs:
        d[0] = vocab - 4  # BOS
    return [(docs[i:i + batch], 1) for i in range(0, n_docs, batch)]


def time_packer(make_rows, n_batches):
    t0 = time.perf_counter()
    out = [rows.copy() for rows, _ in itertools.islice(make_rows(), n_batches)]
    return time.perf_counter() - t0, out


def bench_packing(label, batches_fast, batches_ref, B, T, n_batches):
    from harness import packing
    time_packer(lambda: packing.pack_rows(iter(batches_fast), B, T), 2)  # warm-up (allocator, caches)
    time_packer(lambda: reference_pack_rows(iter(batches_ref), B, T), 2)
    t_fast, fast = time_packer(lambda: packing.pack_rows(iter(batches_fast), B, T), n_batches)
    t_ref, ref = time_packer(lambda: reference_pack_rows(iter(batches_ref), B, T), n_batches)
    identical = all(np.array_equal(a, b) for a, b in zip(fast, ref)) and len(fast) == len(ref) == n_batches
    tokens = n_batches * B * T
    print(f"{label}: fast {tokens / t_fast / 1e6:8.2f} M tok/s   reference {tokens / t_ref / 1e6:8.2f} M tok/s   "
          f"ratio {t_ref / t_fast:6.1f}x   identical={identical}")
    return t_ref / t_fast, identical


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--B", type=int, default=16)
    parser.add_argument("--T", type=int, default=2048)
    parser.add_argument("--batches", type=int, default=50)
    parser.add_argument("--skip-eval", action="store_true")
    args = parser.parse_args()
    import prepare
    from harness import packing
    B, T, n = args.B, args.T, args.batches
    print(f"B={B} T={T} batches={n} ({n * B * T / 1e6:.2f} M tokens per run); dataset {prepare.DATASET}")

    # (1) packing alone, synthetic climbmix-like documents (same arrays for both; the reference gets lists)
    need_docs = 1000 + 3 * n * B * (T // 300 + 2)
    syn = synthetic_token_batches(need_docs)
    syn_ref = [([d.tolist() for d in docs], e) for docs, e in syn]
    ratio_syn, same_syn = bench_packing("packing, synthetic long-tailed docs", syn, syn_ref, B, T, n)

    # (1b, 2) the active dataset: packing alone on its pre-tokenized train shard, then tokenize + pack
    prepare.ensure_prepared()
    tok = prepare.Tokenizer.from_directory()
    texts = list(itertools.islice(prepare._document_batches("train"), 200))
    pre = list(packing.tokenized_batches(tok, iter(texts)))
    pre_ref = [([d.tolist() for d in docs], e) for docs, e in pre]
    ratio_ds, same_ds = bench_packing(f"packing, {prepare.DATASET} documents", pre, pre_ref, B, T, n)

    def fast_from_text():
        return packing.pack_rows(packing.tokenized_batches(tok, iter(texts)), B, T)

    def ref_from_text():
        bos = tok.get_bos_token_id()
        return reference_pack_rows(((tok.encode(t, prepend=bos), e) for t, e in texts), B, T)

    t_fast, fast = time_packer(fast_from_text, n)
    t_ref, ref = time_packer(ref_from_text, n)
    same_tp = all(np.array_equal(a, b) for a, b in zip(fast, ref))
    tokens = n * B * T
    print(f"tokenize+pack, {prepare.DATASET}: fast {tokens / t_fast / 1e6:8.2f} M tok/s   reference "
          f"{tokens / t_ref / 1e6:8.2f} M tok/s   ratio {t_ref / t_fast:6.1f}x   identical={same_tp}")

    if not args.skip_eval:
        bench_eval(tok)
    ok = same_syn and same_ds and same_tp
    print(f"packing ratio (synthetic / {prepare.DATASET}): {ratio_syn:.1f}x / {ratio_ds:.1f}x "
          f"(target >= 3x), identical output: {ok}")
    return 0 if ok else 1


def bench_eval(tok):
    """evaluate_bpb for the quick profile on a tiny MLX model (embedding -> linear head): total
    time, and the harness's share (total minus the model's own forward passes on the same rows)."""
    import mlx.core as mx
    import mlx.nn as nn
    import prepare

    class Tiny(nn.Module):
        def __init__(self, vocab, dim=64):
            super().__init__()
            self.wte = nn.Embedding(vocab, dim)
            self.head = nn.Linear(dim, vocab, bias=False)

        def __call__(self, x):
            return self.head(self.wte(x))

    mx.random.seed(0)
    model = Tiny(tok.get_vocab_size(), dim=32)
    quick = prepare.PROFILES["quick"]
    saved = prepare.PROFILE
    prepare.PROFILE = quick
    try:
        t0 = time.perf_counter()
        rows = prepare.eval_rows(tok, quick)
        t_rows = time.perf_counter() - t0
        batch_size = 8
        t0 = time.perf_counter()
        bpb = prepare.evaluate_bpb(model, tok, batch_size=batch_size)
        t_eval = time.perf_counter() - t0
        # the harness alone: a "model" that returns one precomputed batch of logits costs nothing,
        # so this times feeding, the float32 cross-entropy in chunks and the byte counting
        fixed = model(mx.array(rows[:batch_size, :-1]))
        mx.eval(fixed)

        class FixedLogits(nn.Module):
            def __call__(self, x):
                return fixed

        t0 = time.perf_counter()
        prepare.evaluate_bpb(FixedLogits(), tok, batch_size=batch_size)
        t_harness = time.perf_counter() - t0
    finally:
        prepare.PROFILE = saved
    n_tok = len(rows) * (rows.shape[1] - 1)
    print(f"evaluate_bpb, quick profile, tiny MLX model (dim 32, vocab {tok.get_vocab_size()}, {mx.default_device()}): "
          f"{len(rows)} rows x {rows.shape[1] - 1} = {n_tok} tokens (the {prepare.DATASET} val shard holds no more): "
          f"row building {t_rows:.2f}s, evaluate_bpb {t_eval:.2f}s, of which the harness (logits given) "
          f"{t_harness:.2f}s = {n_tok / t_harness / 1e3:.0f} K tok/s; val_bpb {bpb:.4f}")

if __name__ == "__main__":
    sys.exit(main())
