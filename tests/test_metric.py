"""General-purpose mode: the runner on a non-ML target scored by a command, with a guard;
a yes/no rubric scored by an LLM judge through the real Anthropic SDK against a local stub
of the Messages API on 127.0.0.1."""
from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

import anthropic
import git
import pytest

from autoresearch.judge import JudgeError, RubricJudge, parse_answers, parse_rubric
from autoresearch.metric import MetricTrainer, parse_metric, compile_regex
from autoresearch.policy import Decisions
from autoresearch.runner import RunConfig, Runner, run
from autoresearch.trainer import SetupError
from loop_fixtures.anthropic_stub import StubAPI
from loop_fixtures.helpers import PROJECT, ScriptedAgent, cli_env, ledger_records, run_cli, tsv_rows

EXAMPLE = PROJECT / "examples" / "newton_sqrt"
PY = sys.executable


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for k in list(os.environ):
        if k.startswith(("AUTORESEARCH_", "FAKE_", "ANTHROPIC_")):
            monkeypatch.delenv(k)


def init_repo(d: Path, files: dict[str, str] | None = None, copy_from: Path | None = None) -> git.Repo:
    d.mkdir(parents=True)
    if copy_from:
        for f in copy_from.iterdir():
            if f.is_file():
                shutil.copy(f, d / f.name)
    for name, text in (files or {}).items():
        (d / name).write_text(text)
    (d / ".gitignore").write_text("__pycache__/\n")
    repo = git.Repo.init(d, initial_branch="main")
    with repo.config_writer() as cw:
        cw.set_value("user", "name", "Test")
        cw.set_value("user", "email", "test@example.com")
    repo.git.add("-A")
    repo.git.commit("-q", "-m", "target")
    return repo


SLOW = '''"""Sum of squares, written slowly."""


def total(n):
    s = 0
    for i in range(n):
        for _ in range(40):   # wasted work
            pass
        s += i * i
    return s
'''
FAST = '''"""Sum of squares, closed form."""


def total(n):
    return (n - 1) * n * (2 * n - 1) // 6 if n > 0 else 0
'''
WRONG_BUT_FASTER = '''"""Sum of squares: forgets the work entirely."""


def total(n):
    return 0
'''
BENCH = '''import time
import target
t0 = time.perf_counter()
for _ in range(5):
    target.total(20000)
print(f"elapsed_ms: {(time.perf_counter() - t0) * 1000:.3f}")
'''
GUARD = f'{PY} -c "import target; assert [target.total(n) for n in (0, 1, 10)] == [0, 0, 285]"'


def test_general_mode_speeds_up_a_slow_function_and_reverts_a_guard_failure(tmp_path):
    d = tmp_path / "toy"
    repo = init_repo(d, {"target.py": SLOW, "bench.py": BENCH})
    trainer = MetricTrainer.build(f"{PY} bench.py", r"elapsed_ms: ([0-9.]+)", "min", ["target.py"], guard=GUARD)
    agent = ScriptedAgent([("closed form", FAST), ("skip the work", WRONG_BUT_FASTER), ("slow again", SLOW)])
    out = []
    runner = Runner(d, RunConfig(tag="toy", backend="metric", max_experiments=3, max_fix_attempts=0), agent,
                    trainer, out=out.append, sleep=lambda s: None, decisions=Decisions("noise", noise_runs=3))
    assert run(runner, resume=False) == 0, "\n".join(out)
    results = ledger_records(d, "result")
    assert [r["status"] for r in results] == ["keep", "keep", "crash", "discard"], "\n".join(out)
    base, fast, wrong, slow = results
    assert len(base["runs"]) == 3 and fast["val_bpb"] < base["val_bpb"] / 5
    assert wrong["note"] == "guard failed" and "guard" in (d / "run.log").read_text()
    # the kept change is the branch head; the guard failure and the slow-down were reset
    assert repo.head.commit.hexsha == fast["commit"] and (d / "target.py").read_text() == FAST
    assert repo.active_branch.name == "autoresearch/toy"
    assert repo.git.status("--porcelain", "--untracked-files=no") == ""
    session = ledger_records(d, "session")[0]
    assert session["harness"]["metric_cmd"] == f"{PY} bench.py" and session["harness"]["scope"] == ["target.py"]
    assert [row[3] for row in tsv_rows(d)] == ["keep", "keep", "crash", "discard"]


