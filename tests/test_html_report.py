"""The morning report (`autoresearch report --html`): a real run of the runner (real git, the
fake trainer as a real sandboxed subprocess), its page loaded in headless Chromium, the
rendered DOM and a screenshot checked."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest

from autoresearch.ledger import Ledger
from autoresearch.runner import RunConfig, Runner, run
from autoresearch.trainer import Trainer, step_curve
from loop_fixtures.helpers import ScriptedAgent, cli_env, ctrl_c_default, ledger_records, make_repo, run_cli

HOSTILE = "# </pre><img src=x onerror=\"document.title='pwned'\"><script>document.title='pwned'</script>"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for k in list(os.environ):
        if k.startswith(("AUTORESEARCH_", "FAKE_", "ANTHROPIC_")):
            monkeypatch.delenv(k)


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("CI"):
        pytest.fail("no Chromium on PATH: CI installs Debian's chromium (apt-get install chromium)")
    pytest.skip("no Chromium on PATH (apt-get install chromium)")


def browse(url: str, tmp: Path, *flags: str) -> subprocess.CompletedProcess:
    """Headless Chromium on a file:// URL (root needs --no-sandbox; the page is ours)."""
    return subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           f"--user-data-dir={tmp / 'chromium-profile'}", "--virtual-time-budget=3000",
                           *flags, url], capture_output=True, text=True, timeout=120)


class Dom(HTMLParser):
    """Every element of a page as (tag, attrs, own text), for assertions on the rendered DOM."""

    def __init__(self, text: str):
        super().__init__()
        self.elements, self._open = [], []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        element = [tag, dict(attrs), ""]
        self.elements.append(element)
        if tag not in ("img", "br", "meta", "input", "link", "circle", "line", "rect", "polyline", "polygon", "path"):
            self._open.append(element)

    def handle_endtag(self, tag):
        while self._open:
            if self._open.pop()[0] == tag:
                break

    def handle_data(self, data):
        for element in self._open:
            element[2] += data

    def select(self, tag: str, cls: str | None = None, **attrs) -> list:
        return [e for e in self.elements if e[0] == tag
                and (cls is None or cls in e[1].get("class", "").split())
                and all(e[1].get(k.replace("_", "-")) == v for k, v in attrs.items())]

    def by_id(self, ident: str) -> list:
        found = [e for e in self.elements if e[1].get("id") == ident]
        assert found, f"no element #{ident}"
        return found[0]


def set_const(name, value):
    return lambda text: re.sub(rf"^{name} = .*$", f"{name} = {value}", text, count=1, flags=re.M)


def scripted_run(d: Path) -> list[dict]:
    """A run with every kind of row: two keeps (one with a hostile comment), a discard, a
    crash and an invalid edit."""
    make_repo(d)

    def hostile_keep(text):
        return set_const("WARMDOWN_RATIO", 0.6)(text).replace("import math", HOSTILE + "\nimport math", 1)

    def touch_program(text):
        (d / "program.md").write_text("new rules\n")
        return set_const("MATRIX_LR", 0.07)(text)

    agent = ScriptedAgent([("MATRIX_LR 0.04 -> 0.06", set_const("MATRIX_LR", 0.06)),
                           ("MATRIX_LR 0.06 -> 0.5", set_const("MATRIX_LR", 0.5)),
                           ("DEPTH 4 -> 9", set_const("DEPTH", 9)),
                           ("warmdown <b>0.6</b> <script>alert(1)</script>", hostile_keep),
                           ("rewrite the rules", touch_program)])
    runner = Runner(d, RunConfig(tag="night", backend="mlx", max_experiments=5, max_fix_attempts=0), agent,
                    Trainer.for_backend("mlx"), out=lambda s: None, sleep=lambda s: None)
    assert run(runner, resume=False) == 0
    return ledger_records(d, "result")


