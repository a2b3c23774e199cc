"""`autoresearch doctor`: the real command on this machine, in real failing states (no data,
bundled BLAS, a bad BLAS path, not a git repository, no `claude`), and the Metal rows with the
device query faked (no Mac here)."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from autoresearch import doctor
from loop_fixtures.anthropic_stub import StubAPI
from loop_fixtures.helpers import PROJECT, cli_env, commit_all, run_cli


def project(tmp_path: Path, git: bool = True) -> Path:
    """The real harness (prepare.py, harness/, metal_kernels/) and the real trainer."""
    d = tmp_path / "proj"
    d.mkdir()
    for name in ("prepare.py", "train_mlx.py", "program.md"):
        shutil.copy(PROJECT / name, d / name)
    for name in ("harness", "metal_kernels"):
        shutil.copytree(PROJECT / name, d / name, ignore=shutil.ignore_patterns("__pycache__"))
    (d / ".gitignore").write_text("__pycache__/\n")
    if git:
        commit_all(d, "project")
    return d


def rows_of(stdout: str) -> dict[str, str]:
    """{row name: status} from the printed table."""
    out = {}
    for line in stdout.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] in ("ok", "warning", "missing"):
            name = parts[1] + (" " + parts[2] if parts[1] in ("metal", "claude") else "")
            out[name] = parts[0]
    return out


def path_without_claude(tmp_path: Path) -> str:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("git", "bwrap", "true"):     # bwrap's probe runs `true`
        if shutil.which(tool):
            (bin_dir / tool).symlink_to(shutil.which(tool))
    return str(bin_dir)


def test_doctor_on_this_machine_passes_with_data_ready(tmp_path, builtin_cache):
    d = project(tmp_path)
    r = run_cli(d, "doctor", "--backend", "mlx", env=cli_env(PATH=path_without_claude(tmp_path), **builtin_cache))
    assert r.returncode == 0, r.stdout + r.stderr
    rows = rows_of(r.stdout)
    assert rows["platform"] == rows["mlx"] == rows["data"] == rows["profile"] == rows["git"] == "ok"
    assert rows["metal kernels"] == "ok" and "no Metal device" in r.stdout
    assert rows["claude code"] == "warning" and "npm install -g @anthropic-ai/claude-code" in r.stdout
    assert rows["anthropic"] == "warning"
    assert "The main job can run: `uv run train_mlx.py`" in r.stdout
    if shutil.which("bwrap"):
        assert rows["sandbox"] == "ok"


def test_no_data_fails_with_the_prepare_command(tmp_path):
    d = project(tmp_path)
    r = run_cli(d, "doctor", "--backend", "mlx", env=cli_env(AUTORESEARCH_CACHE=str(tmp_path / "empty-cache"),
                                                             AUTORESEARCH_DATASET="builtin"))
    assert r.returncode == 1, r.stdout + r.stderr
    assert rows_of(r.stdout)["data"] == "missing"
    assert "fix: uv run prepare.py --dataset builtin" in r.stdout
    assert "The main job cannot run yet" in r.stdout


def test_not_a_git_repository_warns_the_loop_but_the_main_job_runs(tmp_path, builtin_cache):
    d = project(tmp_path, git=False)
    r = run_cli(d, "doctor", "--backend", "mlx", env=cli_env(**builtin_cache))
    assert r.returncode == 0, r.stdout + r.stderr
    assert rows_of(r.stdout)["git"] == "missing" and "fix: git init && git add -A" in r.stdout
    (d / "stray.txt").write_text("x")
    commit_all(d, "now a repository")
    (d / "stray.txt").write_text("edited")
    r = run_cli(d, "doctor", "--backend", "mlx", env=cli_env(**builtin_cache))
    assert rows_of(r.stdout)["git"] == "warning" and "clean tree" in r.stdout


def test_a_blas_path_that_does_not_exist_fails_the_main_job(tmp_path, builtin_cache):
    if sys.platform != "linux":
        pytest.skip("BLAS preloading is Linux only")
    d = project(tmp_path)
    r = run_cli(d, "doctor", "--backend", "mlx",
                env=cli_env(AUTORESEARCH_BLAS=str(tmp_path / "libopenblas.so.0"), **builtin_cache))
    assert r.returncode == 1 and rows_of(r.stdout)["blas"] == "missing"


def test_only_the_bundled_blas_is_a_warning_with_the_apt_command(monkeypatch):
    from harness import blas
    if blas.bundled_reference_blas() is None:
        pytest.skip("this MLX build bundles no reference BLAS")
    monkeypatch.delenv("AUTORESEARCH_BLAS", raising=False)
    monkeypatch.setattr(blas, "TUNED_BLAS_CANDIDATES", [])     # a machine without OpenBLAS or MKL
    row = doctor.blas_row()
    assert (row.status, row.fix) == ("warning", "sudo apt install libopenblas0-pthread") and not row.essential


def fake_mac():
    info = {"device_name": "Apple M3 Max", "memory_size": 36 * 2 ** 30,
            "max_recommended_working_set_size": int(27.6 * 2 ** 30)}
    mx = SimpleNamespace(__version__="0.31.0", bfloat16="bf16", default_device=lambda: "Device(gpu, 0)",
                         metal=SimpleNamespace(is_available=lambda: True, device_info=lambda: info))
    return mx


def test_metal_rows_on_a_faked_mac(tmp_path):
    mx = fake_mac()
    ok = doctor.mlx_rows(tmp_path, mx=mx, self_test=lambda D: None)
    assert [r.status for r in ok] == ["ok", "ok"]
    assert "Apple M3 Max" in ok[0].detail and "27.6 GiB" in ok[0].detail and "self-test" in ok[1].detail
    bad = doctor.mlx_rows(tmp_path, mx=mx, self_test=lambda D: "RuntimeError: Unable to build metal library"
                          if D == 128 else None)
    assert bad[1].status == "warning" and not bad[1].essential
    assert "head dim 128 (RuntimeError: Unable to build metal library)" in bad[1].detail
    assert "falls back to mx.fast.scaled_dot_product_attention" in bad[1].detail


def test_online_checks_the_key_against_the_api(tmp_path, builtin_cache):
    d = project(tmp_path)
    stub = StubAPI()
    try:
        env = cli_env(ANTHROPIC_API_KEY="sk-test", ANTHROPIC_BASE_URL=stub.url, PATH=path_without_claude(tmp_path),
                      **builtin_cache)
        r = run_cli(d, "doctor", "--backend", "mlx", "--online", env=env)
        assert r.returncode == 0 and rows_of(r.stdout)["anthropic"] == "ok", r.stdout + r.stderr
        assert [m for m, *_ in stub.requests] == ["GET"]                  # one tiny request
        offline = run_cli(d, "doctor", "--backend", "mlx", env=env)
        assert "--online checks it" in offline.stdout and len(stub.requests) == 1
        stub.models = set()
        r = run_cli(d, "doctor", "--backend", "mlx", "--online", env=env)
        assert rows_of(r.stdout)["anthropic"] == "warning" and "is not available to this API key" in r.stdout
    finally:
        stub.close()


def test_cuda_backend_without_a_gpu_says_train_py_runs_on_the_cpu(tmp_path, builtin_cache):
    pytest.importorskip("torch")
    d = project(tmp_path)
    shutil.copy(PROJECT / "train.py", d / "train.py")
    r = run_cli(d, "doctor", "--backend", "cuda", env=cli_env(CUDA_VISIBLE_DEVICES="", **builtin_cache))
    assert r.returncode == 0, r.stdout + r.stderr
    rows = rows_of(r.stdout)
    assert rows["torch"] == "ok" and rows["cuda"] == "warning" and "train.py would run on the CPU" in r.stdout
    assert "The main job can run: `uv run train.py`" in r.stdout
