"""The OS sandbox every run of the runner goes through (fixed harness code).

A training file is code an LLM wrote. Under the runner it runs in a sandbox in which:

  - the repository is read-only and `.git`, the ledger, results and run logs are absent;
  - the user's home is absent, except what the interpreter needs (read-only);
  - the prepared training shards and tokenizer are readable, the validation shard is not;
  - the only writable place is a per-run scratch directory (HOME, TMPDIR, caches, .pyc);
  - there is no network (unless the user allowed it) and, on Linux, a PID namespace that
    dies with the run, so no descendant outlives it.

Linux: bubblewrap (`bwrap`). macOS: `sandbox-exec` with a generated profile (unverified:
no Mac has run it yet). Elsewhere, or without those tools, runs are unsandboxed and say so.

`plan(...)` returns a `Sandbox`: the kind and a `wrap(command)` that gives the command line
to spawn. Nothing here imports prepare.py, a trainer or autoresearch/.
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

# Parts of /etc a Python process, g++ (MLX compiles CPU kernels) and CUDA need; the rest
# (shadow, ssh host keys, credentials some distributions keep there) stays out.
ETC_ENTRIES = ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "alternatives", "passwd", "group", "nsswitch.conf",
               "localtime", "timezone", "hosts", "os-release", "mime.types", "ssl", "ca-certificates",
               "OpenCL", "vulkan", "nvidia", "glvnd", "gcc")
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/opt/homebrew")
GPU_DEVICES = ("/dev/nvidia*", "/dev/nvidia-caps", "/dev/dri", "/dev/kfd")

# Environment variables a run never sees: the agent's API keys and other credentials.
_SECRET_NAME = re.compile(r"(^|_)(API_?KEY|KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIALS?|COOKIE)S?($|_)",
                          re.IGNORECASE)
_NOT_SECRET = ("GIT_CONFIG_",)       # git's -c in the environment (the runner's no-hooks setting)
_SECRET_PREFIXES = ("ANTHROPIC_", "CLAUDE_", "AWS_", "GOOGLE_", "AZURE_", "GH_", "GITHUB_", "SSH_", "GPG_",
                    "OPENAI_", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


class SandboxUnavailable(RuntimeError):
    """--require-sandbox was given and no sandbox can run here; the message says why."""


@dataclass
class Sandbox:
    kind: str                          # bwrap | sandbox-exec | none
    reason: str = ""                   # why none, when none
    repo_root: Path | None = None
    scratch: Path | None = None
    readable: list = field(default_factory=list)    # extra read-only paths (data, tokenizer)
    hidden: list = field(default_factory=list)      # paths inside readable trees that must be absent
    allow_network: bool = False
    preload: str | None = None                      # LD_PRELOAD for the run, set inside bwrap

    def env(self, base: dict) -> dict:
        """The run's environment: no secrets; HOME, TMPDIR, caches and .pyc in scratch."""
        env = {k: v for k, v in base.items()
               if k.startswith(_NOT_SECRET) or not (_SECRET_NAME.search(k) or k.startswith(_SECRET_PREFIXES))}
        if self.scratch is not None:
            s = self.scratch
            env.update(HOME=str(s / "home"), TMPDIR=str(s / "tmp"), XDG_CACHE_HOME=str(s / "cache"),
                       PYTHONPYCACHEPREFIX=str(s / "pycache"), MPLCONFIGDIR=str(s / "cache" / "matplotlib"),
                       TORCHINDUCTOR_CACHE_DIR=str(s / "cache" / "inductor"),
                       TRITON_CACHE_DIR=str(s / "cache" / "triton"))
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        # `python` in a command is the runner's interpreter, as under `uv run` (a shim in
        # the home folder, e.g. pyenv's, is not inside the sandbox)
        bindir = os.path.dirname(sys.executable)
        path = env.get("PATH", os.defpath).split(os.pathsep)
        if path[0] != bindir:
            env["PATH"] = os.pathsep.join([bindir, *path])
        if self.kind == "bwrap" and "LD_PRELOAD" in env:
            # bwrap itself must not load the preload (a preloaded threaded OpenBLAS hangs it);
            # the run gets it through --setenv
            self.preload = env.pop("LD_PRELOAD")
        return env

    def wrap(self, command: list[str]) -> list[str]:
        if self.kind == "bwrap":
            return bwrap_args(self) + ["--", *command]
        if self.kind == "sandbox-exec":
            return ["/usr/bin/sandbox-exec", "-p", sandbox_exec_profile(self), *command]
        return list(command)


def _bwrap() -> str | None:
    """The bubblewrap executable ($AUTORESEARCH_BWRAP, else bwrap on PATH), or None."""
    return shutil.which(os.environ.get("AUTORESEARCH_BWRAP") or "bwrap")


def detect(allow_network: bool = False) -> tuple[str, str]:
    """(kind, reason): the sandbox this machine can run, or 'none' and why not."""
    if sys.platform.startswith("linux"):
        bwrap = _bwrap()
        if not bwrap:
            return "none", "bubblewrap is not installed (Debian/Ubuntu: apt install bubblewrap)"
        probe = [bwrap, "--ro-bind", "/", "/", "--proc", "/proc", "--dev", "/dev", "--unshare-pid",
                 "--die-with-parent", "--cap-drop", "ALL"]
        if not allow_network:
            probe.append("--unshare-net")
        try:
            proc = subprocess.run(probe + ["true"], capture_output=True, text=True, timeout=20, env=_launcher_env())
        except (OSError, subprocess.TimeoutExpired) as e:
            return "none", f"bwrap failed to start ({e})"
        if proc.returncode != 0:
            why = (proc.stderr.strip().splitlines() or ["no message"])[-1]
            return "none", (f"bwrap cannot create namespaces here ({why}); allow unprivileged user namespaces "
                            "(sysctl kernel.unprivileged_userns_clone=1) or run where they are allowed")
        return "bwrap", ""
    if sys.platform == "darwin":
        if os.path.exists("/usr/bin/sandbox-exec"):
            return "sandbox-exec", ""
        return "none", "/usr/bin/sandbox-exec is missing"
    return "none", f"no sandbox is implemented for {sys.platform}"


