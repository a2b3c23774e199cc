"""`report --html`: the morning report, one self-contained HTML page built from the ledger and git.

Everything is inline (SVG charts, CSS, a few lines of JavaScript that redraw the selected
run's loss curve), so the file opens anywhere without a network. Descriptions, diffs and logs
come from the agent and the untrusted training file: every one of them is escaped, and the
page's only script is ours.
"""
from __future__ import annotations

import html
import json
import math
import statistics
import subprocess
import time
from pathlib import Path

from .ledger import Ledger, write_atomic
from .policy import direction_key, is_finite, report_lines
from .report import floor_lines, metric_of
from .trainer import thin_evenly

W, H = 960, 340                      # chart size in px
LEFT, RIGHT, TOP, BOTTOM = 64, 16, 14, 38
CURVE_POINTS = 100                   # per run in the page: enough for the eye, small for 1,000 runs
WATCH_REFRESH_S = 5


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def fmt(v, digits: int = 6) -> str:
    return f"{v:.{digits}f}" if is_finite(v) else "-"


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / count
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    return [round(first + i * step, 10) for i in range(int((hi - first) / step + 1e-9) + 1)]


class Axes:
    """Maps data to the chart's pixels; a flat range gets a little room."""

    def __init__(self, x0, x1, y0, y1):
        if x1 <= x0:
            x1 = x0 + 1
        if y1 <= y0:
            y0, y1 = y0 - 0.5 * (abs(y0) or 1) * 0.01, y1 + 0.5 * (abs(y1) or 1) * 0.01
        self.x0, self.x1, self.y0, self.y1 = x0, x1, y0, y1

    def x(self, v: float) -> float:
        return round(LEFT + (v - self.x0) / (self.x1 - self.x0) * (W - LEFT - RIGHT), 1)

    def y(self, v: float) -> float:
        v = min(max(v, self.y0), self.y1)
        return round(TOP + (self.y1 - v) / (self.y1 - self.y0) * (H - TOP - BOTTOM), 1)

    def frame(self, xlabel: str, ylabel: str, integer_x: bool = False) -> list[str]:
        out = [f'<rect class="plot" x="{LEFT}" y="{TOP}" width="{W - LEFT - RIGHT}" height="{H - TOP - BOTTOM}"/>']
        for t in nice_ticks(self.y0, self.y1):
            out.append(f'<line class="grid" x1="{LEFT}" x2="{W - RIGHT}" y1="{self.y(t)}" y2="{self.y(t)}"/>'
                       f'<text class="tick" x="{LEFT - 6}" y="{self.y(t) + 4}" text-anchor="end">{t:g}</text>')
        for t in nice_ticks(self.x0, self.x1, 10):
            if integer_x and t != int(t):
                continue
            out.append(f'<text class="tick" x="{self.x(t)}" y="{H - BOTTOM + 16}" text-anchor="middle">{t:g}</text>')
        out.append(f'<text class="label" x="{(LEFT + W - RIGHT) / 2}" y="{H - 4}" text-anchor="middle">{esc(xlabel)}</text>'
                   f'<text class="label" transform="translate(14 {(TOP + H - BOTTOM) / 2}) rotate(-90)" '
                   f'text-anchor="middle">{esc(ylabel)}</text>')
        return out


def noise_sigma(results: list[dict], records: list[dict]) -> float | None:
    """The noise floor the decisions used: the last pooled sigma, else the baseline's runs,
    else a `noise` record."""
    for r in reversed(results):
        if is_finite(r.get("sigma")):
            return r["sigma"]
    for r in results:
        if r.get("baseline") and len(r.get("runs") or []) > 1:
            return statistics.stdev(r["runs"])
    floors = [r for r in records if r.get("event") == "noise" and is_finite(r.get("std"))]
    return floors[-1]["std"] if floors else None


