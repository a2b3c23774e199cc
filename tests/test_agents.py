"""The three agents: hparam (offline search), anthropic (real SDK against a local stub of the
Messages API on 127.0.0.1), claude-code (a fake `claude` executable on PATH)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import anthropic
import git
import pytest

from autoresearch.agents import AgentFailed, Context, make_digest
from autoresearch.agents.anthropic_api import (AnthropicAgent, TrainingFileEditor, EditorError, price_for,
                                               usage_cost)
from autoresearch.agents.claude_code import ClaudeCodeAgent
from autoresearch.agents.hparam import HparamAgent, blob_hash, read_constants, set_constant
from autoresearch.ledger import Ledger
from autoresearch.runner import RunConfig, Runner, run
from autoresearch.trainer import SetupError, Trainer
from loop_fixtures.anthropic_stub import StubAPI
from loop_fixtures.helpers import HERE, cli_env, fake_val_of, ledger_records, make_repo, run_cli, tsv_rows

PROJECT = HERE.parent.parent


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for k in list(os.environ):
        if k.startswith(("AUTORESEARCH_", "FAKE_", "ANTHROPIC_")):
            monkeypatch.delenv(k)


@pytest.fixture
def stub():
    s = StubAPI()
    yield s
    s.close()


def runner_for(repo_dir, agent, out=None, sleeps=None, **config):
    config = RunConfig(tag="a", backend="mlx", **config)
    return Runner(repo_dir, config, agent, Trainer.for_backend("mlx"),
                  out=(out.append if out is not None else (lambda s: None)),
                  sleep=(sleeps.append if sleeps is not None else (lambda s: None)))


def client_for(stub, max_retries=2):
    return anthropic.Anthropic(base_url=stub.url, api_key="test-key", max_retries=max_retries)


# -- hparam --------------------------------------------------------------------------------
TRAINER = '''"""docstring"""
import os
SOME_FLOAT_BEFORE = 1.5

def model(): pass

# ---------------------------------------------------------------------------
# Hyperparameters (edit these directly)
# ---------------------------------------------------------------------------
TOTAL_BATCH_SIZE = 2**16 # not a literal: left alone
MATRIX_LR = 0.04        # Muon
WARMUP_RATIO = 0.0
WARMDOWN_RATIO = 0.9
DEVICE_BATCH_SIZE = 16  # ints other than DEPTH are tied to asserts
DEPTH = 4
if True:
    DEPTH = 2

def main():
    MATRIX_LR = 1.0
'''


def test_hparam_reads_the_hyperparameter_block_and_edits_in_place():
    consts = read_constants(TRAINER)
    assert [(n, v) for n, v, _ in consts] == [("MATRIX_LR", 0.04), ("WARMUP_RATIO", 0.0),
                                              ("WARMDOWN_RATIO", 0.9), ("DEPTH", 4)]
    out = set_constant(TRAINER, "MATRIX_LR", 0.06)
    assert "MATRIX_LR = 0.06        # Muon\n" in out and "    MATRIX_LR = 1.0" in out
    assert out.replace("0.06", "0.04", 1) == TRAINER


def test_hparam_search_follows_the_documented_strategy(tmp_path):
    f = tmp_path / "train_mlx.py"
    f.write_text(TRAINER)
    agent = HparamAgent()
    # the runner's baseline result carries the content hash (blob) of the file it scored
    history = [{"status": "keep", "description": "baseline", "blob": blob_hash(TRAINER)}]
    proposed = []

    def step(status):
        ctx = Context(tmp_path, "train_mlx.py", "", "", list(history))
        prop = agent.propose(ctx)
        proposed.append(f.read_text())
        history.append({"status": status, "agent_meta": prop.meta, "description": prop.description})
        if status != "keep":
            f.write_text(prev)
        return prop.meta["hparam"]

    prev = f.read_text()
    m = step("keep")                       # first move: first constant, upwards
    assert (m["name"], m["direction"], m["new"]) == ("MATRIX_LR", 1, 0.08)
    prev = f.read_text()
    m = step("discard")                    # after a keep: same constant, same direction
    assert (m["name"], m["direction"], m["new"]) == ("MATRIX_LR", 1, 0.16)
    m = step("discard")                    # it came from below: no reversal, next constant
    assert (m["name"], m["direction"], m["new"]) == ("WARMUP_RATIO", 1, 0.05)
    m = step("discard")                    # failed up move -> down; 0.0 cannot go down: next constant
    assert (m["name"], m["direction"], m["new"]) == ("WARMDOWN_RATIO", 1, 0.95)   # clamped fraction
    m = step("discard")
    assert (m["name"], m["direction"]) == ("WARMDOWN_RATIO", -1) and m["new"] == pytest.approx(0.45)
    m = step("discard")
    assert (m["name"], m["direction"], m["new"]) == ("DEPTH", 1, 5)
    m = step("discard")
    assert (m["name"], m["direction"], m["new"]) == ("DEPTH", -1, 3)
    # Back at MATRIX_LR: 0.08 -> 0.16 already ran and 0.08 -> 0.04 is the baseline's file, and
    # every other move at step 2 was tried: the step shrinks instead of re-proposing a file.
    m = step("discard")
    assert (m["name"], m["direction"], m["new"]) == ("MATRIX_LR", 1, 0.1131)
    assert m["factor"] == pytest.approx(2 ** 0.5)
    for _ in range(8):
        m = step("discard")
    assert m["factor"] < 2 ** 0.5                 # finer still after another sweep
    assert len(set(proposed)) == len(proposed) and TRAINER not in proposed   # no file proposed twice
    assert "DEPTH = 2" in f.read_text()     # the indented override is never touched


def test_hparam_skips_files_it_already_proposed_even_when_they_crashed(tmp_path):
    """A resumed run: the history holds a crashed proposal (no runner blob, only the agent's
    own record) and the runner's blob of a discarded file; neither is proposed again."""
    f = tmp_path / "train_mlx.py"
    f.write_text(TRAINER)
    up = set_constant(TRAINER, "MATRIX_LR", 0.08)
    down = set_constant(TRAINER, "MATRIX_LR", 0.02)
    history = [{"status": "keep", "description": "baseline", "blob": blob_hash(TRAINER)},
               {"status": "crash", "description": "MATRIX_LR 0.04 -> 0.08",
                "agent_meta": {"hparam": {"name": "MATRIX_LR", "old": 0.04, "new": 0.08, "direction": 1,
                                          "factor": 2.0, "blob": blob_hash(up)}}},
               {"status": "discard", "description": "by hand", "blob": blob_hash(down)}]
    prop = HparamAgent().propose(Context(tmp_path, "train_mlx.py", "", "", history))
    # the plan's first move (MATRIX_LR down after a failed up move) is the discarded file
    assert prop.description == "WARMUP_RATIO 0.0 -> 0.05" and f.read_text() not in (up, down)
    assert prop.meta["hparam"]["blob"] == blob_hash(f.read_text())


