"""The trust boundary, tested as an attacker would: real training files that try to win a
false keep or damage the books, run through the real runner with real bubblewrap, the real
scorer process and real git. Each attack passes only if the runner does not keep it, nothing
in the ledger, results or history is lost, and the next honest experiment is scored as usual.

Also: the sandbox itself (no home, no network, no validation shard, no surviving children),
the post-run checks without a sandbox, and the generated macOS profile (text only: no Mac)."""
from __future__ import annotations

import json
import math
import os
import socket
import sys
import threading
from pathlib import Path

import git
import pytest

from autoresearch.policy import Decisions
from autoresearch.runner import RunConfig, Runner, run
from autoresearch.trainer import Trainer
from harness import sandbox
from loop_fixtures.helpers import ScriptedAgent, ledger_records, make_repo, real_harness_repo, tsv_rows

HERE = Path(__file__).parent
HAVE_BWRAP = sandbox.detect()[0] == "bwrap"
needs_bwrap = pytest.mark.skipif(not HAVE_BWRAP and not os.environ.get("CI"),
                                 reason="bubblewrap is not installed (apt install bubblewrap)")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for k in list(os.environ):
        if k.startswith(("AUTORESEARCH_", "FAKE_", "ANTHROPIC_")):
            monkeypatch.delenv(k)


def attack(code: str):
    """An edit that runs `code` at the start of the training file's main block."""
    return lambda text: text.replace('if __name__ == "__main__":\n',
                                     'if __name__ == "__main__":\n' + "".join(f"    {l}\n" for l in code.splitlines()))


HONEST_GAIN = ("honest: uniform logits", lambda t: t.replace("TEMPERATURE = 1.0", "TEMPERATURE = 0.0"))


def run_loop(d, edits, rule="greedy"):
    config = RunConfig(tag="t", backend="mlx", max_experiments=len(edits), max_fix_attempts=0)
    lines = []
    runner = Runner(d, config, ScriptedAgent(edits), Trainer.for_backend("mlx"), out=lines.append,
                    sleep=lambda s: None, decisions=Decisions(rule))
    assert run(runner, resume=False) == 0, "\n".join(lines)
    return ledger_records(d, "result"), lines


def uniform_bpb(builtin_cache) -> float:
    """val_bpb of uniform logits on the smoke profile's rows, computed here independently."""
    import importlib
    old = {k: os.environ.get(k) for k in builtin_cache}
    os.environ.update(builtin_cache)
    try:
        import prepare
        p = importlib.reload(prepare)
        tok = p.Tokenizer.from_directory()
        rows, tb = p.eval_rows(tok), p.get_token_bytes()
        counted = tb[rows[:, 1:]]
        return math.log2(tok.get_vocab_size()) * int((counted > 0).sum()) / int(counted.sum())
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


ATTACKS = [
    ("patch the harness in memory, then peek",
     "import prepare\nprepare.check_causality = lambda *a, **k: None\n"
     "prepare.integrity.check_causality = lambda *a, **k: None\nglobals()['PEEK'] = 30.0", "invalid"),
    ("replace evaluate_bpb and print a number", "import prepare\nprepare.evaluate_bpb = lambda *a, **k: 0.5\n"
     "prepare.summary_fields = lambda *a: {'dataset': 'builtin', 'profile': 'smoke', 'eval_tokens': 16384}",
     "invalid"),
    ("forge the eval report", "import glob\nfor p in glob.glob('.git/*eval*') + ['.git/autoresearch-eval.jsonl']:\n"
     "    open(p, 'a').write('{\"val_bpb\": 0.5}\\n')", "crash"),
    ("rewrite prepare.py on disk", "src = open('prepare.py').read()\n"
     "open('prepare.py', 'w').write(src.replace('def evaluate_bpb', 'def _evaluate_bpb'))", "crash"),
    ("append to the books", "open('ledger.jsonl', 'a').write('{}\\n')\nopen('results.tsv', 'a').write('x\\n')",
     "crash"),
    ("delete the books", "import os\nos.remove('ledger.jsonl')\nos.remove('results.tsv')", "crash"),
    ("install a post-commit hook", "import os\nos.makedirs('.git/hooks', exist_ok=True)\n"
     "open('.git/hooks/post-commit', 'w').write('#!/bin/sh\\ntouch /tmp/pwned\\n')", "crash"),
    ("git replace the kept commit", "import subprocess\n"
     "subprocess.run(['git', 'replace', '-f', 'HEAD', 'HEAD~1'], check=True)", "crash"),
    ("poison prepare's .pyc", "import os\nos.makedirs('__pycache__', exist_ok=True)\n"
     "open('__pycache__/prepare.cpython-311.pyc', 'wb').write(open('prepare.py', 'rb').read())", "crash"),
    ("memorise the validation shard", "import prepare, pyarrow.parquet as pq, os\n"
     "val = os.path.join(prepare.data_dir(), prepare.val_filename())\n"
     "assert open(val, 'rb').read(), 'the validation shard is empty here'\npq.read_table(val)", "crash"),
    ("causal only for the first calls", "globals()['PEEK_AFTER_CALLS'] = 2", "invalid"),
]


