"""Git as the lab notebook: the branch, one commit per experiment, keep = advance, else reset.

Every git operation the runner performs lives here, on top of GitPython. Commands go
through the git CLI (`repo.git.<cmd>`) rather than GitPython's own index writer so the
repository sees exactly what a human typing git would produce (hooks aside).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import git

BRANCH_PREFIX = "autoresearch/"

# Files and folders the agent must never change. Hashes of their working-tree content are
# recorded when a run starts and checked before every experiment.
PROTECTED_PATHS = ("prepare.py", "harness", "pyproject.toml", "uv.lock", "program.md", "autoresearch",
                   "metal_kernels")

# Untracked outputs of a run; added to .git/info/exclude so they never dirty the tree.
RUN_OUTPUTS = ("results.tsv", "results.*.tsv", "ledger.jsonl", "run.log", "progress.png")


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

