"""Git as the lab notebook: the branch, one commit per experiment, keep = advance, else reset.

Every git operation the runner performs lives here, on top of GitPython. Commands go
through the git CLI (`repo.git.<cmd>`) rather than GitPython's own index writer so the
repository sees exactly what a human typing git would produce (hooks aside).
"""
from __future__ import annotations

import fnmatch
import hashlib
import os
import subprocess
from pathlib import Path

import git

# Every git command of the runner: no hooks (a hook is code anyone with write access to
# .git could have planted; post-commit even runs despite --no-verify) and no replace objects
# (`git replace` can make `git show` of a kept commit display another file).
os.environ.update(GIT_NO_REPLACE_OBJECTS="1", GIT_CONFIG_COUNT="1", GIT_CONFIG_KEY_0="core.hooksPath",
                  GIT_CONFIG_VALUE_0=os.devnull)

BRANCH_PREFIX = "autoresearch/"

# Files and folders the agent must never change. Hashes of their working-tree content are
# recorded when a run starts and checked before every experiment.
PROTECTED_PATHS = ("prepare.py", "harness", "pyproject.toml", "uv.lock", "program.md", "autoresearch",
                   "metal_kernels")

# Untracked outputs of a run; added to .git/info/exclude so they never dirty the tree.
RUN_OUTPUTS = ("results.tsv", "results.*.tsv", "ledger.jsonl", "ledger.*.jsonl", "optuna.db", "run.log", "run.seed*.log",
               "run.exp*.log",
               "progress.png")


class GitError(RuntimeError):
    """A repository state the runner cannot work with; the message says how to fix it."""


def open_repo(path: str | Path) -> git.Repo:
    try:
        return git.Repo(path, search_parent_directories=True)
    except (git.InvalidGitRepositoryError, git.NoSuchPathError):
        raise GitError(f"{path} is not inside a git repository: run autoresearch from the project "
                       "checkout (git clone ...; cd into it).") from None


def root(repo: git.Repo) -> Path:
    return Path(repo.working_tree_dir)


def head_sha(repo: git.Repo) -> str:
    return repo.git.rev_parse("HEAD")


def short(sha: str) -> str:
    return sha[:7]


def current_branch(repo: git.Repo) -> str | None:
    """The checked-out branch name, or None when HEAD is detached."""
    try:
        return repo.git.symbolic_ref("--short", "-q", "HEAD")
    except git.GitCommandError:
        return None


def branch_exists(repo: git.Repo, branch: str) -> bool:
    try:
        repo.git.rev_parse("--verify", "-q", f"refs/heads/{branch}")
        return True
    except git.GitCommandError:
        return False


def changed_tracked_files(repo: git.Repo) -> list[str]:
    """Tracked files whose working-tree or staged content differs from HEAD."""
    out = repo.git.diff("HEAD", "--name-only", "--no-renames")
    return sorted(set(line for line in out.splitlines() if line))


def create_branch(repo: git.Repo, branch: str) -> None:
    repo.git.checkout("-q", "-b", branch)


def checkout(repo: git.Repo, branch: str) -> None:
    repo.git.checkout("-q", branch)


def _identity_args(repo: git.Repo) -> list[str]:
    # A fresh machine may have no user.name / user.email; commit under a neutral identity
    # instead of failing in the middle of a night.
    args = []
    for key, fallback in (("user.name", "autoresearch"), ("user.email", "autoresearch@localhost")):
        try:
            repo.git.config("--get", key)
        except git.GitCommandError:
            args += ["-c", f"{key}={fallback}"]
    return args


RUNNER_TRAILER = "Autoresearch-Exp"


def commit_file(repo: git.Repo, path: str, message: str, exp: int | None = None) -> str:
    """Commit exactly one file (the training file) and return the new HEAD sha. The
    runner's commits carry an `Autoresearch-Exp: N` trailer so a resume can tell them from
    commits a human made on the branch."""
    repo.git.add("--", path)
    args = _identity_args(repo)
    full = message if exp is None else f"{message}\n\n{RUNNER_TRAILER}: {exp}"
    repo.git.execute(["git", *args, "commit", "-q", "--no-verify", "-m", full, "--", path])
    return head_sha(repo)


def keep_ref(repo: git.Repo, tag: str, exp: int, sha: str) -> str:
    """Keep a candidate commit reachable (a wave's candidates are not on the branch, and git's
    garbage collection would drop them): refs/autoresearch/<tag>/exp-<n>."""
    ref = f"refs/autoresearch/{tag}/exp-{exp}"
    repo.git.update_ref(ref, sha)
    return ref


def commit_message(repo: git.Repo, sha: str) -> str:
    return repo.git.log("-1", "--format=%s", sha)


def runner_exp_of(repo: git.Repo, sha: str) -> int | None:
    """The experiment number in a runner commit's trailer, or None for other commits."""
    body = repo.git.log("-1", "--format=%B", sha)
    for line in body.splitlines():
        if line.startswith(RUNNER_TRAILER + ":"):
            try:
                return int(line.split(":", 1)[1])
            except ValueError:
                return None
    return None


