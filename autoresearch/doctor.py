"""`autoresearch doctor`: what this machine has for the main job and for the loop.

One row per need, each ok / warning / missing, with the command that fixes it. The exit
code says whether the main job (the --backend trainer on the active dataset) can run: 0 yes,
1 no. Rows about the loop (git, agents, sandbox) warn but never fail it. Nothing here trains
or reaches the network, except the one tiny request per agent that --online makes.
"""
from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .trainer import SetupError, harness_info

LOW_DISK_GIB = 5          # a climbmix download of the standard profile's shards needs a few GiB


@dataclass
class Row:
    name: str
    status: str               # ok | warning | missing
    detail: str
    fix: str = ""
    essential: bool = False   # the main job cannot run while this row is missing


def platform_row() -> Row:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    return Row("platform", "ok", f"{platform.system()} {platform.machine()}, {cpu_name()}, "
                                 f"{os.cpu_count()} cores, {mem / 2 ** 30:.0f} GiB memory")


def cpu_name() -> str:
    if sys.platform == "darwin":
        out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True)
        return out.stdout.strip() or platform.processor()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def mlx_rows(root: Path, mx=None, self_test=None, head_dims=(64, 128)) -> list[Row]:
    """MLX, its device, and (on Metal) the attention kernels' self-test. `mx` and `self_test`
    stand in for mlx.core and metal_kernels.self_test (tests fake a Mac with them)."""
    if mx is None:
        try:
            import mlx.core as mx
        except ImportError as e:
            return [Row("mlx", "missing", f"cannot import mlx ({e})", "uv sync", essential=True)]
    version = getattr(mx, "__version__", "?")
    if not mx.metal.is_available():
        return [Row("mlx", "ok", f"MLX {version}, default device {mx.default_device()}"),
                Row("metal kernels", "ok", "not used: no Metal device (MLX trains on the CPU)")]
    info = mx.metal.device_info()
    gib = lambda key: info.get(key, 0) / 2 ** 30
    rows = [Row("mlx", "ok", f"MLX {version} on {info.get('device_name', 'a Metal GPU')}: "
                             f"{gib('memory_size'):.0f} GiB unified memory, the GPU may use "
                             f"{gib('max_recommended_working_set_size'):.1f} GiB")]
    if self_test is None:
        sys.path.insert(0, str(root))
        try:
            import metal_kernels
            from metal_kernels import kernels
        except ImportError as e:
            return rows + [Row("metal kernels", "warning", f"cannot import metal_kernels ({e}): train_mlx.py uses "
                                                          "mx.fast.scaled_dot_product_attention")]
        head_dims = kernels.HEAD_DIMS
        self_test = lambda D: metal_kernels.self_test(D, mx.bfloat16, windows=(None, 64))
    failed = [(D, why) for D in head_dims for why in [self_test(D)] if why]
    if failed:
        D, why = failed[0]
        return rows + [Row("metal kernels", "warning",
                           f"failed the self-test at head dim {D} ({why}): train_mlx.py falls back to "
                           "mx.fast.scaled_dot_product_attention (slower, correct)",
                           "report it with this line; AUTORESEARCH_ATTENTION=mlx skips the kernels")]
    return rows + [Row("metal kernels", "ok", f"pass the self-test (head dims {', '.join(map(str, head_dims))}, "
                                              "bfloat16, causal and windowed)")]


def blas_row() -> Row | None:
    """Linux CPUs: MLX's bundled reference BLAS is ~50x slower than OpenBLAS at matmul."""
    if sys.platform != "linux":
        return None
    from harness import blas
    if blas.bundled_reference_blas() is None:
        return None
    if os.environ.get("AUTORESEARCH_BLAS") == "bundled":
        return Row("blas", "warning", "AUTORESEARCH_BLAS=bundled: MLX's reference BLAS (~50x slower matmul)",
                   "unset AUTORESEARCH_BLAS")
    choice = os.environ.get("AUTORESEARCH_BLAS", "auto")
    if choice not in ("", "auto") and not os.path.exists(choice):
        return Row("blas", "missing", f"AUTORESEARCH_BLAS={choice}: no such file (train_mlx.py stops on it)",
                   "unset AUTORESEARCH_BLAS, or point it at a libopenblas.so.0", essential=True)
    lib = blas.find_tuned_blas()
    if lib is None:
        return Row("blas", "warning", "only MLX's bundled reference BLAS: CPU matmul ~50x slower than OpenBLAS",
                   "sudo apt install libopenblas0-pthread")
    return Row("blas", "ok", f"train_mlx.py preloads {lib}")


