"""Parallel runs on a real local Ray instance (`run --workers N`) and a real Ray head started
with `ray start --head` (`--ray-address`): the runner stays the only writer of git and the
ledger, waves decide honestly, and faults (a worker killed, the runner killed, Ctrl-C) lose
nothing. The trainers are the fake ones, so two cores suffice."""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import git
import pytest

import importlib.util

if importlib.util.find_spec("ray") is None:
    if os.environ.get("CI"):      # CI installs the extra: a missing Ray there is a broken install step
        raise ImportError("Ray is missing: .ci/run must `uv sync --extra ray`")
    pytest.skip("Ray is the optional extra: uv sync --extra ray", allow_module_level=True)

from loop_fixtures.helpers import PROJECT, cli_env, ctrl_c_default, fake_val_of, ledger_records, make_repo, run_cli, tsv_rows  # noqa: E402
from test_loop_faults import check_consistent  # noqa: E402

N = 4
RUN = ("run", "--agent", "hparam", "--backend", "mlx", "--tag", "f", "--max-experiments", str(N),
       "--decide", "greedy", "--workers", "2")


def worker_pids() -> set[int]:
    """Ray's task workers and the sandboxes they started (our runs live in ar-worker-* folders)."""
    pids = set()
    for pid in os.listdir("/proc"):
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if b"ray::run_job" in args or b"ar-worker-" in args:
            pids.add(int(pid))
    return pids


@pytest.fixture(autouse=True)
def no_orphaned_ray_agents(tmp_path):
    """Ray's dashboard and runtime-env agents of a runner killed with SIGKILL outlive it (a Ray
    limitation, harmless to the books): remove the ones left in this test's folders."""
    yield
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if str(tmp_path) in os.readlink(f"/proc/{pid}/cwd"):
                    os.kill(int(pid), signal.SIGKILL)
            except OSError:
                pass


def gone_within(seconds: float, before: set[int] = frozenset()) -> bool:
    """Whether every worker (and trainer) not in `before` has exited within `seconds`."""
    deadline = time.monotonic() + seconds
    while worker_pids() - before:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