def reset_hard(repo: git.Repo, sha: str) -> None:
    repo.git.reset("-q", "--hard", sha)


def is_ancestor(repo: git.Repo, ancestor: str, sha: str) -> bool:
    try:
        repo.git.merge_base("--is-ancestor", ancestor, sha)
        return True
    except git.GitCommandError:
        return False


def untracked_files(repo: git.Repo, paths=PROTECTED_PATHS) -> set[str]:
    """Untracked, non-ignored files under the given paths."""
    out = repo.git.ls_files("--others", "--exclude-standard", "--", *paths)
    return set(line for line in out.splitlines() if line)


def remove_new_untracked(repo: git.Repo, keep: set[str], paths=PROTECTED_PATHS) -> list[str]:
    """Delete untracked files under `paths` that are not in `keep` (files an agent dropped
    into protected folders; `reset --hard` leaves untracked files alone)."""
    removed = []
    for rel in sorted(untracked_files(repo, paths) - keep):
        (root(repo) / rel).unlink()
        removed.append(rel)
    return removed


def remove_stale_index_lock(repo: git.Repo) -> bool:
    """Delete .git/index.lock left by a killed git process. Returns whether one was removed."""
    lock = Path(repo.git_dir) / "index.lock"
    if lock.exists():
        lock.unlink()
        return True
    return False


def exclude_run_outputs(repo: git.Repo, names=RUN_OUTPUTS) -> None:
    """Make run outputs invisible to `git status` in this clone, whatever .gitignore says."""
    exclude = Path(repo.git_dir) / "info" / "exclude"
    exclude.parent.mkdir(parents=True, exist_ok=True)
    existing = exclude.read_text().splitlines() if exclude.exists() else []
    wanted = [f"/{name}" for name in names]
    missing = [w for w in wanted if w not in existing]
    if missing:
        with open(exclude, "a") as f:
            if existing and existing[-1] != "":
                f.write("\n")
            f.write("# autoresearch run outputs\n" + "\n".join(missing) + "\n")


def hash_paths(repo: git.Repo, paths=PROTECTED_PATHS) -> dict[str, str]:
    """sha256 over the working-tree content of each protected path (a folder: its files).

    The files are the ones git sees: tracked, plus untracked ones that are not ignored (a
    new module dropped into autoresearch/ would be imported as surely as an edited one).
    Ignored build outputs and caches do not count. A path with no files hashes to "absent",
    so creating it is a change too.
    """
    base = root(repo)
    listed = repo.git.ls_files("--cached", "--others", "--exclude-standard", "-z", "--", *paths)
    files = sorted(set(f for f in listed.split("\0") if f))
    hashes = {}
    for rel in paths:
        mine = [f for f in files if f == rel or f.startswith(rel.rstrip("/") + "/")]
        if not mine:
            hashes[rel] = "absent"
            continue
        h = hashlib.sha256()
        for f in mine:
            p = base / f
            h.update(f.encode() + b"\0")
            h.update(p.read_bytes() if p.is_file() else b"<deleted>")
            h.update(b"\0")
        hashes[rel] = h.hexdigest()
    return hashes



# -- what a run may not change ------------------------------------------------------------------
# Inside .git: everything that changes what git runs or shows (refs are compared separately).
GIT_CONTROL_FILES = ("config", "HEAD", "info", "hooks", "objects/info", "commondir", "shallow")
_TRACKED_COPY_LIMIT = 16 * 1024 * 1024


def run_output_paths(repo_root: Path) -> list[Path]:
    """The runner's books in the repository (absent inside a sandboxed run)."""
    out = []
    for pattern in RUN_OUTPUTS:
        out += sorted(Path(repo_root).glob(pattern))
    return out


BOOKS = ("ledger.jsonl", "results.tsv", "results.*.tsv", "optuna.db")


def read_books(repo_root: Path) -> dict[str, bytes]:
    """The runner's books as they are now (only the runner writes them)."""
    return {p.name: p.read_bytes() for pattern in BOOKS for p in sorted(Path(repo_root).glob(pattern))}


def restore_books(repo_root: Path, books: dict[str, bytes]) -> list[str]:
    """Put the books back as `read_books` saw them; one line per file a run changed."""
    changes = []
    now = read_books(repo_root)
    for name in sorted(set(books) | set(now)):
        if books.get(name) == now.get(name):
            continue
        p = Path(repo_root) / name
        if name not in books:
            changes.append(f"{name} (added)")
            p.unlink()
        else:
            changes.append(f"{name} ({'deleted' if name not in now else 'modified'})")
            tmp = p.with_name(p.name + ".restore")
            tmp.write_bytes(books[name])
            os.replace(tmp, p)
    return changes


def _git(repo_root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo_root, capture_output=True, text=True, check=True).stdout