def cuda_rows() -> list[Row]:
    try:
        import torch
    except ImportError as e:
        return [Row("torch", "missing", f"cannot import torch ({e})",
                    "uv pip install torch (a CUDA build; see pytorch.org for your CUDA version)", essential=True)]
    if not torch.cuda.is_available():
        return [Row("torch", "ok", f"torch {torch.__version__}"),
                Row("cuda", "warning", "no CUDA GPU visible to torch: train.py would run on the CPU",
                    "install the NVIDIA driver and a CUDA build of torch, or use --backend mlx")]
    name = torch.cuda.get_device_name(0)
    cap = torch.cuda.get_device_capability(0)
    free, total = torch.cuda.mem_get_info(0)
    has_kernels = _importable("kernels")
    attention = ("FA3 from the `kernels` hub if it loads (needs the network once), else flex attention"
                 if has_kernels else "flex attention (install the `kernels` package for FA3)")
    return [Row("torch", "ok", f"torch {torch.__version__}, CUDA {torch.version.cuda}"),
            Row("cuda", "ok", f"{name} (sm_{cap[0]}{cap[1]}), {free / 2 ** 30:.0f} of {total / 2 ** 30:.0f} GiB free"),
            Row("attention", "ok", f"train.py takes {attention}; AUTORESEARCH_ATTENTION=sdpa forces torch SDPA")]


def _importable(module: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(module) is not None


def data_rows(root: Path) -> tuple[list[Row], dict | None]:
    try:
        info = harness_info(root)
    except SetupError as e:
        message = str(e)
        fix = re.search(r"`([^`]*prepare\.py[^`]*)`", message)
        return [Row("data", "missing", message.splitlines()[0][:300],
                    fix.group(1) if fix else "uv run prepare.py --dataset builtin", essential=True)], None
    rows = [Row("data", "ok", f"dataset {info['dataset']}: shards and tokenizer ready (fingerprint matches)"),
            Row("profile", "ok", f"{info['profile']}: each run trains {info['time_budget']:.0f} s, then scores "
                                 f"{info['eval_tokens']:,} validation tokens ({info['seq_len']}-token rows)")]
    return rows, info


def git_row(root: Path) -> Row:
    import git
    try:
        repo = git.Repo(root, search_parent_directories=True)
    except (git.InvalidGitRepositoryError, git.NoSuchPathError):
        return Row("git", "missing", f"{root} is not a git repository: `autoresearch run` commits each experiment",
                   "git init && git add -A && git commit -m start")
    if not repo.head.is_valid():
        return Row("git", "missing", "the repository has no commit yet", "git add -A && git commit -m start")
    if repo.is_dirty(untracked_files=False):
        return Row("git", "warning", "uncommitted changes to tracked files: `autoresearch run` needs a clean tree",
                   "git commit -am '...' or git stash")
    branch = "detached HEAD" if repo.head.is_detached else repo.active_branch.name
    return Row("git", "ok", f"clean tree on {branch}")


def agent_rows(online: bool) -> list[Row]:
    rows = []
    if not os.environ.get("ANTHROPIC_API_KEY"):
        rows.append(Row("anthropic", "warning", "ANTHROPIC_API_KEY is not set: the offline hparam agent is the default",
                        "export ANTHROPIC_API_KEY=... for --agent anthropic"))
    elif online:
        from .agents.anthropic_api import AnthropicAgent
        try:
            AnthropicAgent(max_retries=1).check()
            rows.append(Row("anthropic", "ok", "ANTHROPIC_API_KEY is set and the API accepted it"))
        except SetupError as e:
            rows.append(Row("anthropic", "warning", str(e), "check the key, the network or ANTHROPIC_BASE_URL"))
    else:
        rows.append(Row("anthropic", "ok", "ANTHROPIC_API_KEY is set (--online checks it with one request)"))
    exe = os.environ.get("AUTORESEARCH_CLAUDE", "claude")
    if shutil.which(exe) is None:
        rows.append(Row("claude code", "warning", f"`{exe}` is not on PATH: --agent claude-code cannot run",
                        "npm install -g @anthropic-ai/claude-code (or uv sync --group claude)"))
        return rows
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=15, stdin=subprocess.DEVNULL)
        version = (out.stdout.strip().splitlines() or ["?"])[0]
    except (OSError, subprocess.TimeoutExpired) as e:
        rows.append(Row("claude code", "warning", f"`{exe} --version` failed ({e})", "reinstall Claude Code"))
        return rows
    if out.returncode != 0:
        rows.append(Row("claude code", "warning", f"`{exe} --version` exited {out.returncode}", "reinstall Claude Code"))
    elif online:
        from .agents.claude_code import ClaudeCodeAgent
        try:
            ClaudeCodeAgent(executable=exe).check()
            rows.append(Row("claude code", "ok", f"{version}; it answered a one-turn request"))
        except SetupError as e:
            rows.append(Row("claude code", "warning", str(e), "run `claude` once and log in"))
    else:
        rows.append(Row("claude code", "ok", version))
    return rows


