"""bench/research.py: the planted handicaps and the A/A agent do what the benchmark claims."""
import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
import research  # noqa: E402

from autoresearch.agents import Context  # noqa: E402
from autoresearch.agents.hparam import read_constants  # noqa: E402


def constants(text):
    return {name: value for name, value, _ in read_constants(text)}


def test_handicaps_change_only_what_they_name():
    text = (REPO / "train_mlx.py").read_text()
    before = constants(text)
    lr = constants(research.plant(text, ["lr"]))
    for name in research.LEARNING_RATES:
        assert lr[name] == pytest.approx(before[name] * 0.25, rel=1e-3)
    assert {k: v for k, v in lr.items() if k not in research.LEARNING_RATES} == \
        {k: v for k, v in before.items() if k not in research.LEARNING_RATES}
    both = constants(research.plant(text, ["warmdown", "depth"]))
    assert both == {**before, "WARMDOWN_RATIO": 0.0, "DEPTH": 8}
    with pytest.raises(SystemExit, match="unknown handicap"):
        research.plant(text, ["fast"])


def test_the_aa_agent_changes_comments_only(tmp_path):
    text = (REPO / "train_mlx.py").read_text()
    (tmp_path / "train_mlx.py").write_text(text)
    agent = research.CommentAgent()
    seen = {text}
    for n in range(3):
        ctx = Context(tmp_path, "train_mlx.py", "", "", [{}] * (n + 1))
        agent.propose(ctx)
        edited = (tmp_path / "train_mlx.py").read_text()
        assert edited not in seen and ast.dump(ast.parse(edited)) == ast.dump(ast.parse(text))
        seen.add(edited)