def test_readme_example_through_the_cli_with_the_offline_agent(tmp_path):
    """The README's general-mode example (examples/newton_sqrt), scored by its deterministic
    iteration count, the hparam agent and the noise rule; the guard keeps the results exact."""
    d = tmp_path / "newton"
    repo = init_repo(d, copy_from=EXAMPLE)
    r = run_cli(d, "run", "--agent", "hparam", "--tag", "sqrt", "--max-experiments", "4",
                "--metric-cmd", f"{PY} bench.py", "--metric-regex", r"iterations: (\d+)", "--direction", "min",
                "--scope", "solver.py", "--guard", f"{PY} test_solver.py", "--noise-runs", "2", env=cli_env())
    assert r.returncode == 0, r.stdout + r.stderr
    results = ledger_records(d, "result")
    assert len(results) == 5 and results[0]["status"] == "keep"
    kept = [x for x in results[1:] if x["status"] == "keep"]
    assert kept and kept[0]["description"].startswith("DAMPING 0.2 -> 0.4")
    best = min((x for x in results if x["status"] == "keep"), key=lambda x: x["val_bpb"])
    assert best["val_bpb"] < results[0]["val_bpb"] and repo.head.commit.hexsha == best["commit"]
    assert "Keep rule: noise-aware" in r.stdout
    s = run_cli(d, "report", env=cli_env())
    assert s.returncode == 0 and "keep rule noise" in s.stdout


def test_metric_flags_are_checked():
    assert parse_metric("time: 3\ntime: 2.5\n", compile_regex(r"time: ([0-9.]+)")) == {"val_bpb": 2.5, "metric": 2.5}
    assert parse_metric("nothing here", compile_regex(r"time: ([0-9.]+)")) is None
    with pytest.raises(SetupError, match="one group"):
        compile_regex(r"(a)(b)")
    with pytest.raises(SetupError, match="not a valid regular expression"):
        compile_regex(r"(")
    with pytest.raises(SetupError, match="--metric-regex"):
        MetricTrainer.build("python bench.py", None, "min", ["x.py"])
    with pytest.raises(SetupError, match="--scope"):
        MetricTrainer.build("python bench.py", "t: (\\d+)", "min", [])


# -- the rubric judge ---------------------------------------------------------------------------
class JudgeStub(StubAPI):
    """A deterministic judge: criterion i is met when the word in `backticks` in it appears in
    the artifact."""

    def reply(self, body):
        prompt = body["messages"][0]["content"]
        criteria = re.findall(r"^(\d+)\. .*?`([^`]+)`", prompt.split("Artifact:")[0], re.M)
        artifact = prompt.split("<artifact>")[1]
        text = "\n".join(f"{n}: {'yes' if word in artifact else 'no'}" for n, word in criteria)
        return self._message(body, [{"type": "text", "text": text}], "end_turn")


RUBRIC = """# What a good note has
- It names the `function`.
- It gives an `example`.
- It states the `complexity`.
"""


@pytest.fixture
def judge_stub():
    s = JudgeStub()
    yield s
    s.close()


def test_rubric_judge_counts_yes_answers_through_the_sdk(judge_stub, tmp_path):
    client = anthropic.Anthropic(base_url=judge_stub.url, api_key="test-key", max_retries=0)
    judge = RubricJudge(parse_rubric(RUBRIC), client=client)
    assert judge.score("the function total and an example") == (2, [True, True, False])
    body = judge_stub.messages()[-1]
    assert body["model"] == "claude-sonnet-4-6" and body["system"].startswith("You are a strict")
    assert "3. It states the `complexity`." in body["messages"][0]["content"]
    assert judge.cost_usd > 0
    with pytest.raises(SetupError, match="3 to 6"):
        parse_rubric("- only one\n- two\n")
    with pytest.raises(JudgeError, match=r"criteria \[2\]"):
        parse_answers("1: yes\n3: no", 3)
    assert parse_answers("1. Yes\n2: **no**\n3) yes", 3) == [True, False, True]