def sandbox_row() -> Row:
    from harness.sandbox import detect
    kind, reason = detect()
    if kind != "none":
        return Row("sandbox", "ok", f"{kind}: every run of the loop is confined")
    fix = "sudo apt install bubblewrap" if "not installed" in reason else "see the reason"
    return Row("sandbox", "warning", f"none ({reason}): the loop would run untrusted training code unconfined",
               fix)


def disk_row(cache_dir: str | None) -> Row:
    path = Path(cache_dir or os.environ.get("AUTORESEARCH_CACHE") or Path.home() / ".cache" / "autoresearch")
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free / 2 ** 30
    if free < LOW_DISK_GIB:
        return Row("disk", "warning", f"{free:.1f} GiB free under {path}", "free space, or set AUTORESEARCH_CACHE to a roomier disk")
    return Row("disk", "ok", f"{free:.0f} GiB free under {path}")


def diagnose(root: Path, backend: str, online: bool = False) -> list[Row]:
    rows = [platform_row()]
    rows += mlx_rows(root) if backend == "mlx" else cuda_rows()
    if backend == "mlx":
        rows.append(blas_row())
    data, info = data_rows(root)
    rows += data
    rows += [git_row(root), *agent_rows(online), sandbox_row(), disk_row((info or {}).get("cache_dir"))]
    return [r for r in rows if r is not None]


def render(rows: list[Row], backend: str) -> str:
    width = max(len(r.name) for r in rows)
    lines = []
    for r in rows:
        lines.append(f"  {r.status:<8} {r.name:<{width}}  {r.detail}")
        if r.fix and r.status != "ok":
            lines.append(f"  {'':<8} {'':<{width}}  fix: {r.fix}")
    trainer = "train_mlx.py" if backend == "mlx" else "train.py"
    if any(r.status == "missing" and r.essential for r in rows):
        lines.append(f"The main job cannot run yet: fix the rows marked missing, then `uv run {trainer}`.")
    else:
        lines.append(f"The main job can run: `uv run {trainer}`.")
    return "\n".join(lines)


def cmd_doctor(args, root: Path, backend: str) -> int:
    rows = diagnose(root, backend, online=args.online)
    print(f"autoresearch doctor: backend {backend}, project {root}")
    print(render(rows, backend))
    return 1 if any(r.status == "missing" and r.essential for r in rows) else 0
