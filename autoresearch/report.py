"""`status` and `report`: read the ledger, print tables, draw progress.png."""
from __future__ import annotations

import os
import time
from pathlib import Path

from . import gitops
from .ledger import Ledger
from .metric import metric_name
from .policy import direction_key, report_lines
from .trainer import group_alive


def _fmt_val(r: dict) -> str:
    return f"{r['val_bpb']:.6f}" if isinstance(r.get("val_bpb"), (int, float)) else "-"


def metric_of(harness: dict, results: list[dict]) -> tuple[str, bool]:
    """(the metric's name, whether higher is better) of a run, from its session's harness."""
    maximize = any(r.get("direction") == "max" for r in results) or harness.get("direction") == "max"
    if harness.get("mode") != "metric":
        return "val_bpb", maximize
    return ("rubric score" if harness.get("rubric") else metric_name(harness.get("metric_regex"))), maximize


def summary_table(results: list[dict], name: str = "val_bpb") -> str:
    rows = sorted(results, key=lambda r: r["exp"])
    lines = [f"{'#':>3}  {'commit':<7}  {name:>9}  {'mem_gb':>6}  {'status':<7}  {'cost$':>6}  description"]
    for r in rows:
        mem = f"{r['memory_gb']:.1f}" if isinstance(r.get("memory_gb"), (int, float)) else "-"
        lines.append(f"{r['exp']:>3}  {r.get('commit_short') or '-':<7}  {_fmt_val(r):>9}  {mem:>6}  "
                     f"{r['status']:<7}  {r.get('cost_usd') or 0:>6.3f}  {r.get('description', '')}")
    counts = {s: sum(1 for r in rows if r["status"] == s) for s in ("keep", "discard", "crash", "invalid")}
    kept = [r for r in rows if r["status"] == "keep"]
    lines.append("")
    lines.append(f"{len(rows)} experiments: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    if kept:
        base, best = kept[0], min(kept, key=direction_key)
        gain = abs(base["val_bpb"] - best["val_bpb"]) / base["val_bpb"] * 100 if base["val_bpb"] else 0.0
        way = "higher" if best.get("direction") == "max" else "lower"
        lines.append(f"baseline {base['val_bpb']:.6f} -> best {best['val_bpb']:.6f} ({gain:.2f}% {way}) "
                     f"at {best['commit_short']}: {best['description']}")
        lines += floor_lines(base, best)
        profiles = sorted({(r.get("profile"), r.get("dataset"), r.get("eval_tokens")) for r in kept}, key=str)
        if len(profiles) > 1:
            lines.append(f"WARNING: results span several profile/dataset/eval sizes {profiles}: not comparable.")
    lines += report_lines(rows)
    return "\n".join(lines)


def floor_lines(base: dict, best: dict) -> list[str]:
    """The unigram floor beside the baseline: a val_bpb not below it learned only token counts."""
    floor = base.get("unigram_bpb")
    if not isinstance(floor, (int, float)) or best.get("direction") == "max":
        return []
    line = (f"unigram floor {floor:.6f}: baseline at {base['val_bpb'] / floor:.3f} x the floor, "
            f"best at {best['val_bpb'] / floor:.3f} x")
    if best["val_bpb"] >= floor:
        line += " (WARNING: not below the floor, the model learned no more than token counts)"
    return [line]


def status_text(ledger: Ledger, repo) -> str:
    results = ledger.results()
    sessions = ledger.records("session")
    lines = [f"run: autoresearch/{ledger.tag}"]
    if sessions:
        s = sessions[-1]
        h = s.get("harness", {})
        started = time.strftime("%Y-%m-%d %H:%M", time.localtime(sessions[0]["time"]))
        lines.append(f"started {started}; backend {s.get('backend')}, agent {s.get('agent')}"
                     + (f" ({s['model']})" if s.get("model") else "")
                     + f", profile {h.get('profile')}, dataset {h.get('dataset')}")
    counts = {st: sum(1 for r in results if r["status"] == st) for st in ("keep", "discard", "crash", "invalid")}
    lines.append(f"experiments: {len(results)} (" + ", ".join(f"{n} {st}" for st, n in counts.items()) + ")")
    best = ledger.best()
    if best:
        base = min((r for r in results if r["status"] == "keep"), key=lambda r: r["exp"])
        lines.append(f"baseline: {base['val_bpb']:.6f}   best: {best['val_bpb']:.6f} at {best['commit_short']} "
                     f"({best['description']})")
        lines += floor_lines(base, best)
    lines.append(f"API spend (agent and judge): ${ledger.spent_usd():.4f}")
    open_exp = ledger.open_experiment()
    if open_exp:
        pgid = ledger.spawned_pgid(open_exp["exp"])
        alive = pgid is not None and group_alive(pgid)
        pid = sessions[-1].get("pid") if sessions else None
        runner_alive = pid is not None and group_alive_pid(pid)
        since = time.time() - open_exp["time"]
        state = (f"training now ({since:.0f} s)" if alive and runner_alive else
                 "interrupted: continue with `autoresearch run --resume`" if not runner_alive else "starting")
        lines.append(f"in flight: experiment {open_exp['exp']} ({open_exp['description']}), {state}")
    try:
        branch = gitops.current_branch(repo)
        lines.append(f"checked out: {branch or 'detached HEAD'} at {gitops.short(gitops.head_sha(repo))}")
    except Exception:  # status must work even on a half-broken repository
        pass
    if results:
        lines.append("last results:")
        for r in results[-5:]:
            lines.append(f"  {r['exp']:>3} {r.get('commit_short') or '-':<7} {_fmt_val(r):>9} {r['status']:<7} "
                         f"{r.get('description', '')}")
    return "\n".join(lines)


def group_alive_pid(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def draw_progress(results: list[dict], path: Path, title: str = "autoresearch") -> None:
    """val_bpb per experiment: discarded runs grey, kept runs green and labelled, the running
    best as a step line; crashed and invalid runs as red marks along the bottom."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows = sorted(results, key=lambda r: r["exp"])
    xs = list(range(len(rows)))
    scored = [(x, r) for x, r in zip(xs, rows) if isinstance(r.get("val_bpb"), (int, float))]
    kept = [(x, r) for x, r in scored if r["status"] == "keep"]
    fig, ax = plt.subplots(figsize=(12, 6), dpi=120)
    disc = [(x, r["val_bpb"]) for x, r in scored if r["status"] != "keep"]
    if disc:
        ax.scatter(*zip(*disc), s=18, color="#bbbbbb", label="discarded", zorder=2)
    if kept:
        ax.scatter([x for x, _ in kept], [r["val_bpb"] for _, r in kept], s=46, color="#2ca02c",
                   edgecolor="black", linewidth=0.5, label="kept", zorder=3)
        maximize = any(r.get("direction") == "max" for _, r in kept)   # general mode, --direction max
        pick = max if maximize else min
        best, steps_x, steps_y = None, [], []
        for x, r in scored:
            if r["status"] == "keep":
                best = r["val_bpb"] if best is None else pick(best, r["val_bpb"])
            if best is not None:
                steps_x.append(x)
                steps_y.append(best)
        ax.step(steps_x, steps_y, where="post", color="#2ca02c", alpha=0.6, linewidth=1.5,
                label="running best", zorder=1)
        for x, r in kept[1:]:
            ax.annotate(r.get("description", "")[:40], (x, r["val_bpb"]), textcoords="offset points",
                        xytext=(4, 6), fontsize=7, rotation=30, color="#1a5e1a")
    bad = [x for x, r in zip(xs, rows) if r["status"] in ("crash", "invalid")]
    if bad and scored:
        lo = min(r["val_bpb"] for _, r in scored)
        ax.scatter(bad, [lo] * len(bad), marker="x", color="#d62728", s=24, label="crash / invalid", zorder=2)
    ax.set_xlabel("experiment")
    maximize = any(r.get("direction") == "max" for r in rows)
    mode = (rows[0].get("backend") == "metric") if rows else False
    ax.set_ylabel(("metric" if mode else "val_bpb") + (" (higher is better)" if maximize else " (lower is better)"))
    ax.set_title(f"{title}: {len(rows)} experiments, {max(len(kept) - 1, 0)} kept improvements")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(loc="best")  # a fixed corner can hide the newest points
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