def test_offline_agents_propose_distinct_moves_while_others_are_in_flight(tmp_path):
    """A wave (run --workers N): N proposals from the same file before any is told. hparam skips
    files in flight; hparam-tpe keeps their trials pending (ask N) instead of failing them."""
    from autoresearch.agents.tpe import TPEAgent
    f = tmp_path / "train_mlx.py"
    history = [{"exp": 0, "status": "keep", "description": "baseline", "val_bpb": 1.5, "blob": blob_hash(TRAINER)}]
    for agent, key in ((HparamAgent(), "hparam"), (TPEAgent(seed=3), "tpe")):
        flying = []
        for i in range(4):
            f.write_text(TRAINER)                     # the runner resets to the wave's parent
            ctx = Context(tmp_path, "train_mlx.py", "", "", list(history), tag="w", in_flight=list(flying))
            prop = agent.propose(ctx)
            flying.append({"exp": i + 1, "description": prop.description, "blob": blob_hash(f.read_text()),
                           "agent_meta": prop.meta})
        assert len({c["blob"] for c in flying}) == 4 and blob_hash(TRAINER) not in {c["blob"] for c in flying}
    study = _study(tmp_path, "w")
    from optuna.trial import TrialState
    pending = [t.number for t in study.trials if t.state == TrialState.RUNNING]
    assert pending == [c["agent_meta"]["tpe"]["trial"] for c in flying]      # none failed while in flight