def test_the_report_of_a_real_run_in_a_real_browser(tmp_path):
    d = tmp_path / "p"
    results = scripted_run(d)
    assert [r["status"] for r in results] == ["keep", "keep", "discard", "crash", "keep", "invalid"]
    # The runner recorded each run's step lines: 20 steps, elapsed time summing their dt.
    curve = results[1]["curve"]
    assert [c[0] for c in curve] == list(range(20)) and curve[-1][3] == pytest.approx(1.0)
    assert curve[-1][1] < curve[0][1] and curve[0][2] == 1234
    assert "out of memory" in results[3]["reason"]

    r = run_cli(d, "report", "--html")
    assert r.returncode == 0, r.stderr
    page = d / "report.html"
    assert f"file://{page}" in r.stdout and not (d / "progress.png").exists()
    text = page.read_text()
    # Self-contained: nothing to fetch, no script but the page's own two blocks.
    written = Dom(text)
    assert not [e for e in written.elements if {"src", "href"} & set(e[1])] and not written.select("link")
    assert "@import" not in text and "url(" not in text
    assert len(written.select("script")) == 2 and not written.select("meta", http_equiv="refresh")

    shown = browse(f"file://{page}#exp-2", tmp_path, "--dump-dom")
    assert shown.returncode == 0, shown.stderr[-2000:]
    dom = Dom(shown.stdout)
    # The hostile description and diff are text, never markup: no image, no extra script ran.
    assert not dom.select("img") and len(dom.select("script")) == 2
    assert "pwned" not in dom.select("title")[0][2]
    # One table row per experiment, in order, with its status; the crash says why.
    rows = [e for e in dom.select("tr") if "data-exp" in e[1]]
    assert [int(e[1]["data-exp"]) for e in rows] == [0, 1, 2, 3, 4, 5]
    assert [e[1]["class"].split()[0] for e in rows] == [r["status"] for r in results]
    assert [e[1]["data-exp"] for e in rows if "picked" in e[1]["class"]] == ["2"]
    assert "out of memory" in rows[3][2] and "<script>alert(1)</script>" in rows[4][2]
    assert "changed program.md" in rows[5][2]
    # The chart: a point per scored run at its experiment, a mark for each run without a value.
    points = dom.select("circle", "point")
    assert sorted(int(p[1]["data-exp"]) for p in points) == [0, 1, 2, 4]
    assert {int(p[1]["data-exp"]) for p in dom.select("circle", "keep")} == {0, 1, 4}
    assert sorted(int(p[1]["data-exp"]) for p in dom.select("path", "point")) == [3, 5]
    best_y = [float(p[1]["cy"]) for p in points if p[1]["data-exp"] == "4"][0]
    on_chart = [p for p in points if "clipped" not in p[1]["class"]]
    assert all(best_y >= float(p[1]["cy"]) for p in on_chart)    # the lowest val_bpb is drawn lowest
    assert [p[1]["data-exp"] for p in points if p not in on_chart] == ["2"]   # an outlier sits on the edge
    assert len(dom.select("polyline", "best")[0][1]["points"].split()) >= 6
    # A diff block per kept change, showing the edit against its parent.
    blocks = dom.select("section", "kept")
    assert [b[1]["id"] for b in blocks] == ["diff-1", "diff-4"]
    assert "-MATRIX_LR = 0.04" in blocks[0][2] and "+MATRIX_LR = 0.06" in blocks[0][2]
    assert "+WARMDOWN_RATIO = 0.6" in blocks[1][2] and "+" + HOSTILE in blocks[1][2]
    # Loss curves: baseline, best, and the run the #exp-2 link selected (the page's script ran).
    assert dom.by_id("curve-baseline")[1]["data-exp"] == "0"
    assert dom.by_id("curve-best")[1]["data-exp"] == "4"
    selected = dom.by_id("curve-selected")
    assert selected[1]["data-exp"] == "2" and len(selected[1]["points"].split()) == 20
    assert dom.by_id("selected-label")[2].startswith("#2 MATRIX_LR 0.06 -> 0.5")
    settings = dom.by_id("settings")[2]
    assert "mlx" in settings and "scripted" in settings and "smoke" in settings and "fake" in settings

    shot = tmp_path / "report.png"
    taken = browse(f"file://{page}", tmp_path, f"--screenshot={shot}", "--window-size=1100,1400")
    assert taken.returncode == 0 and shot.exists(), taken.stderr[-2000:]
    from PIL import Image
    img = Image.open(shot).convert("RGB")
    assert img.size == (1100, 1400)
    colors = img.getcolors(maxcolors=1 << 20)
    assert len(colors) > 100                                      # text and charts, not a blank page
    green = sum(n for n, (r_, g, b) in colors if g > 130 and r_ < 90 and b < 90)   # kept points and the best
    assert green > 50