def test_a_wave_run_keeps_the_books_in_order_and_every_candidate_reachable(tmp_path):
    d = tmp_path / "p"
    make_repo(d)
    r = run_cli(d, *RUN, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Workers: 2 experiments at once on a local Ray instance" in r.stdout
    rows = check_consistent(d)
    assert len(rows) == N + 1
    results = ledger_records(d, "result")
    assert [x["exp"] for x in results] == list(range(N + 1))     # rows in experiment order
    repo = git.Repo(d)
    starts = {s["exp"]: s for s in ledger_records(d, "start")}
    waves: dict[str, list] = {}
    for x in results[1:]:
        # every candidate is a commit off the best of its wave, kept reachable under a ref of the run
        ref = f"refs/autoresearch/f/exp-{x['exp']}"
        assert repo.git.rev_parse(ref) == x["commit"]
        assert repo.commit(x["commit"]).parents[0].hexsha == starts[x["exp"]]["parent"] == x["parent"]
        assert x["wave"] == 2 and x.get("node")
        # the file it scored is recorded by its content (duplicates and the agents rely on it)
        assert x["blob"] == repo.git.rev_parse(f"{x['commit']}:train_mlx.py")
        waves.setdefault(x["parent"], []).append(x)
    for parent, members in waves.items():
        # the in-flight candidates were distinct moves, and at most one of a wave was kept
        assert len({m["description"] for m in members}) == len(members)
        assert sum(m["status"] == "keep" for m in members) <= 1
    kept = [x for x in results[1:] if x["status"] == "keep"]
    assert kept, r.stdout
    for x in kept:       # kept on a fresh run, never on the run that won the selection
        assert "confirmed on fresh runs only" in x["decision"] and "screen_bpb" in x
    for x in results[1:]:
        assert (d / f"run.exp{x['exp']}.log").exists()
    assert gone_within(10)

    # the morning report's timeline: each candidate's first run on its worker, in a real browser
    from test_html_report import Dom, browse
    r = run_cli(d, "report", "--html")
    assert r.returncode == 0, r.stderr
    dom = Dom(browse((d / "report.html").as_uri(), tmp_path, "--dump-dom").stdout)
    bars = dom.select("g", "bar")
    assert sorted(int(b[1]["data-exp"]) for b in bars) == [1, 2, 3, 4]
    tips = [t[2] for t in dom.select("title")]
    for b in bars:
        x = next(x for x in results if x["exp"] == int(b[1]["data-exp"]))
        assert x["status"] in b[1]["class"].split()
        assert any(t.startswith(f"#{x['exp']} {x['status']} on {x['ran']['worker']}:") for t in tips)
    lanes = {x["ran"]["worker"] for x in results[1:]}
    assert len(lanes) == 2                      # two workers, one lane each
    for x in results[1:]:     # a wave's two first runs overlapped in time
        mates = [y for y in results[1:] if y["parent"] == x["parent"] and y is not x]
        assert any(y["ran"]["start"] < x["ran"]["end"] and x["ran"]["start"] < y["ran"]["end"] for y in mates)


@pytest.mark.slow
def test_a_killed_worker_is_retried_once_then_logged_as_a_crash(tmp_path):
    d = tmp_path / "once"
    make_repo(d)
    r = run_cli(d, *RUN, env=cli_env(AUTORESEARCH_CRASH_AT="worker@1", FAKE_TRAIN_SECONDS="0.5"), timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "[1] the worker died" in r.stdout
    assert [x["exp"] for x in ledger_records(d, "retry")] == [1]
    first = next(x for x in ledger_records(d, "result") if x["exp"] == 1)
    assert first["status"] != "crash" and first["val_bpb"] == pytest.approx(
        fake_val_of(git.Repo(d).git.show(f"{first['commit']}:train_mlx.py")))
    check_consistent(d)

    d = tmp_path / "twice"
    make_repo(d)
    r = run_cli(d, *RUN, env=cli_env(AUTORESEARCH_CRASH_AT="worker-twice@1", FAKE_TRAIN_SECONDS="0.5"), timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    first = next(x for x in ledger_records(d, "result") if x["exp"] == 1)
    assert first["status"] == "crash" and "the worker died twice" in first["reason"]
    rows = check_consistent(d)
    assert len(rows) == N + 1            # the run went on after the crash
    assert not worker_pids()


@pytest.mark.slow
def test_an_agent_that_keeps_failing_stops_a_wave_run(tmp_path, monkeypatch):
    """The runner in process with a real pool: one usable edit, then proposals that fail. The
    waves decide what they have and the run stops after max_agent_failures, not loops."""
    from autoresearch.runner import RunConfig, Runner, run
    from autoresearch.trainer import Trainer
    from autoresearch.workers import Pool, RemoteTrainer
    from loop_fixtures.helpers import ScriptedAgent
    for k in list(os.environ):
        if k.startswith(("AUTORESEARCH_", "FAKE_")):
            monkeypatch.delenv(k)
    d = tmp_path / "p"
    make_repo(d)
    agent = ScriptedAgent([("MATRIX_LR up", lambda t: t.replace("MATRIX_LR = 0.04", "MATRIX_LR = 0.08"))])
    lines = []
    pool = Pool(2, None, "mlx", out=lines.append)
    runner = Runner(d, RunConfig(tag="s", backend="mlx", max_agent_failures=3), agent,
                    RemoteTrainer.wrap(Trainer.for_backend("mlx"), pool), pool=pool, out=lines.append)
    assert run(runner, resume=False) == 3
    assert any("3 proposals in a row without a usable edit" in line for line in lines)
    results = ledger_records(d, "result")
    assert [(x["exp"], x["status"]) for x in results] == [(0, "keep"), (1, "keep")]


def test_a_worker_checks_its_bundle_and_its_nodes_data_before_training(tmp_path):
    """run_job is what a Ray worker executes: a bundle whose protected files do not hash as the
    runner recorded, or a node without the dataset, never trains; a good one trains there."""
    from autoresearch import gitops
    from autoresearch.trainer import Confinement, Trainer
    from autoresearch.workers import Job, make_bundle, run_job
    d = tmp_path / "p"
    make_repo(d)
    repo = git.Repo(d)
    protected = gitops.hash_paths(repo)
    bundle = make_bundle(d)
    trainer = Trainer.for_backend("mlx")
    trainer.confinement = Confinement(sandbox="none", reason="test")
    good = run_job(Job(bundle, protected, trainer, 42, 60, sys.executable))
    assert good["outcome"].ok and good["outcome"].value == pytest.approx(fake_val_of((d / "train_mlx.py").read_text()))
    assert "val_bpb:" in good["log"] and good["ran"]["end"] >= good["ran"]["start"]

    forged = dict(protected, **{"prepare.py": "0" * 64})
    bad = run_job(Job(bundle, forged, trainer, 42, 60, sys.executable))["outcome"]
    assert not bad.ok and "do not hash as the runner recorded (prepare.py)" in bad.problem

    trainer.confinement = Confinement(sandbox="none", reason="test", readable=(str(tmp_path / "no-such-data"),),
                                      harness_env={"AUTORESEARCH_DATASET": "climbmix"})
    missing = run_job(Job(bundle, protected, trainer, 42, 60, sys.executable))["outcome"]
    assert not missing.ok and "run `uv run prepare.py --dataset climbmix` there" in missing.problem


def test_without_workers_ray_is_never_imported(tmp_path):
    d = tmp_path / "p"
    make_repo(d)
    code = ("import sys; from autoresearch import cli; rc = cli.main(['run', '--agent', 'hparam', '--backend', 'mlx', "
            "'--tag', 'n', '--max-experiments', '1', '--decide', 'greedy']); "
            "print('RAY' if 'ray' in sys.modules else 'NO RAY', rc)")
    r = subprocess.run([sys.executable, "-c", code], cwd=d, env=cli_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip().endswith("NO RAY 0")


def test_bad_worker_flags_fail_in_one_line_before_anything_runs(tmp_path):
    d = tmp_path / "p"
    make_repo(d)
    r = run_cli(d, *RUN[:-1], "0")
    assert r.returncode == 2 and "--workers 0: must be at least 1" in r.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]       # free, nothing listens after the close
    r = run_cli(d, *RUN[:-2], "--ray-address", f"127.0.0.1:{port}", timeout=60)
    assert r.returncode == 2 and "nothing answers there" in r.stderr and "ray start --head" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (d / "ledger.jsonl").exists() and git.Repo(d).active_branch.name == "master"


@pytest.mark.slow
@pytest.mark.parametrize("point", ["after_commit@2", "after_log@1"])
def test_a_killed_runner_resumes_a_wave_losing_nothing(tmp_path, point):
    """kill -9 with a wave in flight (after_commit@2: candidate 1 training, 2 just committed)
    or half written (after_log@1): --resume logs what was in flight once, as interrupted."""
    d = tmp_path / "p"
    make_repo(d)
    before = worker_pids()
    r = run_cli(d, *RUN, env=cli_env(AUTORESEARCH_CRASH_AT=point, FAKE_TRAIN_SECONDS="2"), timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stdout + r.stderr
    assert gone_within(30, before), "a worker or its trainer outlived the killed runner"
    r = run_cli(d, "run", "--resume", "--max-experiments", str(N), "--workers", "2", timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = check_consistent(d)
    results = ledger_records(d, "result")
    assert [x["exp"] for x in results] == sorted(x["exp"] for x in results)
    if point.startswith("after_commit"):
        assert "Logged interrupted experiment 1 as a crash" in r.stdout and "never run" in r.stdout
        assert rows[1][3] == "crash" and rows[1][4].endswith("(interrupted)")
        assert rows[2][3] == "crash" and "interrupted before it ran" in rows[2][4]
    else:
        assert rows[2][3] == "crash" and rows[2][4].endswith("(interrupted)")
    for x in results[1:]:
        if x.get("commit"):
            assert git.Repo(d).git.rev_parse(f"refs/autoresearch/f/exp-{x['exp']}") == x["commit"]


@pytest.mark.slow
def test_ctrl_c_stops_every_worker_and_the_run_resumes(tmp_path):
    d = tmp_path / "p"
    make_repo(d)
    p = subprocess.Popen([sys.executable, "-m", "autoresearch.cli", *RUN], cwd=d, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, env=cli_env(FAKE_TRAIN_SECONDS="20"),
                         preexec_fn=ctrl_c_default)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        # both candidates started, each worker with its sandbox
        if len([s for s in ledger_records(d, "start") if s.get("wave")]) == 2 and len(worker_pids()) >= 4:
            break
        time.sleep(0.5)
    else:
        p.kill()
        pytest.fail("the wave never started: " + p.communicate()[0])
    time.sleep(1)
    p.send_signal(signal.SIGINT)
    out, _ = p.communicate(timeout=60)
    assert p.returncode != 0, out
    assert gone_within(10), "a worker or its trainer survived Ctrl-C"
    assert not ledger_records(d, "result")[1:], "nothing of the interrupted wave is decided"
    r = run_cli(d, "run", "--resume", "--max-experiments", str(N), "--workers", "2", timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = check_consistent(d)
    assert [row[3] for row in rows[1:3]] == ["crash", "crash"]


@pytest.fixture
def ray_head(tmp_path):
    """A Ray head on 127.0.0.1 (`ray start --head`), with token authentication as Ray enables
    it by default: {"address", "env"}."""
    ray_bin = str(Path(sys.executable).parent / "ray")
    temp = Path(tempfile.mkdtemp(prefix="ar-head-", dir="/tmp"))
    token = temp / "token"
    token.write_text(secrets.token_hex(32))
    env = cli_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=token)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = subprocess.run([ray_bin, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
                            "--num-cpus", "2", "--resources", json.dumps({"autoresearch_slot": 2}),
                            "--temp-dir", str(temp), "--include-dashboard=false", "--disable-usage-stats"],
                           env=env, capture_output=True, text=True, timeout=180)
    assert start.returncode == 0, start.stdout + start.stderr
    try:
        yield {"address": f"127.0.0.1:{port}", "env": env}
    finally:
        subprocess.run([ray_bin, "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
def test_ray_address_joins_a_head_started_with_ray_start(tmp_path, ray_head):
    d = tmp_path / "p"
    make_repo(d)
    r = run_cli(d, *RUN[:-2], "--ray-address", ray_head["address"], env=ray_head["env"], timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"on Ray cluster at {ray_head['address']}" in r.stdout
    assert "2 experiments at once" in r.stdout          # the head's two slots
    rows = check_consistent(d)
    assert len(rows) == N + 1

    # general mode on the same cluster: a metric command scored on the workers
    g = tmp_path / "general"
    shutil.copytree(PROJECT / "examples" / "newton_sqrt", g)
    from loop_fixtures.helpers import commit_all
    commit_all(g, "newton example")
    r = run_cli(g, "run", "--agent", "hparam", "--tag", "g", "--max-experiments", "2", "--decide", "greedy",
                "--metric-cmd", "python bench.py", "--metric-regex", "time_ms: ([0-9.]+)", "--scope", "solver.py",
                "--ray-address", ray_head["address"], env=ray_head["env"], timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    results = ledger_records(g, "result")
    assert len(results) == 3 and results[0]["status"] == "keep"
    assert all(x.get("node") for x in results[1:])
