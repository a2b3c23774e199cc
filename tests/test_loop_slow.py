"""The loop with the real MLX trainer: smoke profile, builtin data, hparam agent, 2 experiments."""
from __future__ import annotations

import math
import os
import shutil
import sys

import git
import pytest

from loop_fixtures.helpers import PROJECT, cli_env, ledger_records, run_cli, tsv_rows

pytestmark = pytest.mark.slow


def copy_project(dst):
    """A fresh checkout of the project as a user would have it (tracked + the trainer)."""
    dst.mkdir()
    for name in ("prepare.py", "train_mlx.py", "pyproject.toml", "program.md"):
        shutil.copy(PROJECT / name, dst / name)
    shutil.copytree(PROJECT / "harness", dst / "harness", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(PROJECT / "metal_kernels", dst / "metal_kernels",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so", "build"))
    (dst / ".gitignore").write_text("__pycache__/\n")
    repo = git.Repo.init(dst, initial_branch="master")
    with repo.config_writer() as cw:
        cw.set_value("user", "name", "Test")
        cw.set_value("user", "email", "test@example.com")
    repo.git.add("-A")
    repo.git.commit("-q", "-m", "project")
    return repo


def test_real_train_mlx_smoke_two_experiments_with_hparam(tmp_path, builtin_cache):
    if not (PROJECT / "train_mlx.py").exists():
        pytest.fail("train_mlx.py is missing")
    d = tmp_path / "p"
    repo = copy_project(d)
    env = cli_env(**builtin_cache)
    # The CLI's default keep rule (noise) would run the baseline 5 times and re-run small
    # gains (~190 s here). Two baseline runs still measure a real noise floor with the real
    # trainer under two seeds, and no re-runs keeps each experiment to one training run:
    # 4 runs in all (~90 s). Re-runs themselves are covered on the fast fixtures (test_decide.py).
    r = run_cli(d, "run", "--agent", "hparam", "--backend", "mlx", "--tag", "smoke", "--max-experiments", "2",
                "--noise-runs", "2", "--reruns", "0", env=env, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    rows = tsv_rows(d)
    assert len(rows) == 3 and rows[0][3] == "keep" and rows[0][4] == "baseline"
    results = ledger_records(d, "result")
    base = results[0]
    assert math.isfinite(base["val_bpb"]) and 0.5 < base["val_bpb"] < 10
    assert len(base["runs"]) == 2 and base["seeds"] == [42, 43]      # the noise floor, on the baseline
    assert all(not res.get("reruns") for res in results[1:])
    assert base["profile"] == "smoke" and base["dataset"] == "builtin" and base["backend"] == "mlx"
    assert base["summary"]["backend"] == "mlx" and base["summary"]["eval_tokens"] > 0
    # the real trainer ran sandboxed and was scored by the runner's scorer
    assert base["sandbox"] == ("bwrap" if shutil.which("bwrap") else "none")
    assert base["probes"] >= 8 and base["hidden_bpb"] > 0
    if sys.platform == "linux":   # the attention the trainer took, and why not the kernels
        assert base["attention"] == {"path": "mx.fast.scaled_dot_product_attention", "fallback": "no Metal device"}
    # the unigram floor of the eval rows, from the scorer, is the one the summary printed
    assert base["unigram_bpb"] == pytest.approx(base["summary"]["unigram_bpb"], abs=1e-6) and base["unigram_bpb"] > 2
    for res in results[1:]:
        assert res["status"] in ("keep", "discard", "crash")
        assert res["agent_meta"]["hparam"]["name"]
    best = min((x for x in results if x["status"] == "keep"), key=lambda x: x["val_bpb"])
    assert repo.head.commit.hexsha == best["commit"]
    assert repo.active_branch.name == "autoresearch/smoke"
    assert repo.git.status("--porcelain", "--untracked-files=no") == ""
    s = run_cli(d, "report", env=env)
    assert s.returncode == 0 and (d / "progress.png").exists()
    assert f"unigram floor {base['unigram_bpb']:.6f}: baseline at {base['val_bpb'] / base['unigram_bpb']:.3f}" in s.stdout