@needs_bwrap
def test_attacks_are_never_kept_and_lose_nothing(tmp_path, builtin_cache, monkeypatch):
    for k, v in builtin_cache.items():
        monkeypatch.setenv(k, v)
    d = real_harness_repo(tmp_path)
    edits = [(name, attack(code)) for name, code, _ in ATTACKS] + [HONEST_GAIN]
    results, lines = run_loop(d, edits)
    assert [r["description"].split(" [")[0] for r in results] == ["baseline"] + [e[0] for e in edits]
    base, honest = results[0], results[-1]
    assert base["status"] == "keep" and base["sandbox"] == "bwrap" and base["hidden_bpb"] > 0
    assert base["probes"] >= 8
    for (name, _, expected), r in zip(ATTACKS, results[1:-1]):
        assert r["status"] == expected, (name, r["status"], r["description"])
        assert r["sandbox"] == "bwrap"
    by = {r["description"].split(" [")[0]: r for r in results}
    assert "reads future tokens" in by["patch the harness in memory, then peek"]["description"]
    assert "was not computed by the trusted scorer" in by["replace evaluate_bpb and print a number"]["description"]
    assert "reads future tokens" in by["causal only for the first calls"]["description"]
    # the honest experiment after them all: kept, with the number computed independently
    assert honest["status"] == "keep"
    assert abs(honest["val_bpb"] - uniform_bpb(builtin_cache)) < 1e-5
    repo = git.Repo(d)
    assert repo.head.commit.hexsha == honest["commit"]
    assert not (d / "__pycache__").exists() and not Path("/tmp/pwned").exists()
    assert not list((d / ".git" / "hooks").glob("post-commit")) and not repo.git.for_each_ref("refs/replace")
    # every experiment once, in order, in both books; history holds the baseline and the keep
    assert [row[3] for row in tsv_rows(d)] == [r["status"] for r in results]
    assert repo.git.log("--format=%s", "-2").splitlines() == ["honest: uniform logits",
                                                              "tiny trainer on the real harness"]