def progress_chart(results: list[dict], sigma: float | None, floor: float | None, name: str, maximize: bool) -> str:
    """The metric per experiment, keeps highlighted, the running best with its noise band, the
    unigram floor; crashed runs as marks along the bottom. Far outliers sit on the top edge."""
    scored = [r for r in results if is_finite(r.get("val_bpb"))]
    kept = [r["val_bpb"] for r in scored if r["status"] == "keep"]
    values = sorted(r["val_bpb"] for r in scored)
    if not values:
        return '<p class="empty">No scored experiments yet.</p>'
    lo, hi = values[0], values[-1]
    typical = values[int(0.9 * (len(values) - 1))]
    cap = max(kept + [typical] + ([floor] if floor else []))
    hi = min(hi, cap + 0.25 * (cap - lo)) if cap > lo else hi
    if floor and not maximize:
        lo, hi = min(lo, floor), max(hi, floor)
    band = sigma or 0.0
    pad = 0.04 * (hi - lo or 1)
    ax = Axes(min(r["exp"] for r in results) - 0.5, max(r["exp"] for r in results) + 0.5,
              lo - band - pad, hi + band + pad)
    out = ax.frame("experiment", f"{name} ({'higher' if maximize else 'lower'} is better)", integer_x=True)

    steps, best = [], None
    for r in results:
        if r["status"] == "keep" and is_finite(r.get("val_bpb")):
            best = r["val_bpb"] if best is None else (max if maximize else min)(best, r["val_bpb"])
        if best is not None:
            steps.append((r["exp"], best))
    if steps:
        steps.append((ax.x1, steps[-1][1]))
        line = []
        for (x, y), (nx, _) in zip(steps, steps[1:] + [(None, None)]):
            line.append((x, y))
            if nx is not None:
                line.append((nx, y))
        if band:
            upper = " ".join(f"{ax.x(x)},{ax.y(y + band)}" for x, y in line)
            lower = " ".join(f"{ax.x(x)},{ax.y(y - band)}" for x, y in reversed(line))
            out.append(f'<polygon class="band" points="{upper} {lower}"><title>noise band: running best '
                       f'&#177; {band:.6g} (one run\'s standard deviation)</title></polygon>')
        out.append('<polyline class="best" points="' + " ".join(f"{ax.x(x)},{ax.y(y)}" for x, y in line) + '"/>')
    if floor:
        out.append(f'<line class="floor" x1="{LEFT}" x2="{W - RIGHT}" y1="{ax.y(floor)}" y2="{ax.y(floor)}"/>'
                   f'<text class="floor-label" x="{W - RIGHT - 4}" y="{ax.y(floor) - 4}" text-anchor="end">'
                   f'unigram floor {floor:.4f}</text>')
    for r in results:
        x = ax.x(r["exp"])
        tip = f"#{r['exp']} {r['status']} {fmt(r.get('val_bpb'))}: {r.get('description', '')}"
        if is_finite(r.get("val_bpb")):
            clipped = " clipped" if r["val_bpb"] > ax.y1 or r["val_bpb"] < ax.y0 else ""
            radius = 5 if r["status"] == "keep" else 3.5
            out.append(f'<circle class="point {esc(r["status"])}{clipped}" data-exp="{r["exp"]}" cx="{x}" '
                       f'cy="{ax.y(r["val_bpb"])}" r="{radius}"><title>{esc(tip)}</title></circle>')
        else:
            y = H - BOTTOM - 6
            out.append(f'<path class="point {esc(r["status"])} mark" data-exp="{r["exp"]}" '
                       f'd="M{x - 4},{y - 4}L{x + 4},{y + 4}M{x - 4},{y + 4}L{x + 4},{y - 4}"><title>{esc(tip)}'
                       f'</title></path>')
    legend = ('<span class="key k-keep">kept</span><span class="key k-discard">discarded</span>'
              '<span class="key k-invalid">invalid</span><span class="key k-crash">crashed (no value)</span>'
              '<span class="key k-best">running best</span>'
              + (f'<span class="key k-band">noise band &#177;{band:.4g}</span>' if band else '')
              + ('<span class="key k-floor">unigram floor</span>' if floor else ''))
    return (f'<svg id="progress" viewBox="0 0 {W} {H}" role="img" aria-label="progress chart">'
            + "".join(out) + f'</svg><div class="legend">{legend}</div>')


