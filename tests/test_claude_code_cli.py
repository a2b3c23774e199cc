"""The claude-code agent with the REAL Claude Code CLI (bundled in the claude-agent-sdk wheel,
`uv sync --group claude`) against a stub of the Messages API on 127.0.0.1: the runner, git,
the sandboxed stand-in trainer and the ledger are real too."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import time
from pathlib import Path

import git
import pytest

from loop_fixtures.claude_stub import ClaudeStub
from loop_fixtures.helpers import PROJECT, cli_env, commit_all, ledger_records, make_repo, run_cli

pytestmark = pytest.mark.slow


def bundled_claude() -> str:
    spec = importlib.util.find_spec("claude_agent_sdk")
    path = Path(spec.origin).parent / "_bundled" / "claude" if spec else None
    if path is None or not path.exists():
        if os.environ.get("CI"):
            pytest.fail("the claude-agent-sdk wheel is missing: .ci/run installs it (uv sync --group claude)")
        pytest.skip("the real Claude Code CLI is not installed: uv sync --group claude")
    return str(path)


@pytest.fixture
def stub():
    with ClaudeStub("train_mlx.py", "MATRIX_LR = 0.04", "MATRIX_LR = 0.06", "raise MATRIX_LR to 0.06") as s:
        yield s


def project(tmp_path) -> Path:
    """The fake project, with the real project's .claude/ (the PreToolUse hook) and one more file."""
    d = tmp_path / "p"
    make_repo(d)
    shutil.copytree(PROJECT / ".claude", d / ".claude")
    (d / "other.py").write_text("VALUE = 1\n")
    repo = git.Repo(d)
    repo.git.add("-A")
    repo.git.commit("-qm", "hook and another file")
    return d


def claude_env(stub, tmp_path, **extra) -> dict:
    config = tmp_path / "claude-config"
    config.mkdir(exist_ok=True)
    return cli_env(AUTORESEARCH_CLAUDE=bundled_claude(), ANTHROPIC_BASE_URL=stub.url, ANTHROPIC_API_KEY="sk-test",
                   CLAUDE_CONFIG_DIR=str(config), CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1",
                   DISABLE_TELEMETRY="1", DISABLE_AUTOUPDATER="1", DISABLE_ERROR_REPORTING="1",
                   CLAUDE_CODE_MAX_RETRIES="1", AUTORESEARCH_OUTAGE_WAIT="0.1", **extra)


RUN = ("run", "--agent", "claude-code", "--backend", "mlx", "--decide", "greedy", "--tag", "cc")


def only_local_traffic(stub):
    assert stub.log, "the CLI never reached the stub"
    for path, headers, _ in stub.log:
        assert headers.get("Host", "").startswith("127.0.0.1:"), headers
        assert headers.get("x-api-key") == "sk-test"


def tool_results(stub) -> list[str]:
    texts = []
    for body in stub.requests():
        for m in body.get("messages", []):
            for c in m.get("content") if isinstance(m.get("content"), list) else []:
                if c.get("type") == "tool_result":
                    content = c.get("content")
                    texts.append(content if isinstance(content, str) else json.dumps(content))
    return texts


