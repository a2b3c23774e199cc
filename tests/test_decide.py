"""Keep rules: greedy vs noise-aware, re-runs, the noise floor, identical files never run twice.

The loop tests run the real runner on real git repositories in temp dirs with a stand-in
trainer (tests/decide_fixtures/noisy_train.py) run as a real subprocess: its val_bpb is a
function of its constants plus N(0, 0.03) run-to-run noise from a fixed random stream, so
the A/A test is deterministic and still looks like a real trainer to the runner."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path

import pytest

from autoresearch.decide import Best, Greedy, NoiseAware, duplicate_of, gain, pooled_sigma, spread
from autoresearch.policy import Decisions
from autoresearch.runner import RunConfig, Runner, run
from autoresearch.trainer import Trainer
from loop_fixtures.helpers import ScriptedAgent, cli_env, ledger_records, make_repo, run_cli, tsv_rows

HERE = Path(__file__).parent
NOISY = HERE / "decide_fixtures" / "noisy_train.py"
SIGMA = 0.03


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for k in list(os.environ):
        if k.startswith(("AUTORESEARCH_", "FAKE_", "ANTHROPIC_", "NOISY_")):
            monkeypatch.delenv(k)


# -- the rules on their own --------------------------------------------------------------------
def scripted_reruns(values):
    calls = []

    def rerun(i):
        calls.append(i)
        return values[i - 1]
    return rerun, calls


def test_greedy_keeps_any_improvement_without_reruns():
    rerun, calls = scripted_reruns([])
    assert Greedy().decide(0.999, Best(1.0), rerun).status == "keep"
    assert Greedy().decide(1.0, Best(1.0), rerun).status == "discard"
    assert Greedy().decide(2.0, Best(1.0), rerun, direction="max").status == "keep"
    assert calls == []


def test_noise_aware_thresholds_and_reruns():
    rule = NoiseAware(sigma=0.03, confidence=0.95, reruns=2)
    z = 1.6448536
    assert rule.margin(1, 1) == pytest.approx(z * 0.03 * math.sqrt(2), rel=1e-6)
    # worse or equal: discarded, nothing re-run
    rerun, calls = scripted_reruns([])
    assert rule.decide(1.01, Best(1.0), rerun).status == "discard" and calls == []
    # even a clear win is confirmed by re-runs, so the best is a mean, never one lucky run
    rerun, calls = scripted_reruns([0.93, 0.91])
    v = rule.decide(0.92, Best(1.0), rerun)
    assert v.status == "keep" and v.reruns == 2 and calls == [1, 2] and v.value == pytest.approx(0.92)
    # --reruns 0: one run decides, against z*sigma*sqrt(1 + 1/n_best) = 0.0698
    one = NoiseAware(sigma=0.03, confidence=0.95, reruns=0)
    rerun, calls = scripted_reruns([])
    assert one.decide(0.92, Best(1.0), rerun).status == "keep"
    assert one.decide(0.95, Best(1.0), rerun).status == "discard" and calls == []
    # a small win that the re-runs do not confirm: discarded after 2 re-runs, mean recorded
    rerun, calls = scripted_reruns([0.98, 1.06])
    v = rule.decide(0.93, Best(1.0), rerun)
    assert v.status == "discard" and calls == [1, 2] and v.value == pytest.approx(0.99)
    assert v.runs == [0.93, 0.98, 1.06]
    # a small win the re-runs confirm (mean 0.94 < 1.0 - z*0.03*sqrt(1/3+1) = 0.943)
    rerun, calls = scripted_reruns([0.93, 0.94])
    v = rule.decide(0.95, Best(1.0), rerun)
    assert v.status == "keep" and v.value == pytest.approx(0.94) and calls == [1, 2]
    # re-runs on the leading candidates only: after 0.97 and 1.01 (a mean gain of 0.01), a third
    # run would have to gain 3 * 0.0571 - 2 * 0.01 = 0.151, five sigma: it is not run
    rerun, calls = scripted_reruns([1.01, 0.9])
    v = rule.decide(0.97, Best(1.0), rerun)
    assert v.status == "discard" and calls == [1] and v.runs == [0.97, 1.01] and "stopped early" in v.reason
    assert rule.out_of_reach(0.01, 3, 1, left=1)         # runs 0.97, 1.01 against a best of 1.0
    assert not rule.out_of_reach(0.055, 3, 1, left=1)    # 0.95, 0.94: the third run may get there
    assert not rule.out_of_reach(0.01, 3, 1, left=0)     # nothing left to skip
    # a re-run that crashes: a flaky change is not kept
    rerun, calls = scripted_reruns([None, 0.9])
    assert rule.decide(0.97, Best(1.0), rerun).status == "discard" and calls == [1]
    # the more runs behind the best, the smaller the margin
    assert rule.margin(3, 5) < rule.margin(1, 1)
    # max direction (general mode): higher is better
    rerun, calls = scripted_reruns([1.19, 1.21])
    assert rule.decide(1.2, Best(1.0), rerun, direction="max").status == "keep"
    assert gain(1.2, 1.0, "max") == pytest.approx(0.2) and gain(0.8, 1.0, "min") == pytest.approx(0.2)


def scripted_pairs(candidate, best):
    """rerun and rerun_best drawing from scripted values, recording the order of the runs."""
    order = []

    def rerun(i):
        order.append(("candidate", i))
        return candidate[len([o for o in order if o[0] == "candidate"]) - 1]

    def rerun_best(i):
        order.append(("best", i))
        return best[len([o for o in order if o[0] == "best"]) - 1]
    return rerun, rerun_best, order


def test_paired_rule_compares_with_the_best_run_beside_the_candidate():
    """The box speeds up: the best's recorded 1.0 came from a slow hour, and now every run,
    the best's too, comes out lower. Against the record a no-op edit looks like a clear gain
    and is kept; beside runs of the best taken between its own, it is discarded."""
    rule = NoiseAware(sigma=0.03, confidence=0.95, reruns=3)
    rerun, calls = scripted_reruns([0.94, 0.93, 0.94])
    assert rule.decide(0.93, Best(1.0), rerun).status == "keep"      # 0.935 on 4 runs vs 1.0 recorded
    rerun, rerun_best, order = scripted_pairs([0.94], [0.94, 0.93])
    v = rule.decide(0.93, Best(1.0), rerun, rerun_best=rerun_best)
    # after the best's 0.94 and 0.93 the candidate (0.93) is 0.005 ahead; one more run of it
    # could not reach the margin (t*sigma*sqrt(1/2 + 1/2) = 0.049): stopped before it
    assert v.status == "discard" and order == [("best", 0), ("best", 1)] and "stopped early" in v.reason
    assert v.runs == [0.93] and v.best_runs == [0.94, 0.93] and v.reruns == 2
    # a real gain in the same fast hour: kept on its mean against the best's runs beside it
    rerun, rerun_best, order = scripted_pairs([0.91], [0.96, 0.95])
    v = rule.decide(0.90, Best(1.0), rerun, rerun_best=rerun_best)
    assert v.status == "keep" and v.value == pytest.approx(0.905) and v.best_runs == [0.96, 0.95]
    assert order == [("best", 0), ("best", 1), ("candidate", 1)] and v.seeds == [1] and v.best_seeds == [0, 1]
    # A B B A A B B A: the candidate's runs and the best's are centred on the same moment, so a
    # drift linear in time cancels; each pair of runs shares a seed
    long = NoiseAware(sigma=0.03, confidence=0.95, reruns=7, clear_wins=False)
    rerun, rerun_best, order = scripted_pairs([0.8] * 3, [1.0] * 4)
    v = long.decide(0.8, Best(1.0), rerun, rerun_best=rerun_best)
    assert order == [("best", 0), ("best", 1), ("candidate", 1), ("candidate", 2), ("best", 2), ("best", 3),
                     ("candidate", 3)]
    assert v.status == "keep" and v.reruns == 7 and len(v.runs) == len(v.best_runs) == 4
    # the best crashing beside a candidate: nothing to compare with, discarded
    rerun, rerun_best, order = scripted_pairs([0.9], [None])
    v = rule.decide(0.9, Best(1.0), rerun, rerun_best=rerun_best)
    assert v.status == "discard" and "of the best crashed" in v.reason and order == [("best", 0)]
    # not better than the record: no run of either; --reruns 0: one run against the record
    rerun, rerun_best, order = scripted_pairs([], [])
    assert rule.decide(1.01, Best(1.0), rerun, rerun_best=rerun_best).status == "discard" and order == []
    one = NoiseAware(sigma=0.03, confidence=0.95, reruns=0)
    assert one.decide(0.92, Best(1.0), rerun, rerun_best=rerun_best).status == "keep" and order == []


def test_a_clear_win_is_kept_after_one_run_of_the_best():
    """A lead over the best's run beside it past the margin at confidence 0.99
    (2.33 * 0.03 * sqrt(2) = 0.099 with a normal t) is kept without the other two runs; a lead
    short of it, though far past the final margin, runs the whole confirmation."""
    rule = NoiseAware(sigma=0.03, confidence=0.95, reruns=3)
    rerun, rerun_best, order = scripted_pairs([0.80], [1.00, 1.00])
    v = rule.decide(0.80, Best(1.0), rerun, rerun_best=rerun_best)
    assert v.status == "keep" and order == [("best", 0)] and "clear win" in v.reason
    assert v.value == 0.80 and v.runs == [0.80] and v.best_runs == [1.00] and v.reruns == 1
    rerun, rerun_best, order = scripted_pairs([0.91], [1.00, 1.00])
    v = rule.decide(0.91, Best(1.0), rerun, rerun_best=rerun_best)     # 0.09 ahead: not clear
    assert v.status == "keep" and order == [("best", 0), ("best", 1), ("candidate", 1)]
    # a clear lead of the candidate's first run over a best that ran slower is not a clear win
    # when the best's run itself beat the record: the lead is measured beside it, on one seed
    rerun, rerun_best, order = scripted_pairs([0.99], [0.95, 0.97])
    v = rule.decide(0.90, Best(1.0), rerun, rerun_best=rerun_best)
    assert order[0] == ("best", 0) and len(order) > 1 and "clear win" not in v.reason
    off = NoiseAware(sigma=0.03, confidence=0.95, reruns=3, clear_wins=False)
    rerun, rerun_best, order = scripted_pairs([0.80], [1.00, 1.00])
    assert off.decide(0.80, Best(1.0), rerun, rerun_best=rerun_best).status == "keep" and len(order) == 3
    # with a sigma of few runs behind it the clear-win margin widens with t as the final one does
    few = NoiseAware(sigma=0.03, confidence=0.95, reruns=3, df=3)
    assert few.clear_win(0.15) is None and rule.clear_win(0.15) == pytest.approx(0.0987, abs=1e-3)


def test_sigma_is_pooled_over_samples_of_different_files():
    # squared deviations from each sample's own mean: 0.02 + 0.02 over 2 + 1 degrees of freedom
    sigma, df = pooled_sigma([[1.0, 1.1, 0.9], [2.0, 2.2], [5.0]])
    assert df == 3 and sigma == pytest.approx(math.sqrt(0.04 / 3))
    assert pooled_sigma([[1.0], []]) is None
    rule = NoiseAware(sigma=0.03, confidence=0.95, reruns=2, df=2)
    wide = rule.margin(3, 3)
    rule.pool(0.03, 30)       # the same sigma on more runs: a smaller t, a narrower margin
    assert rule.df == 30 and rule.margin(3, 3) < 0.8 * wide


def test_bad_rule_settings_are_clear_errors():
    with pytest.raises(ValueError, match="confidence"):
        NoiseAware(0.03, confidence=1.5)
    s = spread([1.0, 1.1, 0.9])
    assert s["mean"] == pytest.approx(1.0) and s["std"] == pytest.approx(0.1) and s["n"] == 3


# -- the loop ----------------------------------------------------------------------------------
def add_comment(k):
    """An A/A edit: the file changes (new git blob) but the training does not."""
    return lambda text: text + f"# no-op edit {k}\n"


def set_const(name, value):
    return lambda text: re.sub(rf"^{name} = .*$", f"{name} = {value}", text, count=1, flags=re.M)


def noisy_repo(tmp_path, monkeypatch, name="p"):
    d = tmp_path / name
    make_repo(d)
    shutil.copy(NOISY, d / "train_mlx.py")
    import git
    repo = git.Repo(d)
    repo.git.add("train_mlx.py")
    repo.git.commit("-q", "-m", "noisy trainer")
    monkeypatch.setenv("NOISY_STATE", str(tmp_path / f"{name}.state"))
    monkeypatch.setenv("AUTORESEARCH_SANDBOX", "none")   # the stand-in counts its runs in a file outside the repo
    monkeypatch.setenv("NOISY_SIGMA", str(SIGMA))
    return d


def loop(d, edits, rule, **kw):
    config = RunConfig(tag="t", backend="mlx", max_experiments=len(edits))
    runner = Runner(d, config, ScriptedAgent(edits), Trainer.for_backend("mlx"), out=lambda s: None,
                    sleep=lambda s: None, decisions=Decisions(rule, **kw))
    assert run(runner, resume=False) == 0
    return [r for r in ledger_records(d, "result")]


def test_aa_lucky_run_is_kept_by_greedy_but_rerun_and_discarded_by_the_noise_rule(tmp_path, monkeypatch):
    """The same training file again (a comment added), whose run comes out better than the
    best's record because the box got faster: greedy keeps it; the noise rule runs the best's
    file beside it, which comes out just as low, and discards it. The noise is scripted run
    by run (NOISY_VALUES)."""
    # baseline runs (mean +0.006, std 0.0251), the A/A candidate's run (-0.03), the best's run
    # beside it (-0.02): 0.01 ahead, out of reach of t*sigma*sqrt(1/2 + 1/2) = 0.054 in 2 more runs
    monkeypatch.setenv("NOISY_VALUES", "0.02,-0.03,0.01,0.03,0.0,-0.03,-0.02,0.02")
    d = noisy_repo(tmp_path, monkeypatch, "noise")
    base, aa = loop(d, [("no-op", add_comment(0))], "noise", noise_runs=5)
    c = 1.0 + 0.5 * math.log(0.04 / 0.09) ** 2
    assert base["runs"] == pytest.approx([c + v for v in (0.02, -0.03, 0.01, 0.03, 0.0)], abs=2e-6)
    assert aa["status"] == "discard" and aa["reruns"] == 1 and "stopped early" in aa["decision"]
    assert aa["runs"] == pytest.approx([c - 0.03], abs=2e-6) and aa["best_runs"] == pytest.approx([c - 0.02], abs=2e-6)
    reruns = ledger_records(d, "rerun")
    assert [(r["seed"], r["of_best"]) for r in reruns] == [(42, base["commit"])]
    assert aa["best_seeds"] == [42]
    import git
    assert git.Repo(d).git.status("--porcelain") == ""     # the best's run log is an excluded run output

    monkeypatch.setenv("NOISY_VALUES", "0.02,-0.03")
    g = noisy_repo(tmp_path, monkeypatch, "greedy")
    base, aa = loop(g, [("no-op", add_comment(0))], "greedy")
    assert aa["status"] == "keep" and "runs" not in aa


AA_EDITS = 8


def test_aa_stream_noise_rule_keeps_far_fewer_than_greedy(tmp_path, monkeypatch):
    """Eight no-op edits on a random (fixed) stream of N(0, 0.03) noise."""
    edits = [(f"no-op {k}", add_comment(k)) for k in range(AA_EDITS)]
    d = noisy_repo(tmp_path, monkeypatch, "noise")
    results = loop(d, list(edits), "noise", noise_runs=5)
    noise = ledger_records(d, "noise")
    assert len(noise) == 1 and noise[0]["n"] == 5 and noise[0]["source"] == "baseline"
    base, rest = results[0], results[1:]
    assert base["status"] == "keep" and len(base["runs"]) == 5
    assert base["val_bpb"] == pytest.approx(sum(base["runs"]) / 5)
    assert sum(r.get("reruns", 0) for r in rest) == len(ledger_records(d, "rerun")) > 0
    assert all(r["decide"] == "noise" for r in rest)
    noise_keeps = sum(r["status"] == "keep" for r in rest)

    g = noisy_repo(tmp_path, monkeypatch, "greedy")
    greedy = loop(g, list(edits), "greedy")
    greedy_keeps = sum(r["status"] == "keep" for r in greedy[1:])
    assert not ledger_records(g, "rerun") and not ledger_records(g, "noise")
    assert noise_keeps <= 1 and greedy_keeps >= noise_keeps + 2, (noise_keeps, greedy_keeps)


def test_planted_real_improvements_are_kept(tmp_path, monkeypatch):
    """Scripted noise (sigma ~0.026 from 4 baseline runs): every apparent gain is re-run beside
    runs of the best; two real gains are kept on their means, no-op edits around them are
    discarded once the best's first run beside them puts them out of reach, and sigma is
    pooled over the re-runs as they come in."""
    monkeypatch.setenv("NOISY_VALUES", ",".join(map(str, [
        0.02, -0.03, 0.01, 0.03,       # baseline: 4 runs
        0.0, 0.01,                     # no-op: inside the band; the best beside it does as well
        0.01, 0.0, -0.01, 0.0,         # real gain 0.15: the best twice, then the candidate again
        -0.005, 0.005,                 # no-op after the gain: the best beside it puts it out of reach
        0.03, -0.01, 0.0, -0.01])))    # real gain 0.10, unlucky first run: kept on the means
    d = noisy_repo(tmp_path, monkeypatch)
    results = loop(d, [("no-op", add_comment(0)),
                       ("real gain 0.15", set_const("OFFSET", -0.15)),
                       ("no-op after the gain", add_comment(1)),
                       ("real gain 0.10", set_const("OFFSET", -0.25))], "noise", noise_runs=4)
    by = {r["description"]: r for r in results}
    assert [r["status"] for r in results] == ["keep", "discard", "keep", "discard", "keep"]
    assert [r["reruns"] for r in results[1:]] == [1, 3, 1, 3]
    assert all(r["val_bpb"] == pytest.approx(sum(r["runs"]) / len(r["runs"])) for r in results[1:])
    late = by["real gain 0.10"]
    c = 1.0 + 0.5 * math.log(0.04 / 0.09) ** 2
    # the best's runs beside it are runs of the best's file (OFFSET -0.15), not of the candidate's
    assert late["best_runs"] == pytest.approx([c - 0.16, c - 0.15], abs=2e-6)
    assert late["runs"] == pytest.approx([c - 0.22, c - 0.26], abs=2e-6)
    assert late["val_bpb"] < by["real gain 0.15"]["val_bpb"]
    # the last decision's sigma: the baseline's 4 runs and the best's 2 runs beside the first gain
    sigma, df = pooled_sigma([results[0]["runs"], by["real gain 0.15"]["best_runs"]])
    assert (late["sigma_df"], late["sigma"]) == (df, pytest.approx(sigma, abs=1e-6)) and df == 4
    assert by["no-op"]["sigma_df"] == 3
    import git
    repo = git.Repo(d)
    assert repo.git.status("--porcelain") == "" and repo.head.commit.hexsha == late["commit"]
    s = run_cli(d, "report", env=cli_env())
    assert s.returncode == 0, s.stderr
    assert "keep rule noise: 2 keeps of 4 scored experiments, 8 re-runs" in s.stdout


def test_identical_training_file_is_never_run_twice(tmp_path, monkeypatch):
    d = noisy_repo(tmp_path, monkeypatch)
    results = loop(d, [("lr way up", set_const("MATRIX_LR", 0.5)),
                       ("lr way up again", set_const("MATRIX_LR", 0.5))], "greedy")
    assert [r["status"] for r in results] == ["keep", "discard", "discard"]
    first, again = results[1], results[2]
    assert again["duplicate_of"] == first["exp"] and again["commit"] is None
    assert again["val_bpb"] == first["val_bpb"] and "not re-run" in again["description"]
    # one trainer process per run: baseline + the first edit, none for the duplicate
    assert len(ledger_records(d, "spawn")) == 2


def test_an_agent_stuck_on_files_it_already_tried_stops_the_run(tmp_path, monkeypatch):
    d = noisy_repo(tmp_path, monkeypatch)
    config = RunConfig(tag="t", backend="mlx", max_agent_failures=3)
    agent = ScriptedAgent([("lr up", set_const("MATRIX_LR", 0.5))] * 10)
    runner = Runner(d, config, agent, Trainer.for_backend("mlx"), out=lambda s: None, sleep=lambda s: None,
                    decisions=Decisions("greedy"))
    assert run(runner, resume=False) == 3          # stopped: 3 proposals in a row without a usable edit
    results = ledger_records(d, "result")
    assert [r.get("duplicate_of") for r in results] == [None, None, 1, 1, 1]
    assert len(ledger_records(d, "spawn")) == 2
    # reset to the best: the working file is the baseline's again
    assert duplicate_of(d, "train_mlx.py", ledger_records(d, "result"))["exp"] == 0


def test_noise_command_records_the_floor_and_run_uses_it(tmp_path):
    d = tmp_path / "p"
    make_repo(d)
    shutil.copy(NOISY, d / "train_mlx.py")
    import git
    repo = git.Repo(d)
    repo.git.add("train_mlx.py")
    repo.git.commit("-q", "-m", "noisy trainer")
    env = cli_env(AUTORESEARCH_SANDBOX="none", NOISY_STATE=str(tmp_path / "state"), NOISY_SIGMA="0.03", AUTORESEARCH_SEED="7")
    r = run_cli(d, "noise", "--runs", "4", "--backend", "mlx", env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    rec = ledger_records(d, "noise")[-1]
    assert rec["seeds"] == [7, 8, 9, 10] and rec["n"] == 4 and rec["std"] > 0
    assert rec["mean"] == pytest.approx(sum(rec["values"]) / 4)
    assert "std" in r.stdout and f"{rec['std']:.6f}" in r.stdout
    # the stand-in makes 1 + k % 3 steps on its k-th run: 1, 2, 3, 1
    assert rec["steps"]["values"] == [1, 2, 3, 1] and "optimizer steps: mean 1.8, std 1.0, range 1..3" in r.stdout
    assert repo.git.status("--porcelain") == ""      # ledger and logs are excluded run outputs
    # a run with the noise rule picks the recorded floor: no extra baseline runs
    r = run_cli(d, "run", "--agent", "hparam", "--backend", "mlx", "--tag", "x", "--max-experiments", "1", env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert len(ledger_records(d, "noise")) == 1
    assert f"sigma {rec['std']:.6f}" in r.stdout
    results = ledger_records(d, "result")
    # the floor was measured on the baseline's file: its 4 runs count for the baseline
    assert len(results) == 2 and results[0]["runs"][:4] == rec["values"] and len(results[0]["runs"]) == 5
    assert results[0]["val_bpb"] == pytest.approx(sum(results[0]["runs"]) / 5)
    s = run_cli(d, "report", env=env)
    assert s.returncode == 0 and "re-runs" in s.stdout


def test_kill_during_a_rerun_resumes_with_nothing_lost(tmp_path):
    """kill -9 of the runner while a re-run trains: --resume kills the orphaned trainer, logs
    the experiment once (a crash, interrupted) and goes on from the best commit."""
    from autoresearch.trainer import group_alive
    d = tmp_path / "p"
    make_repo(d)
    shutil.copy(NOISY, d / "train_mlx.py")
    repo = git_repo(d)
    # baseline runs 0, 1; the candidate's first run 2 is inside the noise band; re-run 3 hangs
    env = cli_env(AUTORESEARCH_SANDBOX="none", NOISY_STATE=str(tmp_path / "state"), NOISY_VALUES="0.0,0.06,0.25", NOISY_SLOW_RUNS="3",
                  AUTORESEARCH_CRASH_AT="during_rerun@1")
    r = run_cli(d, "run", "--agent", "hparam", "--backend", "mlx", "--tag", "k", "--max-experiments", "2",
                "--noise-runs", "2", env=env)
    assert r.returncode == -9, r.stdout + r.stderr
    orphan = ledger_records(d, "spawn")[-1]["pgid"]
    assert group_alive(orphan)
    env.pop("AUTORESEARCH_CRASH_AT")
    r = run_cli(d, "run", "--resume", "--max-experiments", "2", env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert not group_alive(orphan) and "Killed the orphaned trainer" in r.stdout
    results = ledger_records(d, "result")
    assert [x["exp"] for x in results] == [0, 1, 2]
    assert results[1]["status"] == "crash" and "(interrupted)" in results[1]["description"]
    assert len(tsv_rows(d)) == 3
    best = min((x for x in results if x["status"] == "keep"), key=lambda x: x["val_bpb"])
    assert repo.head.commit.hexsha == best["commit"]


def git_repo(d):
    import git
    repo = git.Repo(d)
    repo.git.add("train_mlx.py")
    repo.git.commit("-q", "-m", "noisy trainer")
    return repo


def false_keep_bench():
    """bench/false_keep.py as a module (bench/ is not a package)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("false_keep", Path(__file__).parent.parent / "bench" / "false_keep.py")
    fk = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fk)
    return fk