@needs_bwrap
def test_sandbox_has_no_home_no_network_no_val_shard_and_no_survivors(tmp_path, builtin_cache, monkeypatch):
    for k, v in builtin_cache.items():
        monkeypatch.setenv(k, v)
    home_secret = Path.home() / f".autoresearch-test-secret-{os.getpid()}"
    home_secret.write_text("secret")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.2)
    port = server.getsockname()[1]
    connected = []

    def accept():
        for _ in range(50):
            try:
                connected.append(server.accept())
            except OSError:
                pass
    t = threading.Thread(target=accept)
    t.start()
    marker = f"autoresearch-survivor-{os.getpid()}"
    probe = (
        "import json, os, socket, subprocess, sys, prepare\n"
        "out = {}\n"
        f"try: out['home'] = open({str(home_secret)!r}).read()\n"
        "except OSError as e: out['home'] = type(e).__name__\n"
        f"try: socket.create_connection(('127.0.0.1', {port}), timeout=2); out['net'] = 'connected'\n"
        "except OSError as e: out['net'] = type(e).__name__\n"
        "val = os.path.join(prepare.data_dir(), prepare.val_filename())\n"
        "try: out['val'] = len(open(val, 'rb').read())\n"
        "except OSError as e: out['val'] = type(e).__name__\n"
        "out['train_shards'] = len(prepare.list_parquet_files()) - 1\n"
        "out['ssh'] = os.path.exists(os.path.expanduser('~/.ssh')) or os.path.exists('/root/.ssh')\n"
        "out['git'] = os.listdir('.git')\n"
        # a double fork into a new session: must not outlive the run
        f"subprocess.Popen(['setsid', sys.executable, '-c', 'import time; time.sleep(120)', {marker!r}],"
        " start_new_session=True)\n"
        "print('PROBE ' + json.dumps(out), flush=True)\n")
    d = real_harness_repo(tmp_path)
    results, _ = run_loop(d, [("probe the sandbox", attack(probe))])
    log = (d / "run.log").read_text()
    seen = json.loads(log.split("PROBE ", 1)[1].splitlines()[0])
    t.join()
    server.close()
    home_secret.unlink()
    assert seen["home"] == "FileNotFoundError" and not seen["ssh"]
    assert seen["net"] in ("OSError", "ConnectionRefusedError", "TimeoutError") and not connected
    assert seen["val"] in (0, "PermissionError"), "the validation shard must be unreadable inside the sandbox"
    assert seen["train_shards"] >= 1 and seen["git"] == []
    assert results[-1]["status"] in ("discard", "keep")       # the probe itself trains honestly
    survivors = [p for p in Path("/proc").iterdir() if p.name.isdigit() and _cmdline_has(p, marker)]
    assert not survivors, "a double-forked child outlived the run"


def _cmdline_has(proc: Path, marker: str) -> bool:
    try:
        return marker.encode() in (proc / "cmdline").read_bytes()
    except OSError:
        return False


# -- without a sandbox: the post-run checks still undo what a run did -------------------------------
def test_unsandboxed_runs_are_checked_after_every_run_and_undone(tmp_path, monkeypatch):
    """No sandbox (AUTORESEARCH_SANDBOX=none): a run that installs a hook, a replace ref, a
    .pyc, or edits the books is invalid, and what it did is undone before the next commit."""
    monkeypatch.setenv("AUTORESEARCH_SANDBOX", "none")
    d = tmp_path / "p"
    make_repo(d)
    ok_edit = lambda t: t.replace("MATRIX_LR = 0.04", "MATRIX_LR = 0.06")
    evil = [
        ("hook", "import os\nopen('.git/hooks/post-commit', 'w').write('#!/bin/sh\\necho pwned > pwned.txt\\n')\n"
                 "os.chmod('.git/hooks/post-commit', 0o755)"),
        ("replace", "import subprocess\ngit = lambda *a: subprocess.run(['git', *a], check=True, capture_output=True,"
                    " text=True).stdout.strip()\ngit('replace', '-f', 'HEAD', git('commit-tree', 'HEAD^{tree}', '-m', 'innocent'))"),
        ("pyc", "import os\nos.makedirs('__pycache__', exist_ok=True)\n"
                "open('__pycache__/prepare.cpython-311.pyc', 'wb').write(b'poison')"),
        ("books", "open('ledger.jsonl', 'a').write('{\"event\": \"result\", \"tag\": \"t\", \"status\": \"keep\"}\\n')"),
        ("config", "open('.git/config', 'a').write('[core]\\n\\tfsmonitor = touch pwned.txt\\n')"),
    ]
    edits = [(name, lambda t, c=code: ok_edit(attack(c)(t))) for name, code in evil] + [("honest", ok_edit)]
    results, lines = run_loop(d, edits)
    assert [r["status"] for r in results] == ["keep"] + ["invalid"] * len(evil) + ["keep"], \
        [(r["status"], r["description"]) for r in results]
    assert all(r["sandbox"] == "none" for r in results)
    assert ".git/hooks/post-commit (added)" in results[1]["description"]
    assert "refs/replace/" in results[2]["description"]
    assert "__pycache__/prepare.cpython-311.pyc (added)" in results[3]["description"]
    assert "ledger.jsonl (modified)" in results[4]["description"]
    assert ".git/config (modified)" in results[5]["description"]
    repo = git.Repo(d)
    assert not (d / "pwned.txt").exists() and not repo.git.for_each_ref("refs/replace")
    assert not (d / ".git" / "hooks" / "post-commit").exists() and "fsmonitor" not in (d / ".git" / "config").read_text()
    assert repo.head.commit.hexsha == results[-1]["commit"] and len(tsv_rows(d)) == len(results)