def test_an_edit_is_kept_committed_and_its_cost_and_turns_logged(tmp_path, stub):
    d = project(tmp_path)
    r = run_cli(d, *RUN, "--max-experiments", "1", env=claude_env(stub, tmp_path), timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    base, exp = ledger_records(d, "result")
    assert exp["status"] == "keep" and exp["description"] == "raise MATRIX_LR to 0.06"
    assert exp["cost_usd"] > 0 and exp["agent_meta"]["num_turns"] == 3
    repo = git.Repo(d)
    assert repo.head.commit.hexsha == exp["commit"] and "MATRIX_LR = 0.06" in (d / "train_mlx.py").read_text()
    prompt = json.dumps(stub.requests()[-1]["messages"])
    assert "Read tool" in prompt and "Edit tool" in prompt and "str_replace_based_edit_tool" not in prompt
    only_local_traffic(stub)


def test_the_hook_and_the_permissions_keep_prepare_py_out_of_reach(tmp_path, stub):
    d = project(tmp_path)
    before = (d / "prepare.py").read_text()
    stub.edit_path = "prepare.py"
    r = run_cli(d, *RUN, "--max-experiments", "1", env=claude_env(stub, tmp_path), timeout=300)
    assert (d / "prepare.py").read_text() == before
    assert "without editing the training file" in r.stdout, r.stdout + r.stderr
    # the project's hook and the agent's scope hook run side by side; the CLI reports one refusal
    refusals = ("Blocked: prepare.py is protected", "only train_mlx.py may be edited")
    assert any(r in t for t in tool_results(stub) for r in refusals), tool_results(stub)


def test_user_settings_that_accept_all_edits_cannot_widen_the_scope(tmp_path, stub):
    d = project(tmp_path)
    env = claude_env(stub, tmp_path)
    Path(env["CLAUDE_CONFIG_DIR"], "settings.json").write_text(json.dumps({"permissions": {"defaultMode": "acceptEdits"}}))
    stub.edit_path = "other.py"
    r = run_cli(d, *RUN, "--max-experiments", "1", env=env, timeout=300)
    assert (d / "other.py").read_text() == "VALUE = 1\n", r.stdout
    assert "without editing the training file" in r.stdout, r.stdout + r.stderr
    assert any("only train_mlx.py may be edited" in t for t in tool_results(stub)), tool_results(stub)


def test_general_mode_gets_the_scope_hook_without_a_claude_folder(tmp_path):
    d = tmp_path / "t"
    shutil.copytree(PROJECT / "examples" / "newton_sqrt", d)
    commit_all(d, "newton")
    bench = (d / "bench.py").read_text()
    with ClaudeStub("bench.py", "5_000", "5") as stub:
        r = run_cli(d, "run", "--agent", "claude-code", "--decide", "greedy", "--tag", "g", "--max-experiments", "1",
                    "--metric-cmd", "python bench.py", "--metric-regex", "time_ms: ([0-9.]+)", "--scope", "solver.py",
                    env=claude_env(stub, tmp_path), timeout=300)
        assert (d / "bench.py").read_text() == bench, r.stdout + r.stderr
        assert any("only solver.py may be edited" in t for t in tool_results(stub)), tool_results(stub)


def test_an_outage_pauses_and_recovers(tmp_path, stub):
    d = project(tmp_path)
    stub.fail_calls = [529] * 4          # two whole calls (one retry each), then the API is back
    r = run_cli(d, *RUN, "--max-experiments", "1", env=claude_env(stub, tmp_path), timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("agent unavailable") == 2 and "pausing" in r.stdout
    assert ledger_records(d, "result")[-1]["status"] == "keep"


def test_a_rejected_key_is_a_setup_error_in_seconds(tmp_path, stub):
    d = project(tmp_path)
    stub.status_always = 401
    t0 = time.monotonic()
    r = run_cli(d, *RUN, "--max-experiments", "1", env=claude_env(stub, tmp_path), timeout=300)
    assert r.returncode == 2 and "key was rejected" in r.stderr, r.stdout + r.stderr
    assert time.monotonic() - t0 < 60
    assert not (d / "results.tsv").exists()


def test_an_unknown_model_is_a_setup_error(tmp_path, stub):
    d = project(tmp_path)
    stub.unknown_model = "claude-nope"
    r = run_cli(d, *RUN, "--model", "claude-nope", "--max-experiments", "1", env=claude_env(stub, tmp_path),
                timeout=300)
    assert r.returncode == 2 and "cannot use the model claude-nope" in r.stderr, r.stdout + r.stderr
    assert not (d / "results.tsv").exists()


def test_the_cli_budget_stop_ends_the_run(tmp_path, stub):
    d = project(tmp_path)
    stub.output_tokens = 2_000_000       # one answer costs more than the whole budget
    r = run_cli(d, *RUN, "--max-experiments", "3", "--max-spend", "1", env=claude_env(stub, tmp_path), timeout=300)
    assert r.returncode == 3 and "--max-spend reached" in r.stdout, r.stdout + r.stderr
    assert [x["description"] for x in ledger_records(d, "result")] == ["baseline"]


def test_running_out_of_turns_fails_the_proposal(tmp_path, stub):
    d = project(tmp_path)
    stub.endless = True
    r = run_cli(d, *RUN, "--max-experiments", "1", "--max-turns", "2", env=claude_env(stub, tmp_path), timeout=300)
    assert r.returncode == 3 and "used all 2 turns" in r.stdout, r.stdout + r.stderr
    assert "without a usable edit" in r.stdout


def test_the_cli_connects_to_nothing_but_the_stub(tmp_path, stub):
    """Every socket the CLI and its children open to an IP address goes to loopback (strace
    records each connect(); DNS lookups of Anthropic's hosts would show as well)."""
    strace = shutil.which("strace")
    if strace is None:
        if os.environ.get("CI"):
            pytest.fail("strace is missing: .ci/run installs it")
        pytest.skip("strace is not installed (apt install strace)")
    d = project(tmp_path)
    trace = tmp_path / "connect.trace"
    wrapper = tmp_path / "claude"
    wrapper.write_text(f'#!/bin/sh\nexec {strace} -f -qq --seccomp-bpf -e trace=connect -o "{trace}" '
                       f'"{bundled_claude()}" "$@"\n')
    wrapper.chmod(0o755)
    env = claude_env(stub, tmp_path)
    env["AUTORESEARCH_CLAUDE"] = str(wrapper)
    r = run_cli(d, *RUN, "--max-experiments", "1", env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert ledger_records(d, "result")[-1]["status"] == "keep"
    calls = [line for line in trace.read_text().splitlines() if "connect(" in line]
    inet = [line for line in calls if "AF_INET" in line]
    assert inet, calls                                   # the stub was reached over TCP
    strays = [line for line in inet if not any(a in line for a in ('"127.0.0.1"', '"::1"', '"::ffff:127.0.0.1"'))]
    assert not strays, strays
    only_local_traffic(stub)