def test_the_digest_lists_the_candidates_in_flight():
    hist = [{"exp": 0, "commit_short": "c000000", "val_bpb": 1.0, "memory_gb": 1.0, "status": "keep",
             "description": "baseline"}]
    text = make_digest(hist, "train_mlx.py", in_flight=["wider MLP", "lower LR"])
    assert "Being trained now" in text and "  - wider MLP" in text and "  - lower LR" in text
    assert "Being trained now" not in make_digest(hist, "train_mlx.py")


def test_hparam_edits_the_real_trainers_constants():
    for name in ("train_mlx.py", "train.py"):
        path = PROJECT / name
        if not path.exists():
            continue
        names = [n for n, _, _ in read_constants(path.read_text())]
        assert "MATRIX_LR" in names and "DEPTH" in names and "TOTAL_BATCH_SIZE" not in names


# -- hparam-tpe (Optuna) ---------------------------------------------------------------------
def _study(d, tag):
    import optuna
    return optuna.load_study(study_name=f"autoresearch/{tag}", storage=f"sqlite:///{d / 'optuna.db'}")


def test_tpe_proposes_points_of_the_space_fixed_at_the_start(tmp_path):
    from autoresearch.agents.tpe import TPEAgent, search_space
    space = search_space(TRAINER)
    assert space == {"MATRIX_LR": ["float", 0.005, 0.32, True], "WARMUP_RATIO": ["float", 0.0, 0.95, False],
                     "WARMDOWN_RATIO": ["float", 0.0, 0.95, False], "DEPTH": ["int", 1, 8, False]}
    f = tmp_path / "train_mlx.py"
    f.write_text(TRAINER)
    history = [{"exp": 0, "status": "keep", "description": "baseline", "val_bpb": 1.5, "blob": blob_hash(TRAINER)}]
    seen = set()
    for i in range(6):
        prop = TPEAgent(seed=1).propose(Context(tmp_path, "train_mlx.py", "", "", list(history), tag="u"))
        text = f.read_text()
        values = {n: v for n, v, _ in read_constants(text)}
        assert all(space[n][1] <= v <= space[n][2] for n, v in values.items())
        assert "DEPTH = 2" in text and "    MATRIX_LR = 1.0" in text     # indented lines untouched
        assert prop.meta["tpe"]["trial"] == i + 1 and prop.meta["tpe"]["blob"] == blob_hash(text)
        assert text not in seen and text != TRAINER
        seen.add(text)
        history.append({"exp": i + 1, "status": "discard", "description": prop.description,
                        "val_bpb": 2.0 + i, "agent_meta": prop.meta})
        f.write_text(TRAINER)                              # the runner resets a discard
    study = _study(tmp_path, "u")
    told = [(t.number, t.value) for t in study.trials if t.value is not None]
    assert told == [(0, 1.5)] + [(i + 1, 2.0 + i) for i in range(5)]
    assert study.trials[0].params == {"MATRIX_LR": 0.04, "WARMUP_RATIO": 0.0, "WARMDOWN_RATIO": 0.9, "DEPTH": 4}


