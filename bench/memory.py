"""Benchmark: peak memory and tokens/s of train_mlx.py's training step, now against a baseline
version of the file, in the same run on the same data.

    uv run bench/memory.py                        # standard profile: micro-batch 16 x 2048, compute dtype
    uv run bench/memory.py --baseline ac3e69e     # the training file at a git revision (default: before the chunked loss)
    uv run bench/memory.py --profile cpu --steps 20 --loss-streams 1   # the loss on one CPU stream
    git clone https://github.com/trevin-creator/autoresearch-mlx /tmp/fork
    uv run bench/memory.py --fork /tmp/fork       # also the MLX fork's step, from its own train.py

Each version runs in its own process (a fresh allocator and peak counter): its model, optimizer
and compiled step from the file itself at the profile's settings, a warm-up step (compile),
then --steps timed micro-steps on the builtin training data; the peak is mx.get_peak_memory()
over the timed steps. Prints both, and the ratios (now / baseline). The changes measured here:
the chunked, fused LM head + cross-entropy (O(chunk x vocab) memory where autodiff held a dozen
(tokens x vocab) tensors), blocked CPU attention and the fused MLP (activations autodiff kept).
Needs `uv run prepare.py --dataset builtin`.

--fork DIR measures the step of another MLX port's train.py (trevin-creator/autoresearch-mlx,
checked out by the user, never copied here) beside them: its definitions are run up to the
line where its script starts training, its GPT and optimizer are built at this file's depth,
width and micro-batch on the same data, weights cast to the compute dtype (its own init is
bf16), and its step (value_and_grad, eval, optimizer update, as its loop does) is timed the
same way. The fork's train.py imports its prepare.py only for constants; a stand-in with
this profile's sequence length and budget takes its place.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
BASELINE = "ac3e69e"  # the last commit whose train_mlx.py took autodiff-free but unchunked logits


def load_trainer(path: Path):
    spec = importlib.util.spec_from_file_location("trainer_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def measure_one(path: Path, steps: int, loss_streams: int | None) -> dict:
    """One training file's step: peak bytes and tokens/s (run in a child process)."""
    import mlx.core as mx

    t = load_trainer(path)
    if loss_streams and hasattr(t, "_LOSS_STREAMS"):  # the chunked loss's CPU streams, by hand
        t._LOSS_STREAMS[:] = [mx.new_stream(mx.default_device()) for _ in range(loss_streams)]
    import prepare
    prepare.ensure_prepared()
    tokenizer = prepare.Tokenizer.from_directory()
    seq_len = prepare.PROFILE.seq_len
    dtype = mx.bfloat16 if mx.default_device() == mx.gpu else mx.float32
    mx.random.seed(0)
    model = t.GPT(t.build_model_config(t.DEPTH, seq_len, tokenizer.get_vocab_size()), dtype=dtype)
    model.init_weights()
    optimizer = t.MuonAdamW(model, unembedding_lr=t.UNEMBEDDING_LR, embedding_lr=t.EMBEDDING_LR,
                            matrix_lr=t.MATRIX_LR, scalar_lr=t.SCALAR_LR, weight_decay=t.WEIGHT_DECAY,
                            adam_betas=t.ADAM_BETAS, muon_dtype=dtype)
    step = t.make_train_step(model, optimizer, 1)
    loader = prepare.make_dataloader(tokenizer, t.DEVICE_BATCH_SIZE, seq_len, "train", backend="mlx")
    schedule = mx.array([1.0, 0.85, t.WEIGHT_DECAY], dtype=mx.float32)
    return timed(lambda x, y: step([(x, y)], schedule), loader, steps, [t.DEVICE_BATCH_SIZE, seq_len], dtype)


def timed(step, loader, steps: int, micro_batch: list[int], dtype) -> dict:
    """A warm-up step (compile), then `steps` timed ones: the peak over those, and tokens/s."""
    import mlx.core as mx
    x, y, _ = next(loader)
    t0 = time.perf_counter()
    step(x, y)
    warm = time.perf_counter() - t0
    mx.clear_cache()
    mx.reset_peak_memory()
    seconds = []
    for _ in range(steps):
        x, y, _ = next(loader)
        t0 = time.perf_counter()
        step(x, y)
        seconds.append(time.perf_counter() - t0)
    return {"peak_gib": mx.get_peak_memory() / 2 ** 30,
            "tokens_per_s": micro_batch[0] * micro_batch[1] * steps / sum(seconds), "step_seconds": seconds,
            "warmup_seconds": round(warm, 1), "micro_batch": micro_batch, "dtype": str(dtype),
            "device": str(mx.default_device())}