def test_rubric_mode_loop_keeps_what_the_judge_scores_higher(judge_stub, tmp_path, monkeypatch):
    monkeypatch.setenv("ANTHROPIC_BASE_URL", judge_stub.url)
    monkeypatch.setenv("ANTHROPIC_API_KEY", "test-key")
    d = tmp_path / "doc"
    (tmp_path / "rubric.md").write_text(RUBRIC)
    repo = init_repo(d, {"note.md": "Sums squares.\n"})
    trainer = MetricTrainer.build(None, None, "min", ["note.md"], rubric=str(tmp_path / "rubric.md"))
    assert trainer.direction == "max"
    agent = ScriptedAgent([("name the function", "The function `total` sums squares.\n"),
                           ("drop the name", "Sums squares, fast.\n"),
                           ("add an example", "The function total sums squares, for example total(3) = 5.\n")])
    runner = Runner(d, RunConfig(tag="doc", backend="metric", max_experiments=3), agent, trainer,
                    out=lambda s: None, sleep=lambda s: None, decisions=Decisions("greedy"))
    assert run(runner, resume=False) == 0
    results = ledger_records(d, "result")
    assert [(r["status"], r["val_bpb"]) for r in results] == [("keep", 0.0), ("keep", 1.0), ("discard", 0.0),
                                                               ("keep", 2.0)]
    assert results[-1]["summary"]["rubric"] == [True, True, False]
    assert repo.head.commit.hexsha == results[-1]["commit"]
    assert len(judge_stub.messages()) == 4
    from autoresearch.report import draw_progress, summary_table
    assert "baseline 0.000000 -> best 2.000000" in summary_table(results)   # higher is better here
    draw_progress(results, tmp_path / "progress.png")
    assert (tmp_path / "progress.png").stat().st_size > 0


# -- the objective the agents are told ------------------------------------------------------------
class RecordingAgent(ScriptedAgent):
    """A scripted agent that keeps the context of every proposal."""
    name = "recorder"

    def __init__(self, edits):
        super().__init__(edits)
        self.contexts = []

    def propose(self, ctx):
        self.contexts.append(ctx)
        return super().propose(ctx)