def test_tpe_is_told_only_the_runners_record_through_a_resume(tmp_path):
    """The loop with the hparam-tpe agent: every value in the study is the ledger's value of
    that experiment (crashes fail), and `--resume` continues the same study."""
    d = tmp_path / "p"
    make_repo(d)
    r = run_cli(d, "run", "--agent", "hparam-tpe", "--backend", "mlx", "--tag", "t", "--max-experiments", "4",
                "--decide", "greedy")
    assert r.returncode == 0, r.stderr
    r = run_cli(d, "run", "--resume", "--tag", "t", "--max-experiments", "8")
    assert r.returncode == 0, r.stderr
    results = ledger_records(d, "result")
    study = _study(d, "t")
    assert len(results) == 9 and len(study.trials) >= 9
    assert study.trials[0].value == results[0]["val_bpb"] and study.trials[0].user_attrs["baseline"]
    import optuna
    for rec in results[1:-1]:     # the last result is told at the next proposal
        trial = study.trials[rec["agent_meta"]["tpe"]["trial"]]
        if rec["status"] in ("keep", "discard"):
            assert trial.value == rec["val_bpb"] == fake_val_of(git.Repo(d).git.show(f"{rec['commit']}:train_mlx.py"))
        else:
            assert rec["status"] == "crash" and trial.state == optuna.trial.TrialState.FAIL
    assert git.Repo(d).git.status("--porcelain") == ""    # optuna.db is one of the run's untracked books


# -- anthropic -----------------------------------------------------------------------------
def test_anthropic_tool_use_edit_end_turn_through_the_loop(tmp_path, stub):
    d = tmp_path / "p"
    make_repo(d)
    agent = AnthropicAgent(client=client_for(stub))
    runner = runner_for(d, agent, max_experiments=2)
    assert run(runner, resume=False) == 0
    rows = tsv_rows(d)
    assert [(r[3], r[4]) for r in rows] == [("keep", "baseline"), ("keep", "MATRIX_LR 0.04 -> 0.06"),
                                            ("keep", "MATRIX_LR 0.06 -> 0.09")]
    posts = stub.messages()
    assert len(posts) == 6    # view, str_replace, end turn; per experiment
    for body in posts:
        assert body["tools"] == [{"type": "text_editor_20250728", "name": "str_replace_based_edit_tool"}]
        assert body["system"][0]["cache_control"] == {"type": "ephemeral"}
        assert body["system"][0]["text"] == (d / "program.md").read_text()
        assert body["model"] == "claude-sonnet-4-6"
    # A fresh conversation per experiment, opened by the digest of the run so far.
    firsts = [b for b in posts if len(b["messages"]) == 1]
    assert len(firsts) == 2
    assert "Baseline: val_bpb" in firsts[0]["messages"][0]["content"]
    assert "MATRIX_LR 0.04 -> 0.06" in firsts[1]["messages"][0]["content"]
    # The model id was checked at start; the key travelled with every request.
    assert any(m == "GET" and p == "/v1/models/claude-sonnet-4-6" for m, p, _, _ in stub.requests)
    headers = {k.lower(): v for k, v in stub.requests[-1][2].items()}
    assert "test-key" in (headers.get("authorization", "") + headers.get("x-api-key", ""))
    # Cost: 3 responses per experiment, each 1000 in + 100 out + 2000 cache reads at $3/$15.
    per_exp = 3 * (1000 * 3 + 100 * 15 + 2000 * 0.3) / 1e6
    results = ledger_records(d, "result")
    assert results[1]["cost_usd"] == pytest.approx(per_exp)
    assert Ledger(d, "a").spent_usd() == pytest.approx(2 * per_exp)


def test_anthropic_529_then_success_is_retried_by_the_sdk(tmp_path, stub):
    d = tmp_path / "p"
    make_repo(d)
    stub.fail_next = [529]
    agent = AnthropicAgent(client=client_for(stub, max_retries=2))
    ctx = Context(d, "train_mlx.py", "program", "digest", [])
    prop = agent.propose(ctx)
    assert prop.description == "MATRIX_LR 0.04 -> 0.06"
    posts = [r for r in stub.requests if r[0] == "POST"]
    assert len(posts) == 4 and posts[1][2].get("x-stainless-retry-count") == "1"