def measure_fork(path: Path, steps: int) -> dict:
    """The fork's training step (run in a child process), at our model size and micro-batch."""
    import types
    from dataclasses import asdict

    import mlx.core as mx
    from mlx.utils import tree_map

    import prepare
    ours = load_trainer(REPO / "train_mlx.py")
    source = path.read_text()
    cut = source.find("\nt_start = time.time()")
    if cut < 0:
        raise SystemExit(f"{path}: no `t_start = time.time()` line where its training starts; not the expected fork")
    stand_in = types.ModuleType("prepare")   # the fork's prepare.py: only its constants are used
    stand_in.MAX_SEQ_LEN, stand_in.TIME_BUDGET = prepare.PROFILE.seq_len, prepare.PROFILE.time_budget
    stand_in.Tokenizer = stand_in.evaluate_bpb = stand_in.make_dataloader = None
    sys.modules["prepare"] = stand_in
    module = sys.modules["fork_train"] = types.ModuleType("fork_train")   # dataclasses look their module up
    exec(compile(source[:cut], str(path), "exec"), module.__dict__)
    sys.modules["prepare"] = prepare
    fork = module.__dict__
    prepare.ensure_prepared()
    tokenizer = prepare.Tokenizer.from_directory()
    seq_len = prepare.PROFILE.seq_len
    dtype = mx.bfloat16 if mx.default_device() == mx.gpu else mx.float32
    config = fork["GPTConfig"](**asdict(ours.build_model_config(ours.DEPTH, seq_len, tokenizer.get_vocab_size())))
    mx.random.seed(0)
    model = fork["GPT"](config)
    model.init_weights()
    model.update(tree_map(lambda a: a.astype(dtype) if mx.issubdtype(a.dtype, mx.floating) else a, model.parameters()))
    optimizer = fork["AdamW"](model, unembedding_lr=ours.UNEMBEDDING_LR, embedding_lr=ours.EMBEDDING_LR,
                              matrix_lr=ours.MATRIX_LR, weight_decay=ours.WEIGHT_DECAY, adam_betas=ours.ADAM_BETAS,
                              scalar_lr=ours.SCALAR_LR)
    loss_grad = fork["nn"].value_and_grad(model, lambda m, x, y: m(x, targets=y))
    loader = prepare.make_dataloader(tokenizer, ours.DEVICE_BATCH_SIZE, seq_len, "train", backend="mlx")

    def step(x, y):
        loss, grads = loss_grad(model, x, y)
        mx.eval(loss, grads)
        optimizer.update(model, grads)
        mx.eval(model.parameters(), *optimizer.state)

    return timed(step, loader, steps, [ours.DEVICE_BATCH_SIZE, seq_len], dtype)


def run_child(path: Path, steps: int, env: dict, loss_streams: int | None = None, fork: bool = False) -> dict:
    extra = ["--loss-streams", str(loss_streams)] if loss_streams else []
    extra += ["--fork-one"] if fork else []
    out = subprocess.run([sys.executable, __file__, "--one", str(path), "--steps", str(steps), *extra], cwd=REPO,
                         env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{path.name}: the step failed\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", default=BASELINE, help="git revision of the baseline train_mlx.py")
    p.add_argument("--profile", default="standard")
    p.add_argument("--steps", type=int, default=2, help="timed micro-steps per version")
    p.add_argument("--loss-streams", type=int, help="streams for the chunked loss of the current file "
                                                      "(default: the file's own choice, one per core on a CPU)")
    p.add_argument("--fork", type=Path, metavar="DIR",
                   help="a checkout of trevin-creator/autoresearch-mlx: measure its train.py's step too")
    p.add_argument("--one", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--fork-one", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        measured = measure_fork(args.one, args.steps) if args.fork_one else measure_one(args.one, args.steps,
                                                                                         args.loss_streams)
        print(json.dumps(measured))
        return 0
    if args.fork and not (args.fork / "train.py").is_file():
        raise SystemExit(f"--fork {args.fork}: no train.py there; check out the fork first "
                         "(git clone https://github.com/trevin-creator/autoresearch-mlx DIR)")
    from prepare import use_tuned_blas
    use_tuned_blas()  # Linux CPUs: OpenBLAS over MLX's bundled BLAS, as the trainer runs
    env = {**os.environ, "AUTORESEARCH_PROFILE": args.profile}
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "train_mlx_baseline.py"
        shown = subprocess.run(["git", "show", f"{args.baseline}:train_mlx.py"], cwd=REPO, capture_output=True, text=True)
        if shown.returncode != 0:
            raise SystemExit(f"git show {args.baseline}:train_mlx.py failed: {shown.stderr.strip()}")
        old.write_text(shown.stdout)
        results = {}
        versions = [("baseline", old), ("now", REPO / "train_mlx.py")]
        versions += [("fork", args.fork / "train.py")] if args.fork else []
        for name, path in versions:
            print(f"{name}: {path} ({args.profile} profile, {args.steps} timed micro-steps) ...", flush=True)
            results[name] = r = run_child(path, args.steps, env, args.loss_streams if name == "now" else None,
                                          fork=name == "fork")
            print(f"  peak {r['peak_gib']:.2f} GiB, {r['tokens_per_s']:,.0f} tokens/s "
                  f"(micro-batch {r['micro_batch'][0]} x {r['micro_batch'][1]}, {r['dtype']}, {r['device']}; "
                  f"steps {', '.join(f'{s:.1f}' for s in r['step_seconds'])} s)", flush=True)
    b, n = results["baseline"], results["now"]
    print(f"\nnow / baseline: peak memory {n['peak_gib'] / b['peak_gib']:.3f}x, "
          f"tokens/s {n['tokens_per_s'] / b['tokens_per_s']:.3f}x")
    if "fork" in results:
        f = results["fork"]
        print(f"now / fork: peak memory {n['peak_gib'] / f['peak_gib']:.3f}x, "
              f"tokens/s {n['tokens_per_s'] / f['tokens_per_s']:.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