def test_require_sandbox_refuses_to_start_without_one(tmp_path):
    from loop_fixtures.helpers import cli_env, run_cli
    d = tmp_path / "p"
    make_repo(d)
    env = cli_env(AUTORESEARCH_BWRAP="/nonexistent/bwrap")
    r = run_cli(d, "run", "--agent", "hparam", "--max-experiments", "0", "--require-sandbox", env=env)
    assert r.returncode == 2 and "--require-sandbox" in r.stderr and "bubblewrap" in r.stderr, r.stderr
    assert not (d / "ledger.jsonl").exists()
    r = run_cli(d, "run", "--agent", "hparam", "--max-experiments", "0", "--decide", "greedy", env=env)
    assert r.returncode == 0, r.stderr
    assert "UNSANDBOXED" in r.stdout
    assert ledger_records(d, "result")[0]["sandbox"] == "none"
    rep = run_cli(d, "report", env=env)
    assert "sandbox of the runs: none 1  (WARNING: unsandboxed runs)" in rep.stdout, rep.stdout + rep.stderr


def test_macos_profile_denies_home_books_and_network(tmp_path):
    repo, scratch = tmp_path / "repo", tmp_path / "scratch"
    (repo / ".git").mkdir(parents=True)
    sb = sandbox.plan(repo, scratch, readable=[tmp_path / "data"], hidden=[tmp_path / "data" / "val.parquet",
                                                                         repo / "ledger.jsonl"], kind="sandbox-exec")
    text = sandbox.sandbox_exec_profile(sb)
    home = os.path.realpath(os.path.expanduser("~"))
    assert text.startswith("(version 1)") and f'(deny file-read* (subpath "{home}"))' in text
    assert f'(deny file-read* file-write* (subpath "{os.path.realpath(repo / ".git")}"))' in text
    assert f'(subpath "{os.path.realpath(tmp_path / "data" / "val.parquet")}")' in text
    assert "(deny file-write*)" in text and f'(allow file-write* (subpath "{os.path.realpath(scratch)}")' in text
    assert "(deny network*)" in text
    assert text.index("(deny file-write*)") < text.index("(allow file-write*")   # later rules win
    assert sb.wrap(["python", "x.py"])[:2] == ["/usr/bin/sandbox-exec", "-p"]
    sb.allow_network = True
    assert "(deny network*)" not in sandbox.sandbox_exec_profile(sb)


def test_run_environment_has_no_secrets_and_caches_in_scratch(tmp_path):
    sb = sandbox.plan(tmp_path, tmp_path / "s", kind="none")
    env = sb.env({"ANTHROPIC_API_KEY": "k", "GITHUB_TOKEN": "t", "MY_PASSWORD": "p", "PATH": "/usr/bin",
                  "AUTORESEARCH_PROFILE": "smoke"})
    assert "ANTHROPIC_API_KEY" not in env and "GITHUB_TOKEN" not in env and "MY_PASSWORD" not in env
    assert env["PATH"] == os.pathsep.join([os.path.dirname(sys.executable), "/usr/bin"])
    assert env["AUTORESEARCH_PROFILE"] == "smoke"
    assert env["PYTHONDONTWRITEBYTECODE"] == "1" and env["PYTHONPYCACHEPREFIX"].startswith(str(tmp_path / "s"))
    assert env["TMPDIR"].startswith(str(tmp_path / "s")) and env["HOME"].startswith(str(tmp_path / "s"))