def test_anthropic_long_outage_pauses_the_loop_then_resumes(tmp_path, stub):
    d = tmp_path / "p"
    make_repo(d)
    agent = AnthropicAgent(client=client_for(stub, max_retries=1))
    out, sleeps = [], []
    runner = runner_for(d, agent, out=out, sleeps=sleeps, max_experiments=1, outage_wait_s=30)
    runner.start()
    assert runner.baseline()
    stub.fail_next = [529] * 5     # SDK: 2 tries per call -> unavailable twice, then half a third
    runner.loop()
    assert sleeps == [30, 60]      # paused twice, doubling, instead of ending the run
    assert sum("pausing" in line for line in out) == 2
    rows = tsv_rows(d)
    assert [(r[3], r[4]) for r in rows] == [("keep", "baseline"), ("keep", "MATRIX_LR 0.04 -> 0.06")]


def test_anthropic_outage_longer_than_the_limit_stops_resumably(tmp_path, stub):
    d = tmp_path / "p"
    make_repo(d)
    agent = AnthropicAgent(client=client_for(stub, max_retries=0))
    runner = runner_for(d, agent, max_experiments=1, outage_wait_s=10, outage_give_up_s=25)
    runner.start()
    assert runner.baseline()
    stub.fail_next = [529] * 100
    from autoresearch.runner import RunStopped
    with pytest.raises(RunStopped, match="--resume"):
        runner.loop()
    assert (d / "train_mlx.py").read_text() == (HERE / "fake_train.py").read_text()