def timeline_chart(results: list[dict]) -> str:
    """Parallel runs (run --workers): which experiment's first run ran on which worker, when.
    Empty when the run used no workers."""
    ran = [r for r in results if isinstance(r.get("ran"), dict) and is_finite(r["ran"].get("start"))
           and is_finite(r["ran"].get("end"))]
    if not ran:
        return ""
    lanes = sorted({r["ran"].get("worker", "?") for r in ran})
    t0 = min(r["ran"]["start"] for r in ran)
    t1 = max(r["ran"]["end"] for r in ran)
    lane_h = 26
    height = TOP + BOTTOM + lane_h * len(lanes)
    ax = Axes(0.0, max(t1 - t0, 1.0), 0.0, 1.0)
    out = []
    for i, lane in enumerate(lanes):
        y = TOP + i * lane_h
        out.append(f'<text class="tick" x="{LEFT - 6}" y="{y + lane_h / 2 + 4}" text-anchor="end">{esc(lane[-18:])}'
                   f'<title>{esc(lane)}</title></text>')
    for t in nice_ticks(0.0, ax.x1, 10):
        out.append(f'<text class="tick" x="{ax.x(t)}" y="{height - BOTTOM + 16}" text-anchor="middle">{t:g}</text>')
    out.append(f'<text class="label" x="{(LEFT + W - RIGHT) / 2}" y="{height - 4}" text-anchor="middle">'
               'seconds since the first candidate started</text>')
    for r in ran:
        lane = lanes.index(r["ran"].get("worker", "?"))
        x0, x1 = ax.x(r["ran"]["start"] - t0), ax.x(r["ran"]["end"] - t0)
        y = TOP + lane * lane_h + 3
        tip = (f"#{r['exp']} {r['status']} on {r['ran'].get('worker')}: {r['ran']['end'] - r['ran']['start']:.1f} s, "
               f"{r.get('description', '')}")
        out.append(f'<g class="bar {esc(r["status"])}" data-exp="{r["exp"]}"><rect x="{x0}" y="{y}" '
                   f'width="{max(x1 - x0, 2)}" height="{lane_h - 6}" rx="3"/><text x="{x0 + 4}" y="{y + lane_h / 2 + 1}">'
                   f'#{r["exp"]}</text><title>{esc(tip)}</title></g>')
    return (f'<h2>Workers</h2><svg id="timeline" viewBox="0 0 {W} {height}" role="img" aria-label="workers timeline">'
            + "".join(out) + '</svg><p class="hint">Each candidate\'s first run, by worker; confirming runs and '
            're-runs are not drawn.</p>')


def thin(curve: list, points: int = CURVE_POINTS) -> list[list[float]]:
    """[elapsed s, loss] pairs, at most `points`, the last kept."""
    return thin_evenly([[round(c[3], 2), round(c[1], 4)] for c in curve if len(c) >= 4 and is_finite(c[1])], points)