def test_general_mode_tells_the_agents_the_metric_and_its_direction(tmp_path, monkeypatch):
    """--direction max with a named metric: digest, prompts, system prompt and the runner's
    lines speak of `throughput`, higher is better; nothing says val_bpb, profile or dataset."""
    from autoresearch.agents import system_prompt
    from autoresearch.agents.anthropic_api import AnthropicAgent, experiment_prompt
    from autoresearch.agents.claude_code import ClaudeCodeAgent
    d = tmp_path / "t"
    init_repo(d, {"knob.py": "SPEED = 1.0\n",
                  "bench.py": "import knob\nprint(f'throughput: {knob.SPEED * 10:.1f}')\n"})
    trainer = MetricTrainer.build(f"{PY} bench.py", r"throughput: ([0-9.]+)", "max", ["knob.py"])
    assert trainer.metric_name == "throughput"
    agent = RecordingAgent([("faster", "SPEED = 2.0\n"), ("slower", "SPEED = 1.5\n"), ("fastest", "SPEED = 3.0\n")])
    out = []
    runner = Runner(d, RunConfig(tag="t", backend="metric", max_experiments=3), agent, trainer,
                    out=out.append, sleep=lambda s: None, decisions=Decisions("greedy"))
    assert run(runner, resume=False) == 0, "\n".join(out)
    log = "\n".join(out)
    assert "metric throughput, higher is better" in log
    assert "profile" not in log and "dataset" not in log and "val_bpb" not in log
    assert "[1] throughput 20.000000  keep" in log and "Best: throughput 30.000000" in log
    ctx = agent.contexts[2]          # after a keep (20) and a discard (15)
    assert "Higher throughput is better." in ctx.digest and "val_bpb" not in ctx.digest
    assert "Best so far: throughput 20.000000" in ctx.digest        # the highest, not the lowest
    prompt = experiment_prompt(ctx)
    assert "expect to raise throughput" in prompt and "val_bpb" not in prompt
    assert "Higher throughput is better." in system_prompt(ctx)     # no program.md in this target
    cmd = ClaudeCodeAgent().command(ctx, prompt)
    assert cmd[cmd.index("-p") + 1] == prompt
    assert "Higher throughput is better." in cmd[cmd.index("--append-system-prompt") + 1]
    # the Anthropic agent sends the same objective, in its system prompt and first turn
    stub = StubAPI(training_file="knob.py")
    try:
        (d / "knob.py").write_text("MATRIX_LR = 0.04\n")
        client = anthropic.Anthropic(base_url=stub.url, api_key="test-key", max_retries=0)
        AnthropicAgent(client=client).propose(ctx)
        first = stub.messages()[0]
        assert "Higher throughput is better." in first["system"][0]["text"]
        assert "raise throughput" in first["messages"][0]["content"] and "val_bpb" not in first["messages"][0]["content"]
    finally:
        stub.close()


def test_metric_name_comes_from_the_regex():
    from autoresearch.metric import metric_name
    assert metric_name(r"time_ms: ([0-9.]+)") == "time_ms"
    assert metric_name(r"^iterations\s*=\s*(\d+)") == "iterations"
    assert metric_name(r"(\d+) ms") == "score" and metric_name(r"\d+\.\d+") == "score"
    assert MetricTrainer.build("true", r"(?:x)? loss: ([0-9.]+)", "min", ["a.py"]).metric_name == "loss"


def test_rubric_judge_spend_counts_toward_max_spend(judge_stub, tmp_path, monkeypatch):
    """The judge's usage, priced like the agent's, is part of the spend --max-spend bounds:
    with a free agent, the judge's calls alone stop the run before it could pass the cap."""
    from autoresearch.agents.anthropic_api import usage_cost
    from autoresearch.ledger import Ledger
    monkeypatch.setenv("ANTHROPIC_BASE_URL", judge_stub.url)
    monkeypatch.setenv("ANTHROPIC_API_KEY", "test-key")
    per_call = usage_cost("claude-sonnet-4-6", judge_stub.usage)          # 0.0051 USD
    d = tmp_path / "doc"
    (tmp_path / "rubric.md").write_text(RUBRIC)
    init_repo(d, {"note.md": "Sums squares.\n"})
    trainer = MetricTrainer.build(None, None, "min", ["note.md"], rubric=str(tmp_path / "rubric.md"))
    agent = ScriptedAgent([("name the function", "The function `total` sums squares.\n"),
                           ("add an example", "The function total, for example total(3) = 5.\n"),
                           ("complexity", "The function total, for example total(3) = 5, is O(1): `complexity`.\n")])
    out = []
    runner = Runner(d, RunConfig(tag="doc", backend="metric", max_experiments=3, max_spend=2.4 * per_call),
                    agent, trainer, out=out.append, sleep=lambda s: None, decisions=Decisions("greedy"))
    assert run(runner, resume=False) == 3, "\n".join(out)          # stopped by the cap
    results = ledger_records(d, "result")
    assert len(results) == 2 and len(judge_stub.messages()) == 2     # baseline + 1: a third call could pass it
    assert all(r["judge_cost_usd"] == pytest.approx(per_call) and r["cost_usd"] == 0 for r in results)
    spent = Ledger(d, "doc").spent_usd()
    assert spent == pytest.approx(2 * per_call) and spent <= 2.4 * per_call
    assert any("--max-spend" in line for line in out)