def file_at(repo_root: Path, sha: str, path: str) -> bytes:
    """The bytes of `path` in commit `sha`."""
    return subprocess.run(["git", "cat-file", "blob", f"{sha}:{path}"], cwd=repo_root, capture_output=True,
                          check=True).stdout


def git_dir_of(repo_root: Path) -> Path:
    return Path(repo_root, _git(repo_root, "rev-parse", "--git-dir").strip()).resolve()


def _control_files(git_dir: Path) -> dict[str, bytes]:
    files = {}
    for name in GIT_CONTROL_FILES:
        p = git_dir / name
        if p.is_file():
            files[name] = p.read_bytes()
        elif p.is_dir():
            for f in sorted(p.rglob("*")):
                if f.is_file() or f.is_symlink():
                    files[str(f.relative_to(git_dir))] = f.read_bytes() if f.is_file() else b"<link>"
    return files


def _is_run_output(rel: str) -> bool:
    return "/" not in rel and any(fnmatch.fnmatch(rel, p) for p in RUN_OUTPUTS)


def snapshot(repo_root: Path) -> dict:
    """What a run must leave as it found it: HEAD and every ref, git's control files (config,
    hooks, info/, alternates), the tracked files' content, and the untracked files (ignored
    ones too, e.g. a __pycache__ or the venv) by size and mtime. The runner's own books are
    not part of it."""
    repo_root = Path(repo_root)
    git_dir = git_dir_of(repo_root)
    tracked = {}
    for rel in _git(repo_root, "ls-files", "-z").split("\0"):
        p = repo_root / rel
        if rel and p.is_file():
            data = p.read_bytes()
            tracked[rel] = (hashlib.sha256(data).hexdigest(), data if len(data) <= _TRACKED_COPY_LIMIT else None)
    untracked = {}
    for rel in _git(repo_root, "ls-files", "--others", "-z").split("\0"):
        if rel and not _is_run_output(rel):
            try:
                st = os.lstat(repo_root / rel)
            except FileNotFoundError:
                continue
            untracked[rel] = (st.st_size, st.st_mtime_ns)
    return {"refs": _git(repo_root, "for-each-ref", "--format=%(refname) %(objectname)"),
            "control": _control_files(git_dir), "tracked": tracked, "untracked": untracked,
            "git_dir": str(git_dir)}


def undo_changes(repo_root: Path, before: dict) -> list[str]:
    """Compare the repository with `before`; undo what can be undone (control files, refs,
    tracked files, new untracked files) and return one line per change ([] = untouched)."""
    repo_root, git_dir = Path(repo_root), Path(before["git_dir"])
    changes = []
    control = _control_files(git_dir)
    for name in sorted(set(control) | set(before["control"])):
        old, new = before["control"].get(name), control.get(name)
        if old == new:
            continue
        p = git_dir / name
        if old is None:
            changes.append(f".git/{name} (added)")
            p.unlink()
        else:
            changes.append(f".git/{name} ({'deleted' if new is None else 'modified'})")
            p.parent.mkdir(parents=True, exist_ok=True)
            if p.is_symlink():
                p.unlink()
            p.write_bytes(old)
    refs_now = _git(repo_root, "for-each-ref", "--format=%(refname) %(objectname)")
    if refs_now != before["refs"]:
        old = dict(line.split(" ", 1) for line in before["refs"].splitlines())
        new = dict(line.split(" ", 1) for line in refs_now.splitlines())
        for ref in sorted(set(old) | set(new)):
            if old.get(ref) == new.get(ref):
                continue
            changes.append(f"ref {ref} ({'added' if ref not in old else 'deleted' if ref not in new else 'moved'})")
            if ref in old:
                _git(repo_root, "update-ref", ref, old[ref])
            else:
                _git(repo_root, "update-ref", "-d", ref)
    for rel, (digest, data) in before["tracked"].items():
        p = repo_root / rel
        try:
            same = p.is_file() and not p.is_symlink() and hashlib.sha256(p.read_bytes()).hexdigest() == digest
        except OSError:
            same = False
        if not same:
            if data is None:
                changes.append(f"{rel} (modified; too large to restore)")
                continue
            changes.append(f"{rel} (modified)")
            if p.is_symlink() or p.is_dir():
                p.unlink() if p.is_symlink() else None
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
    now = set()
    for rel in _git(repo_root, "ls-files", "--others", "-z").split("\0"):
        if rel and not _is_run_output(rel):
            now.add(rel)
    for rel in sorted(now - set(before["untracked"]) - set(before["tracked"])):
        changes.append(f"{rel} (added)")
        try:
            (repo_root / rel).unlink()
        except OSError:
            pass
    for rel, stamp in sorted(before["untracked"].items()):
        try:
            st = os.lstat(repo_root / rel)
            if (st.st_size, st.st_mtime_ns) == stamp:
                continue
            changes.append(f"{rel} (untracked file modified; cannot be restored)")
        except FileNotFoundError:
            changes.append(f"{rel} (untracked file deleted; cannot be restored)")
    return changes