def test_waves_confirm_on_a_fresh_run_so_best_of_n_is_not_a_false_keep():
    """bench/false_keep.py's wave simulation (what run --workers N does): keeping the wave's
    best on its own selected first run keeps no-op candidates about twice as often as one
    experiment's rule; the fresh confirming run brings it back to the sequential rate per
    wave, a quarter of it per candidate."""
    fk = false_keep_bench()
    values = [2.4221, 2.4650, 2.4573, 2.4664, 2.4536]
    _, _, seq = fk.simulate(values, 6000, 5, 2, 0.95, [0.0], True, 0)
    wave = fk.simulate_wave(values, 6000, 5, 2, 0.95, [0.0], True, 0, 4)[0.0]
    assert wave["naive"] > 1.6 * seq[0.0]["noise"]
    assert wave["confirmed"] / 4 < seq[0.0]["noise"]
    assert wave["confirmed"] < seq[0.0]["noise"] + 4 * (seq[0.0]["noise"] / 6000) ** 0.5 + 0.005


def test_after_a_clear_win_the_next_edit_is_judged_as_fairly_for_fewer_runs():
    """bench/false_keep.py --after-keep: a 5-sigma gain is mostly kept as a clear win, on one
    run of its own and one of the best, so the next edit's first run must beat a record of one
    run; that record does not turn real gains away (a 2-sigma gain after it is kept about as
    often as against the baseline) nor let no-ops in, and the pair costs a run less than with
    the full confirmation of every keep."""
    fk = false_keep_bench()
    values = [2.4213, 2.4014, 2.3953, 2.4212, 2.4215]
    _, _, first = fk.simulate(values, 4000, 5, 3, 0.95, [2.0], True, 0)
    after = fk.simulate_after_keep(values, 4000, 5, 3, 0.95, [0.0, 2.0], True, 0, 5.0)
    assert after[2.0]["kept"] > first[2.0]["paired"] - 0.04
    assert after[0.0]["kept"] < 0.06
    fk.CLEAR_WINS = False
    try:
        full = fk.simulate_after_keep(values, 4000, 5, 3, 0.95, [0.0], True, 0, 5.0)
    finally:
        fk.CLEAR_WINS = True
    assert after[0.0]["runs"] < full[0.0]["runs"] - 0.8    # 2 runs for the clear win instead of 4


def test_on_a_drifting_box_pairing_with_the_best_stops_the_false_keeps():
    """bench/false_keep.py --drift: when the box's speed wanders (a random walk of half a
    sigma per run), a no-op edit judged 10 runs after the baseline against the best's record
    is kept several times as often as the rule allows; beside runs of the best it is not,
    and a real 3-sigma gain is still kept most of the time."""
    fk = false_keep_bench()
    values = [2.3095, 2.3148, 2.2965, 2.3163, 2.3072]
    res = fk.simulate_drift(values, 3000, 5, 3, 0.95, [0.0, 3.0], True, 0, 0.5, 10)
    assert res[0.0]["record"] > 0.12 and res[0.0]["paired"] < 0.04
    assert res[3.0]["paired"] > 0.55
    still = fk.simulate_drift(values, 3000, 5, 3, 0.95, [0.0], True, 0, 0.0, 10)   # no drift: both rules hold
    assert still[0.0]["record"] < 0.07 and still[0.0]["paired"] < 0.07