def curves_chart(results: list[dict], baseline: dict | None, best: dict | None) -> tuple[str, dict]:
    """The training-loss curves of the baseline, the best and the selected run (the newest run
    with a curve until one is clicked), and the curves the page's script can draw."""
    curves = {r["exp"]: thin(r["curve"]) for r in results if r.get("curve")}
    curves = {e: c for e, c in curves.items() if c}
    if not curves:
        return '<p class="empty">No training-loss curves recorded (the runs printed no step lines).</p>', {}
    xs = [p[0] for c in curves.values() for p in c]
    losses = sorted(p[1] for c in curves.values() for p in c)
    early = [c[min(len(c) - 1, len(c) // 10)][1] for c in curves.values()]  # loss a tenth of the way in
    ax = Axes(0, max(xs), losses[0], max(early + [losses[len(losses) // 2]]))
    out = ax.frame("training seconds", "training loss (smoothed)")
    selected = max(curves)
    lines = []
    for role, exp in (("baseline", baseline and baseline["exp"]), ("best", best and best["exp"]),
                      ("selected", selected)):
        pts = " ".join(f"{ax.x(t)},{ax.y(v)}" for t, v in curves.get(exp, []))
        lines.append(f'<polyline class="curve {role}" id="curve-{role}" data-exp="{exp if exp is not None else ""}" '
                     f'points="{pts}"/>')
    out += lines
    label = {r["exp"]: f"#{r['exp']} {r.get('description', '')}" for r in results if r["exp"] in curves}
    svg = (f'<svg id="curves" viewBox="0 0 {W} {H}" data-x0="{ax.x0}" data-x1="{ax.x1}" data-y0="{ax.y0}" '
           f'data-y1="{ax.y1}" data-left="{LEFT}" data-right="{W - RIGHT}" data-top="{TOP}" '
           f'data-bottom="{H - BOTTOM}" role="img" aria-label="training loss curves">' + "".join(out) + "</svg>")
    legend = (f'<div class="legend"><span class="key c-baseline">baseline{esc(_label_of(label, baseline))}</span>'
              f'<span class="key c-best">best{esc(_label_of(label, best))}</span>'
              f'<span class="key c-selected">selected: <span id="selected-label">{esc(label[selected])}</span>'
              f'</span> <span class="hint">(click a row or a point to select a run)</span></div>')
    return svg + legend, {"curves": curves, "labels": label}


def _label_of(labels: dict, r: dict | None) -> str:
    return f" ({labels[r['exp']]})" if r and r["exp"] in labels else ""


def run_seconds(r: dict, reruns: dict[int, float]) -> float | None:
    first = r.get("run_seconds")
    return (first or 0.0) + reruns.get(r["exp"], 0.0) if is_finite(first) else None


def results_table(results: list[dict], name: str, reruns_s: dict[int, float]) -> str:
    head = ("<tr><th>#</th><th>commit</th><th>status</th>"
            f"<th>{esc(name)}</th><th>hidden slice</th><th>runs</th><th>cost $</th><th>seconds</th>"
            "<th>description</th></tr>")
    rows = []
    for r in results:
        runs = r.get("runs") or []
        runs_cell = (f'<span title="{esc(", ".join(fmt(v) for v in runs))}">{len(runs)}</span>' if runs else "1"
                     if is_finite(r.get("val_bpb")) else "-")
        why = r.get("reason") or r.get("note") or ""
        desc = esc(r.get("description", ""))
        if why and r["status"] in ("crash", "invalid"):
            desc += f'<div class="reason">{esc(why)}</div>'
        if r.get("decision"):
            desc += f'<div class="decision">{esc(r["decision"])}</div>'
        secs = run_seconds(r, reruns_s)
        cost = (r.get("cost_usd") or 0.0) + (r.get("judge_cost_usd") or 0.0)
        rows.append(f'<tr class="{esc(r["status"])}" data-exp="{r["exp"]}" id="exp-{r["exp"]}">'
                    f'<td>{r["exp"]}</td><td class="mono">{esc(r.get("commit_short") or "-")}</td>'
                    f'<td><span class="status {esc(r["status"])}">{esc(r["status"])}</span></td>'
                    f'<td class="num">{fmt(r.get("val_bpb"))}</td><td class="num">{fmt(r.get("hidden_bpb"))}</td>'
                    f'<td class="num">{runs_cell}</td><td class="num">{cost:.3f}</td>'
                    f'<td class="num">{f"{secs:.0f}" if secs is not None else "-"}</td><td>{desc}</td></tr>')
    return f'<table id="results"><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table>'


def git_diff(repo_root: Path, parent: str, commit: str, path: str) -> str | None:
    out = subprocess.run(["git", "diff", "--no-color", "--no-ext-diff", "-U3", parent, commit, "--", path],
                         cwd=repo_root, capture_output=True, text=True, errors="replace")
    return out.stdout if out.returncode == 0 else None


def diff_html(diff: str) -> str:
    lines = []
    for line in diff.splitlines():
        if line.startswith(("diff --git", "index ", "--- ", "+++ ")):
            continue
        kind = ("hunk" if line.startswith("@@") else "add" if line.startswith("+") else
                "del" if line.startswith("-") else "ctx")
        lines.append(f'<span class="{kind}">{esc(line)}</span>')
    return "".join(lines)


def kept_diffs(repo_root: Path, results: list[dict], training_file: str, name: str) -> str:
    by_commit = {r["commit"]: r for r in results if r.get("commit") and r["status"] == "keep"}
    blocks = []
    for r in results:
        if r["status"] != "keep" or r.get("baseline") or not r.get("parent") or not r.get("commit"):
            continue
        parent = by_commit.get(r["parent"])
        diff = git_diff(repo_root, r["parent"], r["commit"], training_file)
        was = f"{name} {fmt(parent.get('val_bpb'))} &#8594; " if parent else f"{name} "
        body = (f'<pre class="diff">{diff_html(diff)}</pre>' if diff else
                '<p class="empty">diff unavailable: the commit is no longer in this repository.</p>')
        blocks.append(f'<section class="kept" id="diff-{r["exp"]}"><h3>#{r["exp"]} '
                      f'<span class="mono">{esc(r.get("commit_short"))}</span> {esc(r.get("description", ""))}</h3>'
                      f'<p class="gain">{was}{fmt(r.get("val_bpb"))} (parent '
                      f'<span class="mono">{esc(r["parent"][:7])}</span>)</p>{body}</section>')
    return "".join(blocks) or '<p class="empty">No kept changes yet: the baseline is still the best.</p>'


def settings_rows(session: dict, results: list[dict], ledger: Ledger) -> list[tuple[str, str]]:
    h = session.get("harness") or {}
    decide = h.get("decide") or {}
    last = results[-1] if results else {}
    rule = decide.get("rule") or last.get("decide") or "-"
    rule_text = rule + (f", confidence {decide['confidence']}, {decide.get('reruns')} re-runs"
                        if rule == "noise" and decide.get("confidence") else "")
    rows = [("backend", session.get("backend") or last.get("backend") or "-"),
            ("agent", (session.get("agent") or last.get("agent") or "-")
             + (f" ({session['model']})" if session.get("model") else "")),
            ("keep rule", rule_text)]
    if h.get("mode") == "metric":
        rows += [("metric command", h.get("metric_cmd") or "-"), ("metric regex", h.get("metric_regex") or "-"),
                 ("scope", ", ".join(h.get("scope") or []))]
    else:
        rows += [("profile", str(last.get("profile") or h.get("profile") or "-")),
                 ("dataset", str(last.get("dataset") or h.get("dataset") or "-")),
                 ("eval tokens", f"{last.get('eval_tokens') or h.get('eval_tokens') or '-'}")]
    sessions = ledger.records("session")
    if sessions:
        rows.append(("started", time.strftime("%Y-%m-%d %H:%M", time.localtime(sessions[0]["time"]))))
    rows.append(("API spend", f"${ledger.spent_usd():.4f}"))
    return rows


def warnings_of(results: list[dict], notes: list[str]) -> list[str]:
    warn = [n.split("WARNING: ", 1)[1] for n in notes if "WARNING: " in n]
    kept = [r for r in results if r["status"] == "keep"]
    setups = sorted({(r.get("profile"), r.get("dataset"), r.get("eval_tokens")) for r in kept}, key=str)
    if len(setups) > 1:
        warn.append(f"kept results span several profile / dataset / eval sizes {setups}: they are not comparable.")
    return warn


def report_page(ledger: Ledger, repo_root: Path, refresh_s: int | None = None) -> str:
    repo_root = Path(repo_root)
    results = sorted(ledger.results(), key=lambda r: r["exp"])
    sessions = ledger.records("session")
    session = sessions[-1] if sessions else {}
    harness = session.get("harness") or {}
    name, maximize = metric_of(harness, results)
    kept = [r for r in results if r["status"] == "keep" and is_finite(r.get("val_bpb"))]
    baseline = kept[0] if kept else None
    best = min(kept, key=direction_key) if kept else None
    floor = baseline.get("unigram_bpb") if baseline and is_finite(baseline.get("unigram_bpb")) else None
    sigma = noise_sigma(results, ledger.all_records())
    reruns_s: dict[int, float] = {}
    for e in ledger.records("rerun"):
        reruns_s[e["exp"]] = reruns_s.get(e["exp"], 0.0) + (e.get("seconds") or 0.0)

    notes = report_lines(results)
    headline = ""
    if baseline and best:
        change = abs(best["val_bpb"] - baseline["val_bpb"]) / abs(baseline["val_bpb"] or 1) * 100
        headline = (f"{name} {fmt(baseline['val_bpb'])} &#8594; <b>{fmt(best['val_bpb'])}</b> "
                    f"({change:.2f}% {'higher' if maximize else 'lower'}) at "
                    f"<span class=\"mono\">{esc(best.get('commit_short'))}</span>: {esc(best.get('description', ''))}")
        if sigma:
            headline += f" &#183; gain {abs(best['val_bpb'] - baseline['val_bpb']) / sigma:.1f} &#963; of one run"
        notes = floor_lines(baseline, best) + notes
    counts = ", ".join(f"{sum(1 for r in results if r['status'] == s)} {s}"
                       for s in ("keep", "discard", "crash", "invalid"))
    curves_svg, curve_data = curves_chart(results, baseline, best)
    training_file = session.get("training_file") or "train_mlx.py"
    settings = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>"
                       for k, v in settings_rows(session, results, ledger))
    warnings = "".join(f'<li>{esc(w)}</li>' for w in warnings_of(results, notes))
    data = json.dumps(curve_data, separators=(",", ":"))
    data = data.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    refresh = f'<meta http-equiv="refresh" content="{refresh_s}">' if refresh_s else ""
    updated = time.strftime("%Y-%m-%d %H:%M:%S")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">{refresh}
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>autoresearch/{esc(ledger.tag)}: morning report</title>
<style>{CSS}</style></head>
<body>
<header><h1>autoresearch/{esc(ledger.tag)}</h1>
<p class="headline">{headline or "No kept result yet."}</p>
<p class="counts">{len(results)} experiments: {counts} &#183; updated {updated}
{"&#183; live: reloads every " + str(refresh_s) + " s" if refresh_s else ""}</p></header>
{f'<ul id="warnings">{warnings}</ul>' if warnings else ""}
<h2>Progress</h2>{progress_chart(results, sigma, floor, name, maximize)}
<h2>Training loss</h2>{curves_svg}
{timeline_chart(results)}
<div class="columns"><div><h2>Settings</h2><table id="settings">{settings}</table></div>
<div><h2>Notes</h2><ul id="notes">{"".join(f"<li>{esc(n)}</li>" for n in notes)}</ul></div></div>
<h2>Experiments</h2>{results_table(results, name, reruns_s)}
<h2>Kept changes</h2><p class="hint">Each kept commit's {esc(training_file)} against its parent.</p>
{kept_diffs(repo_root, results, training_file, name)}
<script type="application/json" id="curve-data">{data}</script>
<script>{SCRIPT}</script>
</body></html>
"""


def write_report(ledger: Ledger, repo_root: Path, path: Path, refresh_s: int | None = None) -> Path:
    """Write the page atomically, so a browser reloading mid-write never sees half of it."""
    write_atomic(Path(path), report_page(ledger, repo_root, refresh_s))
    return Path(path)


def watch(ledger: Ledger, repo_root: Path, path: Path, out=print, poll_s: float = 2.0,
          refresh_s: int = WATCH_REFRESH_S) -> None:
    """Rewrite the page whenever the ledger grows, until Ctrl-C."""
    seen = None
    out(f"Watching ledger.jsonl; {path} is rewritten after every experiment (Ctrl-C to stop).")
    try:
        while True:
            size = ledger.path.stat().st_size if ledger.path.exists() else 0
            if size != seen:
                count = len(ledger.results())
                write_report(ledger, repo_root, path, refresh_s)
                out(f"Wrote {path} ({count} experiments)")
                seen = size
            time.sleep(poll_s)
    except KeyboardInterrupt:
        write_report(ledger, repo_root, path)     # the final page stops reloading itself
        out(f"Stopped watching; wrote {path}.")


CSS = """
body{font:14px/1.45 -apple-system,BlinkMacSystemFont,"Segoe UI",Helvetica,Arial,sans-serif;margin:24px auto;
max-width:1000px;color:#1d232a;padding:0 16px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #e3e6ea}
h3{font-size:14px;margin:18px 0 4px}.mono,pre{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace}
.headline{font-size:16px;margin:4px 0}.counts,.hint{color:#5b6670}.hint{font-size:12px}
#warnings{background:#fff4e5;border:1px solid #f0b862;border-radius:6px;padding:8px 8px 8px 28px}
svg{width:100%;height:auto;background:#fff}.plot{fill:#fbfcfd;stroke:#d0d5da}.grid{stroke:#eceff2}
.tick{font-size:11px;fill:#5b6670}.label{font-size:12px;fill:#38424c}
.bar{cursor:pointer}.bar rect{fill:#b4bac0}.bar.keep rect{fill:#2ca02c}.bar.crash rect{fill:#d62728}
.bar.invalid rect{fill:#e08a00}.bar text{font-size:11px;fill:#fff;pointer-events:none}
.point{cursor:pointer}.point.keep{fill:#2ca02c;stroke:#124d12;stroke-width:1}.point.discard{fill:#b4bac0}
.point.invalid{fill:none;stroke:#e08a00;stroke-width:1.5}.point.crash{stroke:#d62728;stroke-width:2;fill:none}
.point.clipped{opacity:.55}.best{fill:none;stroke:#2ca02c;stroke-width:1.6;opacity:.75}
.band{fill:#2ca02c;opacity:.12}.floor{stroke:#7b3fb0;stroke-dasharray:6 4}.floor-label{font-size:11px;fill:#7b3fb0}
.curve{fill:none;stroke-width:1.6}.curve.baseline{stroke:#8a939c}.curve.best{stroke:#2ca02c}
.curve.selected{stroke:#1f6fd1;stroke-dasharray:5 3}
.legend{font-size:12px;color:#38424c;margin:4px 0 0}.key{margin-right:14px}
.key:before{content:"";display:inline-block;width:10px;height:10px;margin-right:4px;vertical-align:-1px;
border-radius:5px;background:#ccc}.key.k-keep:before{background:#2ca02c}.key.k-discard:before{background:#b4bac0}
.key.k-invalid:before{background:none;border:1.5px solid #e08a00}.key.k-crash:before{background:#d62728}
.key.k-best:before,.key.c-best:before{background:#2ca02c;height:3px;border-radius:0}
.key.k-band:before{background:#2ca02c;opacity:.25}.key.k-floor:before{background:#7b3fb0;height:2px;border-radius:0}
.key.c-baseline:before{background:#8a939c;height:3px;border-radius:0}
.key.c-selected:before{background:#1f6fd1;height:3px;border-radius:0}
.columns{display:flex;gap:32px;flex-wrap:wrap}.columns>div{flex:1;min-width:300px}
table{border-collapse:collapse;width:100%}th,td{text-align:left;padding:3px 8px;border-bottom:1px solid #eceff2;
vertical-align:top}#settings th{width:9em;color:#5b6670;font-weight:normal}
#results tbody tr{cursor:pointer}#results tbody tr:hover{background:#f2f6fb}#results tr.picked{background:#e4eefb}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.status{padding:0 6px;border-radius:8px;font-size:12px}.status.keep{background:#dff3df;color:#145214}
.status.discard{background:#eef0f2;color:#4b555e}.status.crash{background:#fbe1e1;color:#8c1414}
.status.invalid{background:#fff0d6;color:#7a4a00}.reason{color:#8c1414;font-size:12px}
.decision{color:#6b7680;font-size:12px}
pre.diff{background:#f7f8fa;border:1px solid #e3e6ea;border-radius:6px;padding:8px;overflow-x:auto;font-size:12px;
margin:4px 0}pre.diff span{display:block}.add{background:#e6f6e6;color:#145214}.del{background:#fbe9e9;color:#8c1414}
.hunk{color:#6b52b5}.ctx{color:#4b555e}.gain{margin:0;color:#38424c}.empty{color:#5b6670}
"""

# Click a table row or a chart point (or link to #exp-N): draw that run's loss curve as "selected".
SCRIPT = """
(function(){
  var data = JSON.parse(document.getElementById('curve-data').textContent || '{}');
  var svg = document.getElementById('curves');
  if (!svg || !data.curves) return;
  var d = svg.dataset, x0 = +d.x0, x1 = +d.x1, y0 = +d.y0, y1 = +d.y1;
  function px(t){ return (+d.left + (t - x0) / (x1 - x0) * (d.right - d.left)).toFixed(1); }
  function py(v){ v = Math.min(Math.max(v, y0), y1); return (+d.top + (y1 - v) / (y1 - y0) * (d.bottom - d.top)).toFixed(1); }
  function pick(exp){
    var c = data.curves[exp], line = document.getElementById('curve-selected');
    document.querySelectorAll('#results tr.picked').forEach(function(r){ r.classList.remove('picked'); });
    var row = document.getElementById('exp-' + exp);
    if (row) row.classList.add('picked');
    document.getElementById('selected-label').textContent = c ? data.labels[exp] : ('#' + exp + ': no curve recorded');
    line.setAttribute('data-exp', exp);
    line.setAttribute('points', c ? c.map(function(p){ return px(p[0]) + ',' + py(p[1]); }).join(' ') : '');
  }
  document.querySelectorAll('#results tbody tr, #progress .point, #timeline .bar').forEach(function(el){
    el.addEventListener('click', function(){ pick(el.getAttribute('data-exp')); });
  });
  var linked = /^#exp-(\d+)$/.exec(location.hash);   // report.html#exp-12 opens with run 12 selected
  if (linked) pick(linked[1]);
})();
"""
