"""How long the morning report of a long night takes: writing it, and a browser rendering it.

    uv run bench/report.py                     # 1,000 experiments, 1 keep in 12
    uv run bench/report.py --experiments 3000

Builds a synthetic run in a temp git repository (one real commit per experiment, made with
`git fast-import`; each kept commit's diff is read from git like a real run's), a ledger with
every field a real run writes (a 200-point loss curve per run, re-runs, hidden slice), then
times `report_page` and a headless Chromium screenshot of the page (layout and paint of all
of it) against a screenshot of a one-line page in the same script: the difference is what the
report costs the browser.
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from autoresearch.html_report import write_report  # noqa: E402
from autoresearch.ledger import Ledger  # noqa: E402

TRAIN = "MATRIX_LR = {lr}\nEMBEDDING_LR = 0.6\n" + "".join(f"# line {i} of the trainer\n" for i in range(600))


def synthetic_run(root: Path, experiments: int, keep_every: int, seed: int) -> None:
    rng = random.Random(seed)
    subprocess.run(["git", "init", "-q", "-b", "master", str(root)], check=True)
    stream, marks = [], {}
    best_mark, best_val, records = None, 2.6, []
    t0 = time.time() - experiments * 150
    for exp in range(experiments):
        lr = round(0.01 + 0.0001 * exp, 6)
        body = TRAIN.format(lr=lr).encode()
        mark = exp + 1
        stream.append(b"commit refs/heads/autoresearch/bench\nmark :%d\n" % mark)
        stream.append(b"committer Bench <bench@example.com> %d +0000\n" % (t0 + 150 * exp))
        msg = f"exp {exp}".encode()
        stream.append(b"data %d\n%s\n" % (len(msg), msg))
        if best_mark:
            stream.append(b"from :%d\n" % best_mark)
        stream.append(b"M 100644 inline train_mlx.py\ndata %d\n%s\n" % (len(body), body))
        marks[exp] = mark
        keep = exp == 0 or exp % keep_every == 0
        crash = not keep and exp % 37 == 0
        val = None if crash else (best_val - rng.uniform(0.001, 0.01) if keep else best_val + rng.gauss(0.01, 0.01))
        steps = 120 + rng.randint(-5, 5)
        curve = [[s, round(9 * 0.97 ** s + (val or 3.0), 4), 4300, round(1.05 * (s + 1), 3)]
                 for s in range(0, steps, max(1, steps // 200))][:200]
        records.append({"exp": exp, "mark": mark, "parent_mark": best_mark, "status":
                        "keep" if keep else "crash" if crash else "discard", "val_bpb": val, "curve": curve,
                        "time": t0 + 150 * exp})
        if keep:
            best_mark, best_val = mark, val
    fast = subprocess.run(["git", "fast-import", "--quiet", f"--export-marks={root / '.git' / 'marks'}"],
                          cwd=root, input=b"".join(stream), capture_output=True)
    if fast.returncode:
        sys.exit(fast.stderr.decode())
    shas = dict(line.split() for line in (root / ".git" / "marks").read_text().splitlines())
    ledger = Ledger(root, "bench")
    ledger.append("session", resumed=False, branch="autoresearch/bench", base_commit=shas[":1"], backend="mlx",
                  agent="anthropic", model="claude-sonnet", training_file="train_mlx.py",
                  harness={"profile": "cpu", "dataset": "builtin", "eval_tokens": 65536,
                           "decide": {"rule": "noise", "confidence": 0.95, "reruns": 2}})
    for r in records:
        sha = shas[f":{r['mark']}"]
        reruns = r["status"] == "keep" or (r["val_bpb"] or 9) < 2.6
        fields = {"runs": [r["val_bpb"]] * 3, "reruns": 2} if reruns and r["val_bpb"] else {}
        for i in range(2 if fields else 0):
            ledger.append("rerun", exp=r["exp"], seed=43 + i, val_bpb=r["val_bpb"], seconds=140.0)
        ledger.write_result(
            exp=r["exp"], commit=sha, commit_short=sha[:7], status=r["status"], description=f"MATRIX_LR step {r['exp']}",
            val_bpb=r["val_bpb"], memory_gb=0.6, backend="mlx", agent="anthropic", profile="cpu", dataset="builtin",
            eval_tokens=65536, cost_usd=0.02, baseline=r["exp"] == 0, run_seconds=140.0, curve=r["curve"],
            parent=shas[f":{r['parent_mark']}"] if r["parent_mark"] else None, unigram_bpb=3.02,
            hidden_bpb=(r["val_bpb"] - 0.1) if r["val_bpb"] else None, sigma=0.012, decide="noise",
            **({"reason": "crashed (exit 1): RuntimeError: out of memory"} if r["status"] == "crash" else {}),
            **fields)


def screenshot_seconds(browser: str, url: str, tmp: Path, repeats: int) -> float:
    best = float("inf")
    for i in range(repeats):
        t = time.perf_counter()
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp / 'profile'}",
                        f"--screenshot={tmp / f'shot{i}.png'}", "--window-size=1100,1400", url],
                       capture_output=True, check=True, timeout=300)
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--experiments", type=int, default=1000)
    p.add_argument("--keep-every", type=int, default=12)
    p.add_argument("--repeats", type=int, default=3, help="browser loads per page; the fastest counts")
    args = p.parse_args()
    browser = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)),
                   None)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = tmp / "run"
        t = time.perf_counter()
        synthetic_run(root, args.experiments, args.keep_every, seed=0)
        print(f"synthetic run: {args.experiments} experiments in git and the ledger "
              f"({(root / 'ledger.jsonl').stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - t:.1f} s")
        ledger = Ledger(root, "bench")
        t = time.perf_counter()
        page = write_report(ledger, root, root / "report.html")
        write_s = time.perf_counter() - t
        kept = sum(1 for r in ledger.results() if r["status"] == "keep")
        print(f"report_page + write: {write_s:.2f} s ({page.stat().st_size / 1e6:.2f} MB page, {kept} kept diffs)")
        if not browser:
            print("no Chromium on PATH: browser timing skipped (apt-get install chromium)")
            return
        blank = tmp / "blank.html"
        blank.write_text("<!DOCTYPE html><p>baseline</p>")
        base = screenshot_seconds(browser, f"file://{blank}", tmp, args.repeats)
        full = screenshot_seconds(browser, f"file://{page}", tmp, args.repeats)
        print(f"chromium screenshot: one-line page {base:.2f} s, report {full:.2f} s "
              f"(ratio {full / base:.2f}x; the report's own layout and paint: {full - base:.2f} s)")
        print(f"total, writing + rendering the report: {write_s + full - base:.2f} s")
        print(json.dumps({"experiments": args.experiments, "kept": kept, "write_s": round(write_s, 3),
                          "browser_blank_s": round(base, 3), "browser_report_s": round(full, 3),
                          "page_mb": round(page.stat().st_size / 1e6, 3)}))


if __name__ == "__main__":
    main()