def test_anthropic_max_spend_stops_the_loop(tmp_path, stub):
    d = tmp_path / "p"
    make_repo(d)
    stub.usage = {"input_tokens": 10_000, "output_tokens": 1000,
                  "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}
    per_exp = 3 * (10_000 * 3 + 1000 * 15) / 1e6          # 0.135
    out = []
    runner = runner_for(d, AnthropicAgent(client=client_for(stub)), out=out, max_experiments=10,
                        max_spend=0.30)
    assert run(runner, resume=False) == 3
    assert len(tsv_rows(d)) == 3                            # baseline + 2: a third could pass $0.30
    spent = Ledger(d, "a").spent_usd()
    assert spent == pytest.approx(2 * per_exp) and spent <= 0.30
    assert any("--max-spend" in line for line in out)


def test_anthropic_edit_outside_the_training_file_is_refused(tmp_path, stub):
    d = tmp_path / "p"
    make_repo(d)
    stub.attack_path = "prepare.py"
    before = (d / "prepare.py").read_text()
    prop = AnthropicAgent(client=client_for(stub)).propose(Context(d, "train_mlx.py", "p", "d", []))
    assert (d / "prepare.py").read_text() == before
    second = stub.messages()[1]["messages"][-1]["content"][0]
    assert second["type"] == "tool_result" and second["is_error"] is True
    assert second["content"].startswith("Refused") and "train_mlx.py" in second["content"]
    assert prop.description == "MATRIX_LR 0.04 -> 0.06"     # it went on with a legal edit


def test_editor_commands_and_path_guard(tmp_path):
    (tmp_path / "train_mlx.py").write_text("A = 1\nB = 2\nB = 2\n")
    ed = TrainingFileEditor(tmp_path, "train_mlx.py")
    assert ed({"command": "view", "path": "train_mlx.py", "view_range": [2, -1]}) == "     2\tB = 2\n     3\tB = 2"
    with pytest.raises(EditorError, match="exactly once"):
        ed({"command": "str_replace", "path": "train_mlx.py", "old_str": "B = 2", "new_str": "B = 3"})
    ed({"command": "insert", "path": str(tmp_path / "train_mlx.py"), "insert_line": 1, "insert_text": "C = 0"})
    assert (tmp_path / "train_mlx.py").read_text() == "A = 1\nC = 0\nB = 2\nB = 2\n"
    for bad in ("prepare.py", "../train_mlx.py", "/etc/passwd", "sub/train_mlx.py"):
        with pytest.raises(EditorError, match="Refused"):
            ed({"command": "create", "path": bad, "file_text": "x"})
    with pytest.raises(EditorError, match="Unsupported"):
        ed({"command": "undo_edit", "path": "train_mlx.py"})


def test_anthropic_model_and_key_are_checked_at_start(stub, monkeypatch):
    with pytest.raises(SetupError, match="--model"):
        AnthropicAgent(model="claude-nonexistent", client=client_for(stub)).check()
    AnthropicAgent(model="claude-sonnet-4-6", client=client_for(stub)).check()
    with pytest.raises(SetupError, match="ANTHROPIC_API_KEY"):
        AnthropicAgent().check()


def test_prices(monkeypatch):
    assert price_for("claude-sonnet-4-5-20250929") == (3.0, 15.0)
    assert price_for("claude-opus-4-1-20250805") == (15.0, 75.0)
    assert price_for("claude-opus-4-5") == (5.0, 25.0)
    assert price_for("some-future-model") == (15.0, 75.0)      # unknown: priced high
    monkeypatch.setenv("AUTORESEARCH_PRICE", "2,10")
    assert price_for("some-future-model") == (2.0, 10.0)
    monkeypatch.setenv("AUTORESEARCH_PRICE", "cheap")
    with pytest.raises(SetupError, match="AUTORESEARCH_PRICE"):
        price_for("x")
    monkeypatch.delenv("AUTORESEARCH_PRICE")
    u = {"input_tokens": 1_000_000, "output_tokens": 0, "cache_creation_input_tokens": 1_000_000,
         "cache_read_input_tokens": 1_000_000}
    assert usage_cost("claude-haiku-4-5", u) == pytest.approx(1.0 + 1.25 + 0.1)


def test_digest_is_compact_and_complete():
    hist = [{"exp": i, "commit_short": f"c{i:06d}", "val_bpb": 1.0 - i * 0.001, "memory_gb": 1.0,
             "status": "keep" if i % 10 == 0 else "discard", "description": f"idea {i}"} for i in range(40)]
    text = make_digest(hist, "train_mlx.py", crash_log="Traceback\nValueError: shapes")
    assert "Baseline: val_bpb 1.000000" in text and "Best so far: val_bpb 0.970000" in text
    assert "idea 10 ->" in text and "idea 39" in text and "idea 19" not in text.split("Last")[1]
    assert text.endswith("ValueError: shapes")


# -- claude-code ---------------------------------------------------------------------------
@pytest.fixture
def fake_claude(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shutil.copy(HERE / "fake_claude.py", bin_dir / "claude")
    (bin_dir / "claude").chmod(0o755)
    log = tmp_path / "claude_calls.jsonl"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_CLAUDE_LOG", str(log))
    return log


def test_claude_code_headless_calls_through_the_cli(tmp_path, fake_claude):
    d = tmp_path / "p"
    make_repo(d)
    r = run_cli(d, "run", "--agent", "claude-code", "--backend", "mlx", "--tag", "cc", "--max-experiments", "2",
                "--max-spend", "1.0", "--model", "claude-opus-4-5",
                env=cli_env(PATH=os.environ["PATH"], FAKE_CLAUDE_LOG=str(fake_claude)))
    assert r.returncode == 0, r.stdout + r.stderr
    rows = tsv_rows(d)
    assert [(x[3], x[4]) for x in rows][1:] == [("keep", "MATRIX_LR 0.04 -> 0.06"), ("keep", "MATRIX_LR 0.06 -> 0.09")]
    calls = [json.loads(l) for l in fake_claude.read_text().splitlines()]
    assert len(calls) == 2
    args = calls[0]
    assert args[0] == "-p" and "Baseline: val_bpb" in args[1]
    opt = lambda name: args[args.index(name) + 1]
    assert opt("--output-format") == "json" and opt("--max-turns") == "30"
    assert opt("--allowedTools") == "Read(train_mlx.py),Edit(train_mlx.py)"
    assert "Bash" in opt("--disallowedTools")
    assert opt("--append-system-prompt") == (d / "program.md").read_text()
    assert opt("--model") == "claude-opus-4-5"
    assert float(opt("--max-budget-usd")) == pytest.approx(1.0)
    assert float(calls[1][calls[1].index("--max-budget-usd") + 1]) == pytest.approx(0.95)
    assert Ledger(d, "cc").spent_usd() == pytest.approx(0.10)


def test_claude_code_529_is_an_error_despite_subtype_success(tmp_path, fake_claude, monkeypatch):
    d = tmp_path / "p"
    make_repo(d)
    monkeypatch.setenv("FAKE_CLAUDE_MODE", "overloaded_once")
    out, sleeps = [], []
    runner = runner_for(d, ClaudeCodeAgent(), out=out, sleeps=sleeps, max_experiments=1, outage_wait_s=5)
    assert run(runner, resume=False) == 0
    assert sleeps == [5] and any("529" in line for line in out)
    rows = tsv_rows(d)
    assert rows[1][4] == "MATRIX_LR 0.04 -> 0.06"
    assert Ledger(d, "a").spent_usd() == pytest.approx(0.10)   # the failed call's cost counts too


def test_claude_code_without_an_edit_or_out_of_turns_fails_the_proposal(tmp_path, fake_claude, monkeypatch):
    d = tmp_path / "p"
    make_repo(d)
    ctx = Context(d, "train_mlx.py", "p", "d", [])
    for mode, match in (("noedit", "without editing"), ("max_turns", "turns")):
        monkeypatch.setenv("FAKE_CLAUDE_MODE", mode)
        with pytest.raises(AgentFailed, match=match) as e:
            ClaudeCodeAgent().propose(ctx)
        assert e.value.cost_usd == pytest.approx(0.05)


# -- Claude Code project files -------------------------------------------------------------
HOOK = PROJECT / ".claude" / "hooks" / "protect_files.py"


def hook(tool_name, tool_input, cwd=PROJECT):
    payload = {"hook_event_name": "PreToolUse", "tool_name": tool_name, "tool_input": tool_input,
               "cwd": str(cwd)}
    return subprocess.run([sys.executable, str(HOOK)], input=json.dumps(payload), capture_output=True,
                          text=True, cwd=cwd)


def test_pretooluse_hook_blocks_protected_files_with_exit_code_2():
    for path in ("prepare.py", str(PROJECT / "pyproject.toml"), "uv.lock", "program.md",
                 "autoresearch/runner.py", "metal_kernels/attention.py", "./prepare.py"):
        r = hook("Edit", {"file_path": path, "old_string": "a", "new_string": "b"})
        assert r.returncode == 2 and "protected" in r.stderr, path
    r = hook("Write", {"file_path": "train_mlx.py", "content": "x"})
    assert r.returncode == 0
    r = hook("Edit", {"file_path": str(PROJECT / "train.py")})
    assert r.returncode == 0
    r = hook("Bash", {"command": "sed -i s/a/b/ prepare.py"})
    assert r.returncode == 2
    r = hook("Bash", {"command": "uv run train_mlx.py > run.log 2>&1"})
    assert r.returncode == 0
    r = hook("Bash", {"command": "grep val_bpb run.log; cat prepare.py"})
    assert r.returncode == 0


def test_hook_and_runner_protect_the_same_paths():
    from autoresearch.gitops import PROTECTED_PATHS
    ns = {}
    exec(compile(HOOK.read_text().split("\ndef ")[0], str(HOOK), "exec"), ns)
    assert set(PROTECTED_PATHS) <= set(ns["PROTECTED"])


def test_claude_settings_register_the_hook_and_command():
    settings = json.loads((PROJECT / ".claude" / "settings.json").read_text())
    entries = settings["hooks"]["PreToolUse"]
    assert any("protect_files.py" in h["command"] for e in entries for h in e["hooks"])
    assert any("Edit" in e["matcher"] and "Bash" in e["matcher"] for e in entries)
    assert (PROJECT / ".claude" / "commands" / "experiment.md").exists()
    assert "program.md" in (PROJECT / "CLAUDE.md").read_text()


def test_claude_code_logged_out_stops_with_a_clear_error(tmp_path, fake_claude):
    d = tmp_path / "p"
    make_repo(d)
    r = run_cli(d, "run", "--agent", "claude-code", "--backend", "mlx", "--tag", "lo", "--max-experiments", "1",
                env=cli_env(PATH=os.environ["PATH"], FAKE_CLAUDE_LOG=str(fake_claude), FAKE_CLAUDE_MODE="logged_out"))
    assert r.returncode == 2 and "log in" in r.stderr and "Traceback" not in r.stderr
    # found by the start-up check: no branch, no baseline
    assert not (d / "results.tsv").exists() and "autoresearch/lo" not in git.Repo(d).git.branch()


def test_anthropic_rejected_key_mid_run_is_a_setup_error(tmp_path, stub):
    d = tmp_path / "p"
    make_repo(d)
    stub.fail_next = [401]
    with pytest.raises(SetupError, match="ANTHROPIC_API_KEY"):
        AnthropicAgent(client=client_for(stub)).propose(Context(d, "train_mlx.py", "p", "d", []))


def test_cli_defaults_to_anthropic_when_a_key_is_set(tmp_path, stub):
    from autoresearch.agents import default_agent_name
    d = tmp_path / "p"
    make_repo(d)
    env = cli_env(ANTHROPIC_API_KEY="k-test", ANTHROPIC_BASE_URL=stub.url)
    r = run_cli(d, "run", "--backend", "mlx", "--tag", "env", "--max-experiments", "1", env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "agent anthropic" in r.stdout
    assert [x[4] for x in tsv_rows(d)] == ["baseline", "MATRIX_LR 0.04 -> 0.06"]
    assert ledger_records(d, "session")[0]["model"] == "claude-sonnet-4-6"
    assert default_agent_name() == "hparam"      # this test process has no key


def test_program_md_states_the_integrity_checks_and_the_keep_rule():
    """What the runner enforces, the agent is told: causality (future-reading logits are
    invalid), the harness's eval size and numbers, the hidden slice, and the default noise
    rule's re-run of every apparent gain (program.md is the agents' system prompt)."""
    from autoresearch.cli import build_parser
    from harness.scorer import SCORER_FD_ENV
    text = " ".join((PROJECT / "program.md").read_text().split())
    assert "logits at position t depend on tokens after t, even only sometimes, is scored **invalid**" in text
    assert "picks the validation rows, their order and the number of eval tokens" in text
    assert "runs in an OS sandbox" in text and "validation shard is unreadable" in text
    assert "hidden validation slice" in text.lower() and "kept runs" in text
    assert "re-runs every result better than the best, beside fresh runs of the best" in text and "`--decide noise`" in text
    # the facts behind the text: under the runner prepare.py hands logits to the scorer; noise
    # is the CLI's default rule
    assert "SCORER_FD_ENV" in (PROJECT / "prepare.py").read_text() and SCORER_FD_ENV == "AUTORESEARCH_SCORER_FD"
    args = build_parser().parse_args(["run"])
    assert args.decide is None and args.reruns > 0     # None = noise (cmd_run), small gains re-run