TORCH_TRAINER = '''
import os, sys
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch
import prepare

if __name__ == "__main__":
    prepare.ensure_prepared()
    torch.manual_seed(prepare.SEED)
    tok = prepare.Tokenizer.from_directory()
    model = torch.nn.Sequential(torch.nn.Embedding(tok.get_vocab_size(), 16), torch.nn.Linear(16, tok.get_vocab_size()))
    val = prepare.evaluate_bpb(model, tok, 8)
    print("---")
    print(f"val_bpb:          {val:.6f}")
    print("backend:          cuda")
    for key, value in prepare.summary_fields().items():
        print(f"{key + ':':<18}{value}")
'''


@needs_bwrap
def test_torch_trainer_speaks_the_same_protocol_in_the_sandbox(tmp_path, builtin_cache, monkeypatch):
    pytest.importorskip("torch")
    for k, v in builtin_cache.items():
        monkeypatch.setenv(k, v)
    d = real_harness_repo(tmp_path)
    (d / "train.py").write_text(TORCH_TRAINER)
    repo = git.Repo(d)
    repo.git.add("train.py")
    repo.git.commit("-q", "-m", "torch trainer")
    config = RunConfig(tag="t", backend="cuda", max_experiments=0, max_fix_attempts=0)
    runner = Runner(d, config, ScriptedAgent([]), Trainer.for_backend("cuda"), out=lambda s: None,
                    sleep=lambda s: None, decisions=Decisions("greedy"))
    assert run(runner, resume=False) == 0, (d / "run.log").read_text()[-2000:]
    base = ledger_records(d, "result")[0]
    assert base["status"] == "keep" and base["sandbox"] == "bwrap", (d / "run.log").read_text()[-2000:]
    assert base["probes"] >= 8 and base["hidden_bpb"] > 0 and 1 < base["val_bpb"] < 30


KERNEL_PROBE = '''
import os, pathlib
cache = pathlib.Path(os.environ["TMPDIR"]) / "mlx"       # where MLX keeps its compiled CPU kernels
print("seen:" + ",".join(sorted(f"{p.name}={p.read_text()}" for p in cache.glob("*"))))
cache.mkdir(parents=True, exist_ok=True)
for name, text in WRITES.items():
    (cache / name).write_text(text)
'''


@needs_bwrap
def test_kernel_caches_start_from_the_users_file_and_never_cross_the_agents_files(tmp_path):
    """A new file's first run starts from the kernels of the run's start file; a file that
    plants a kernel changes only its own cache, never another file's or the start file's."""
    from autoresearch.trainer import kernel_key
    d = tmp_path / "p"
    make_repo(d)

    def run_file(writes: dict, seed: str | None, tag: str) -> str:
        text = f"# {tag}\nWRITES = {writes!r}\n" + KERNEL_PROBE
        (d / "train_mlx.py").write_text(text)
        trainer = Trainer("mlx", "train_mlx.py", [sys.executable, "train_mlx.py"], parse=lambda log: None,
                          kernel_seed=seed)
        outcome = trainer.run(d, d / "run.log", 60)
        assert outcome.returncode == 0 and not outcome.tampered, (d / "run.log").read_text()
        return [l for l in (d / "run.log").read_text().splitlines() if l.startswith("seen:")][0]

    start_writes = {"shared.so": "from the start file"}
    start_text = f"# start\nWRITES = {start_writes!r}\n" + KERNEL_PROBE
    seed = kernel_key(start_text.encode())
    assert run_file(start_writes, seed, "start") == "seen:"
    planter = {"shared.so": "planted", "mine.so": "A"}
    assert run_file(planter, seed, "A") == "seen:shared.so=from the start file"
    assert run_file({}, seed, "B") == "seen:shared.so=from the start file"       # not A's plant
    assert run_file(planter, seed, "A") == "seen:mine.so=A,shared.so=planted"   # A's own cache
    assert run_file({}, None, "C") == "seen:"                                     # no seed, no kernels