def plan(repo_root: Path, scratch: Path, readable=(), hidden=(), allow_network: bool = False,
         require: bool = False, kind: str | None = None) -> Sandbox:
    """The sandbox for one run. `readable`: paths outside the repository the run may read
    (files or folders); `hidden`: paths inside those or inside the repository that must be
    absent. With require=True and no sandbox available, raise SandboxUnavailable."""
    if kind is None:
        kind, reason = detect(allow_network)
    else:
        reason = "" if kind != "none" else "disabled"
    if kind == "none" and require:
        raise SandboxUnavailable(f"no sandbox: {reason}. Install one, or drop --require-sandbox to run "
                                 "the training file unsandboxed.")
    for sub in ("home", "tmp", "cache", "pycache"):
        (Path(scratch) / sub).mkdir(parents=True, exist_ok=True)
    return Sandbox(kind, reason, Path(repo_root), Path(scratch), [Path(p) for p in readable],
                   [Path(p) for p in hidden], allow_network)


def interpreter_paths() -> list[Path]:
    """What the Python that runs the trainer needs: the venv, the base installation, and the
    uv cache and python installs (uv links packages from them)."""
    paths = {Path(sys.prefix), Path(sys.base_prefix), Path(sys.exec_prefix),
             Path(os.path.realpath(sys.executable)).parent.parent}
    uv_cache = os.environ.get("UV_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "uv")
    uv_python = os.environ.get("UV_PYTHON_INSTALL_DIR") or os.path.join(os.path.expanduser("~"), ".local",
                                                                        "share", "uv", "python")
    for p in (uv_cache, uv_python):
        if os.path.isdir(p):
            paths.add(Path(p))
    return sorted(paths)


def bwrap_args(sb: Sandbox) -> list[str]:
    """The bubblewrap command line (without the command) for the sandbox `sb`."""
    args = [_bwrap() or "bwrap", "--die-with-parent", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
            "--unshare-cgroup-try", "--new-session", "--cap-drop", "ALL"]
    if not sb.allow_network:
        args.append("--unshare-net")
    for d in SYSTEM_DIRS:
        if os.path.islink(d):
            args += ["--symlink", os.readlink(d), d]
        elif os.path.isdir(d):
            args += ["--ro-bind", d, d]
    for e in ETC_ENTRIES:
        args += ["--ro-bind-try", f"/etc/{e}", f"/etc/{e}"]
    args += ["--proc", "/proc", "--dev", "/dev", "--ro-bind-try", "/sys", "/sys", "--tmpfs", "/tmp"]
    for pattern in GPU_DEVICES:
        for dev in sorted(glob.glob(pattern)):
            args += ["--dev-bind", dev, dev]
    for p in interpreter_paths():
        args += ["--ro-bind", str(p), str(p)]
    for p in sb.readable:
        if p.exists():
            args += ["--ro-bind", str(p), str(p)]
    repo = sb.repo_root
    args += ["--ro-bind", str(repo), str(repo)]
    git = repo / ".git"
    if git.is_dir():
        args += ["--tmpfs", str(git), "--remount-ro", str(git)]
    elif git.exists():
        args += ["--ro-bind", "/dev/null", str(git)]
    for p in sb.hidden:
        if p.is_dir():
            args += ["--tmpfs", str(p), "--remount-ro", str(p)]
        elif p.exists():
            args += ["--ro-bind", "/dev/null", str(p)]
    args += ["--bind", str(sb.scratch), str(sb.scratch), "--chdir", str(repo)]
    if sb.preload:
        args += ["--setenv", "LD_PRELOAD", sb.preload]
    return args


def _launcher_env() -> dict:
    return {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}


def _sb_string(path: Path | str) -> str:
    return '"' + str(path).replace("\\", "\\\\").replace('"', '\\"') + '"'


def sandbox_exec_profile(sb: Sandbox) -> str:
    """A macOS Seatbelt profile doing what the bubblewrap sandbox does: reads of the user's
    home only where the interpreter, the data and the repository are; no reads of `.git`,
    the books or the hidden paths; writes only in scratch; no network.

    Unverified: no Mac has run it (written from Apple's sandbox profile language)."""
    home = Path(os.path.expanduser("~"))
    readable = [*interpreter_paths(), *sb.readable, sb.repo_root]
    lines = ["(version 1)", "(allow default)",
             f"(deny file-read* (subpath {_sb_string(home)}))",
             "(allow file-read* " + " ".join(f"(subpath {_sb_string(os.path.realpath(p))})" for p in readable) + ")",
             f"(deny file-read* file-write* (subpath {_sb_string(os.path.realpath(sb.repo_root / '.git'))}))"]
    for p in sb.hidden:
        lines.append(f"(deny file-read* file-write* (subpath {_sb_string(os.path.realpath(p))}))")
    lines += ["(deny file-write*)",
              f"(allow file-write* (subpath {_sb_string(os.path.realpath(sb.scratch))}) "
              '(literal "/dev/null") (literal "/dev/stdout") (literal "/dev/stderr"))']
    if not sb.allow_network:
        lines.append("(deny network*)")
        # Metal and MLX talk to system services over local mach ports, not the network
        lines.append('(allow network* (remote unix-socket))')
    return "\n".join(lines) + "\n"
