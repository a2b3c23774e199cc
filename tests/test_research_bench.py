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
