"""
GPU check for train.py (the torch trainer) on a lent NVIDIA GPU, e.g. an H100.
Installs nothing and reaches no network.

1. train.py in the smoke profile (tiny model: does it run, compile and score?)
2. train.py in the standard profile (upstream's model: depth 8, 2048-token rows,
   524K-token steps) for --seconds of training (default 60) on the builtin data
3. the same two runs of train_mlx.py when MLX with CUDA is importable (carried wheels)

and prints tokens/s, MFU, peak memory and val_bpb of each run, plus the attention
implementation train.py chose (FA3 needs the kernel hub; offline it falls back to flex).

Needs: this Python with CUDA torch, numpy, tiktoken and pyarrow; and the builtin dataset
already prepared under $AUTORESEARCH_CACHE (on a machine with network access:
`AUTORESEARCH_CACHE=DIR uv run prepare.py --dataset builtin`, then copy DIR over).

Usage:  AUTORESEARCH_CACHE=DIR python3 bench/gpu_check.py [--seconds 60] [--attention auto,sdpa] [--out DIR]
Target (issue 5): MFU >= 35% in the standard profile without FA3 (upstream reports 39.8% with FA3).
Note: the builtin validation shard is small, so standard-profile val_bpb here scores the whole
shard (eval_tokens says how much); it is not comparable with climbmix numbers.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SUMMARY_KEYS = ("val_bpb", "training_seconds", "total_seconds", "peak_vram_mb", "mfu_percent",
                "total_tokens_M", "num_steps", "num_params_M", "depth", "backend", "device",
                "dataset", "profile", "eval_tokens")


def parse_run(output):
    """Summary fields, plus tokens/s and the attention kind from the log lines before it."""
    if "\n---\n" not in output:
        return None
    summary = {}
    for line in output.rsplit("\n---\n", 1)[1].splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in SUMMARY_KEYS:
            summary[key.strip()] = value.strip()
    throughput = re.search(r"Throughput: ([\d,]+) tokens/s", output)
    if throughput:
        summary["tokens_per_s"] = float(throughput.group(1).replace(",", ""))
    elif "total_tokens_M" in summary and float(summary.get("training_seconds", 0)) > 0:
        summary["tokens_per_s"] = float(summary["total_tokens_M"]) * 1e6 / float(summary["training_seconds"])
    attention = re.search(r"attention: (\w+)", output)
    if attention:
        summary["attention"] = attention.group(1)
    return summary


def run(label, script, profile, env_extra, timeout, log_dir):
    env = {**os.environ, "AUTORESEARCH_PROFILE": profile, "AUTORESEARCH_DATASET": "builtin",
           "PYTHONUNBUFFERED": "1", **env_extra}
    print(f"\n=== {label}: {script} profile={profile} {' '.join(f'{k}={v}' for k, v in env_extra.items())}", flush=True)
    t0 = time.time()
    try:
        proc = subprocess.run([sys.executable, script], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=timeout)
        output, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        output = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        rc = "timeout"
    output = output.replace("\r", "\n")
    if log_dir:
        (Path(log_dir) / f"{label}.log").write_text(output)
    lines = [ln for ln in output.splitlines() if ln.strip() and not ln.startswith("step ")]
    print("\n".join(lines[-32:]), flush=True)
    summary = parse_run(output) if rc == 0 else None
    print(f"=== {label}: rc={rc} in {time.time() - t0:.0f}s", flush=True)
    return {"label": label, "rc": rc, "summary": summary}


def mlx_cuda_available():
    probe = "import mlx.core as mx; import sys; sys.exit(0 if mx.cuda.is_available() else 1)"
    try:
        return subprocess.run([sys.executable, "-c", probe], capture_output=True, timeout=120).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def main():
    parser = argparse.ArgumentParser(description="train.py smoke + short standard run on a GPU")
    parser.add_argument("--seconds", type=float, default=60, help="training seconds of the standard run")
    parser.add_argument("--attention", default="auto",
                        help="comma list of train.py attention kinds for the standard run: auto, fa3, flex, sdpa")
    parser.add_argument("--skip-smoke", action="store_true")
    parser.add_argument("--out", default=os.environ.get("OUT"), help="folder for logs and results.json")
    args = parser.parse_args()

    import torch
    if not torch.cuda.is_available():
        sys.exit(f"gpu_check: torch {torch.__version__} sees no CUDA GPU; run this on the GPU machine.")
    cache = os.environ.get("AUTORESEARCH_CACHE")
    if not cache or not (Path(cache) / "builtin").is_dir():
        sys.exit("gpu_check: set AUTORESEARCH_CACHE to a cache where `uv run prepare.py --dataset builtin` "
                 "has run (this check reaches no network, so it cannot prepare the data itself).")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
    print(f"GPU: {torch.cuda.get_device_name()} | torch {torch.__version__} | CUDA {torch.version.cuda} | "
          f"cache {cache}", flush=True)

    results = []
    if not args.skip_smoke:
        results.append(run("torch-smoke", "train.py", "smoke", {}, 900, args.out))
    for kind in [k.strip() for k in args.attention.split(",") if k.strip()]:
        results.append(run(f"torch-standard-{kind}", "train.py", "standard",
                           {"AUTORESEARCH_TIME_BUDGET": str(args.seconds), "AUTORESEARCH_ATTENTION": kind},
                           args.seconds + 900, args.out))
    if mlx_cuda_available():
        if not args.skip_smoke:
            results.append(run("mlx-smoke", "train_mlx.py", "smoke", {}, 900, args.out))
        if "AUTORESEARCH_TIME_BUDGET" in (REPO / "train_mlx.py").read_text():
            results.append(run("mlx-standard", "train_mlx.py", "standard",
                               {"AUTORESEARCH_TIME_BUDGET": str(args.seconds)}, args.seconds + 900, args.out))
        else:  # a 300 s run would not fit a short GPU lease
            print("\ntrain_mlx.py reads no AUTORESEARCH_TIME_BUDGET: its standard run is skipped.", flush=True)
    else:
        print("\nMLX with CUDA is not importable here: train_mlx.py skipped "
              "(carry the mlx and mlx-cuda wheels to include it).", flush=True)

    print("\n| run | attention | tokens/s | MFU % | peak memory MB | val_bpb | steps | training s | eval tokens |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        s = r["summary"]
        if s is None:
            print(f"| {r['label']} | failed (rc={r['rc']}) | | | | | | | |")
            continue
        print(f"| {r['label']} | {s.get('attention', '-')} | {s.get('tokens_per_s', 0):,.0f} | {s.get('mfu_percent')} | "
              f"{s.get('peak_vram_mb')} | {s.get('val_bpb')} | {s.get('num_steps')} | {s.get('training_seconds')} | "
              f"{s.get('eval_tokens')} |")
    if args.out:
        (Path(args.out) / "results.json").write_text(json.dumps(
            {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "runs": results}, indent=2))
    return 0 if all(r["summary"] is not None for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
