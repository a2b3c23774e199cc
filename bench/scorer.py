"""What the trust boundary costs: the trusted scorer against in-process evaluate_bpb, and the
sandbox's start-up, each against a baseline measured in the same run.

    uv run bench/scorer.py                      # smoke and quick profiles, builtin data
    uv run bench/scorer.py --profiles quick --repeats 3

Scorer: the same MLX model is scored (a) in process, as the runner needed before the scorer
(causality check, main rows, and the hidden slice), and (b) through the scorer: a real
`python -m harness.scorer` process, a socket pair and the shared-memory slots, the scorer's
start-up and row loading included, causality siblings included. Target: (b) / (a) <= 1.10
at the quick profile.

Sandbox: `bwrap ... python -c pass` against `python -c pass` (the interpreter's own start-up
is the baseline); target <= 1 s extra.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def model_for(vocab: int, dim: int, layers: int):
    """Position-wise MLP language model: the LM head and the loss dominate the eval, as in
    the real trainers at their CPU sizes."""
    import mlx.core as mx
    import mlx.nn as nn

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(vocab, dim)
            self.blocks = [nn.Sequential(nn.Linear(dim, 4 * dim), nn.ReLU(), nn.Linear(4 * dim, dim))
                           for _ in range(layers)]
            self.head = nn.Linear(dim, vocab)

        def __call__(self, x):
            h = self.emb(x)
            for b in self.blocks:
                h = h + b(h)
            return self.head(h)

    mx.random.seed(0)
    m = Model()
    mx.eval(m.parameters())
    return m


def in_process(prepare, model, tok, batch_size: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    bpb = prepare.evaluate_bpb(model, tok, batch_size)
    hidden = prepare.hidden_rows(tok)
    if len(hidden):
        prepare._rows_bpb(model, hidden, batch_size, "mlx", prepare.get_token_bytes())
    return time.perf_counter() - t0, bpb


def through_scorer(prepare, model, tok, batch_size: int, env: dict) -> tuple[float, float, dict]:
    import json
    t0 = time.perf_counter()
    runner_end, trainer_end = socket.socketpair()
    proc = subprocess.Popen([sys.executable, "-B", "-m", "harness.scorer", "--fd", str(runner_end.fileno())],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, pass_fds=(runner_end.fileno(),))
    runner_end.close()
    os.environ["AUTORESEARCH_SCORER_FD"] = str(trainer_end.detach())
    try:
        bpb = prepare.evaluate_bpb(model, tok, batch_size)
    finally:
        del os.environ["AUTORESEARCH_SCORER_FD"]
    out, _ = proc.communicate(timeout=120)
    return time.perf_counter() - t0, bpb, json.loads(out.decode().strip().splitlines()[-1])


def bench_scorer(profiles, repeats: int, dim: int, layers: int, batch_size: int) -> None:
    import importlib
    for name in profiles:
        os.environ["AUTORESEARCH_PROFILE"] = name
        import prepare
        prepare = importlib.reload(prepare)
        prepare.ensure_prepared()
        tok = prepare.Tokenizer.from_directory()
        model = model_for(tok.get_vocab_size(), dim, layers)
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        a, b = [], []
        for _ in range(repeats):
            t, bpb_a = in_process(prepare, model, tok, batch_size)
            a.append(t)
            t, bpb_b, result = through_scorer(prepare, model, tok, batch_size, env)
            b.append(t)
        ta, tb = statistics.median(a), statistics.median(b)
        rows = result["rows_sent"]
        print(f"{name:8s} eval_tokens {result['eval_tokens']:>8d}  rows sent {rows} ({result['probes']} probes, "
              f"hidden {result.get('hidden_tokens', 0)} tokens)")
        print(f"         in-process {ta:6.2f} s   scorer {tb:6.2f} s   ratio {tb / ta:.3f}   "
              f"|bpb difference| {abs(bpb_a - bpb_b):.2e}")


def bench_sandbox(repeats: int) -> None:
    from harness import sandbox
    kind, reason = sandbox.detect()
    if kind != "bwrap":
        print(f"sandbox: {kind} ({reason}); nothing to time")
        return
    with tempfile.TemporaryDirectory() as d:
        sb = sandbox.plan(REPO, Path(d) / "scratch")
        env = sb.env(os.environ)
        plain, boxed = [sys.executable, "-c", "pass"], sb.wrap([sys.executable, "-c", "pass"])

        def timed(cmd):
            t0 = time.perf_counter()
            subprocess.run(cmd, env=env, check=True, cwd=REPO)
            return time.perf_counter() - t0
        timed(boxed)
        p = statistics.median(timed(plain) for _ in range(repeats))
        s = statistics.median(timed(boxed) for _ in range(repeats))
        print(f"sandbox  python -c pass: plain {p * 1000:.0f} ms, in bwrap {s * 1000:.0f} ms, "
              f"start-up cost {(s - p) * 1000:.0f} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profiles", nargs="+", default=["smoke", "quick"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    from harness.blas import use_tuned_blas
    use_tuned_blas()          # before MLX loads: MLX's Linux wheel bundles a slow reference BLAS
    os.environ.setdefault("AUTORESEARCH_DATASET", "builtin")
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores; model dim {args.dim}, "
          f"{args.layers} MLP blocks, batch {args.batch_size}")
    bench_sandbox(max(5, args.repeats))
    bench_scorer(args.profiles, args.repeats, args.dim, args.layers, args.batch_size)


if __name__ == "__main__":
    main()