def test_watch_rewrites_the_page_after_every_experiment_until_ctrl_c(tmp_path):
    d = tmp_path / "p"
    make_repo(d)
    r = run_cli(d, "run", "--agent", "hparam", "--backend", "mlx", "--tag", "w", "--max-experiments", "1")
    assert r.returncode == 0, r.stderr
    page = d / "live.html"
    watcher = subprocess.Popen([sys.executable, "-m", "autoresearch.cli", "report", "--html", "live.html",
                                "--watch"], cwd=d, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, preexec_fn=ctrl_c_default)
    try:
        deadline = time.time() + 60
        while not page.exists() and time.time() < deadline:
            time.sleep(0.2)
        first = page.read_text()
        assert first.count('<tr class="') == 2 and 'http-equiv="refresh"' in first
        r = run_cli(d, "run", "--resume", "--agent", "hparam", "--backend", "mlx", "--tag", "w",
                    "--max-experiments", "3")
        assert r.returncode == 0, r.stderr
        while page.read_text().count('<tr class="') < 4 and time.time() < deadline:
            time.sleep(0.2)
        assert page.read_text().count('<tr class="') == 4
    finally:
        watcher.send_signal(signal.SIGINT)
        out, err = watcher.communicate(timeout=30)
    assert watcher.returncode == 0, err
    assert "Ctrl-C" in out and "Stopped watching" in out
    assert 'http-equiv="refresh"' not in page.read_text()      # the final page stops reloading


def test_report_flags_are_checked_before_anything_runs(tmp_path):
    d = tmp_path / "p"
    make_repo(d)
    r = run_cli(d, "report", "--watch")
    assert r.returncode == 2 and "--html" in r.stderr and "Traceback" not in r.stderr


def test_step_curve_reads_both_trainers_progress_lines_and_thins_them():
    line = ("\rstep {:05d} (1.0%) | loss: {:.6f} | lrm: 1.00 | dt: 250ms | tok/sec: 32,768 | mfu: 1.0% | "
            "epoch: 1 | remaining: 10s    ")
    log = "Attention: mlx\n" + "".join(line.format(i, 9.0 - i / 100) for i in range(500)) + "\n---\nval_bpb: 1.0\n"
    curve = step_curve(log, points=50)
    assert len(curve) == 50 and curve[0] == [0, 9.0, 32768, 0.25] and curve[-1][0] == 499
    assert curve[-1][3] == pytest.approx(125.0)
    assert step_curve("no progress lines\n---\nval_bpb: 1.0\n") == []


def test_general_mode_names_its_metric_everywhere(tmp_path):
    from loop_fixtures.helpers import PROJECT
    from test_metric import PY, init_repo
    d = tmp_path / "newton"
    init_repo(d, copy_from=PROJECT / "examples" / "newton_sqrt")
    r = run_cli(d, "run", "--agent", "hparam", "--tag", "sqrt", "--max-experiments", "2", "--decide", "greedy",
                "--metric-cmd", f"{PY} bench.py", "--metric-regex", r"iterations: (\d+)", "--direction", "min",
                "--scope", "solver.py", env=cli_env())
    assert r.returncode == 0, r.stdout + r.stderr
    rep = run_cli(d, "report", "--html", env=cli_env())
    assert rep.returncode == 0, rep.stderr
    assert rep.stdout.splitlines()[0].split()[2] == "iterations"      # the terminal table's header too
    text = (d / "report.html").read_text()
    assert "val_bpb" not in text
    assert "<th>iterations</th>" in text and "iterations (lower is better)" in text
    assert "solver.py" in text and "bench.py" in text
    assert Ledger(d, "sqrt").results()