def test_a_resumed_arm_counts_only_the_minutes_its_loop_ran(tmp_path):
    from autoresearch.ledger import Ledger
    ledger = Ledger(tmp_path, "aa")
    times = [("session", 0), ("result", 600), ("start", 900),          # killed here, 15 min in
             ("session", 5000), ("result", 5300)]                        # resumed an hour later
    for event, t in times:
        ledger.append(event)
    lines = (tmp_path / "ledger.jsonl").read_text().splitlines()
    import json
    records = [json.loads(line) for line in lines]
    for r, (_, t) in zip(records, times):
        r["time"] = 1_000_000 + t
    (tmp_path / "ledger.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert research.active_minutes(Ledger(tmp_path, "aa")) == pytest.approx((900 + 300) / 60)
    with pytest.raises(SystemExit, match="--resume"):
        research.main(["--arm", "greedy", "--resume", "--seeds", "1", "--workdir", str(tmp_path / "none"),
                       "--profile", "smoke"])


def test_rescoring_starts_from_the_loops_kernels_of_the_start_and_runs_in_rounds(tmp_path, monkeypatch):
    """The re-scoring checkout begins from the start's kernels that the loop compiled (each cold
    compile costs a cpu run ~55 s), never from those of an agent's file; and it runs a round per
    seed, so a keep and its parent, or the best and the start, are measured minutes apart."""
    text = (REPO / "train_mlx.py").read_text()
    start, keep1, best = research.plant(text, ["lr"]), research.plant(text, ["warmdown"]), text
    key = research.kernel_key(start.encode())
    loop = research.checkout(tmp_path / "loop", start)
    kernels = loop / ".git" / "autoresearch-kernels"
    for k in (key, research.kernel_key(keep1.encode())):
        (kernels / k).mkdir(parents=True)
        (kernels / k / "kernel.so").write_text(f"built by the loop for {k}")
    calls, found = [], []

    def fake_measure(trainer, root, runs, timeout, first_seed, **kw):
        found.append(sorted(p.name for p in (root / ".git" / "autoresearch-kernels").iterdir()))
        calls.append(({start: "start", keep1: "keep 1", best: "best"}[(root / "train_mlx.py").read_text()],
                      runs, first_seed))
        return [2.5] * runs, list(range(first_seed, first_seed + runs)), []

    monkeypatch.setattr(research, "measure", fake_measure)
    scores = research.FreshScores(tmp_path, 4, name="arm.scores.json", kernels_from=loop)
    scores.kernel_seed = key
    research.score_in_rounds(scores, [("start", start, 4), ("keep 1", keep1, 2), ("best", best, 4)])
    assert found[0] == [key]      # the start's kernels only
    assert (tmp_path / "rescore" / ".git" / "autoresearch-kernels" / key / "kernel.so").read_text() == \
        f"built by the loop for {key}"
    assert calls == [("start", 1, 1000), ("keep 1", 1, 1000), ("best", 1, 1000),
                     ("start", 1, 1001), ("keep 1", 1, 1001), ("best", 1, 1001),
                     ("start", 1, 1002), ("best", 1, 1002), ("start", 1, 1003), ("best", 1, 1003)]
    assert (tmp_path / "arm.scores.json").exists() and not (tmp_path / "scores.json").exists()


def test_keeps_before_the_best_get_fewer_seeds_and_are_judged_on_the_seeds_both_ran(tmp_path, monkeypatch):
    """A keep on the way runs --keep-seeds fresh seeds, the best the full count, and each is
    compared with its parent on their shared seeds, not on means over different seed sets; a
    file asked for more seeds later runs only the missing ones."""
    text = (REPO / "train_mlx.py").read_text()
    start, keep1, best = research.plant(text, ["lr"]), research.plant(text, ["warmdown"]), text
    # val_bpb by file and seed: keep1 beats the start on seeds 1000-1001 (2.50 < 2.52) although
    # the start's 4-seed mean (2.505) is below keep1's 2-seed mean; the best loses to keep1.
    table = {start: [2.52, 2.52, 2.49, 2.49], keep1: [2.50, 2.50, 2.40, 2.40], best: [2.51, 2.51, 2.51, 2.51]}
    calls = []

    def fake_measure(trainer, root, runs, timeout, first_seed, **kw):
        file = (root / "train_mlx.py").read_text()
        calls.append((file, runs, first_seed))
        seeds = [s for s in range(first_seed, first_seed + runs) if s != 1003 or file != best]  # seed 1003 crashes
        return [table[file][s - research.FRESH_SEED] for s in seeds], seeds, ["seed 1003: crashed"] * (runs - len(seeds))

    monkeypatch.setattr(research, "measure", fake_measure)
    scores = research.FreshScores(tmp_path, 4)
    start_fresh = scores.of(start, "start")
    keeps = [({"exp": 1, "description": "warmdown", "val_bpb": 2.4}, keep1),
             ({"exp": 2, "description": "lr", "val_bpb": 2.3}, best)]
    rows, best_fresh = research.rescore_keeps(scores, keeps, start_fresh, 2)
    assert [(runs, first) for _, runs, first in calls] == [(4, 1000), (2, 1000), (4, 1000)]
    assert rows[0]["fresh_seeds"] == 2 and rows[0]["paired_seeds"] == 2 and rows[0]["beats_parent"]
    assert rows[0]["paired_gain"] == pytest.approx(0.02)
    assert rows[1]["paired_seeds"] == 2 and not rows[1]["beats_parent"]   # 2.51 against keep1's 2.50
    assert best_fresh == {1000: 2.51, 1001: 2.51, 1002: 2.51}             # the crash is left out

    again = research.FreshScores(tmp_path, 4)   # from scores.json: keep1 now needs 2 more seeds only
    assert again.of(keep1, "keep 1") == {1000: 2.50, 1001: 2.50, 1002: 2.40, 1003: 2.40}
    assert calls[-1][1:] == (2, 1002)
    assert again.of(keep1, "keep 1", 2) == {1000: 2.50, 1001: 2.50} and len(calls) == 4
    assert again.of(best, "best") == best_fresh and len(calls) == 4      # a crashed seed is not re-run


def test_an_aa_arm_that_kept_nothing_does_not_call_its_baseline_runs_fresh_seeds():
    summary = {"arm": "aa", "rule": "noise", "agent": "comment-only", "handicap": ["none"], "experiments": 12,
               "keeps": 0, "reruns": 3, "minutes": 26.9, "start": 2.3109, "reference": 2.3109, "best": 2.3109,
               "gap_recovered": None, "keep_precision": None, "kept": []}
    assert "fresh-seed" not in research.report(summary) and "nothing re-scored" in research.report(summary)
    assert "fresh-seed means: start 2.3109" in research.report(dict(summary, arm="noise"))
