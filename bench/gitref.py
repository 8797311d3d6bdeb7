"""Check out a git ref of rtserve into a temporary worktree, to measure an older commit.

Why: a ratio between two rtserve versions only means something when both run in the same
benchmark session, with the same apps, settings and machine state. ``bench/run.py
--baseline REF`` and ``bench/callgrind_server.py --ref REF`` run the server from the
``src/`` of such a tree (by ``PYTHONPATH``) beside the current one.

The tree is a ``git worktree add --detach`` (it shares the object store, so it costs
seconds, not a clone) in a temporary directory, and is removed again on exit: on success,
on error and on Ctrl-C (the ``with`` block's ``finally``). A process killed with SIGKILL
leaves a stale entry in ``git worktree list``; ``git worktree prune`` clears it (not run
here: the repository's worktrees are shared with other engineers).
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _git(*args: str, repo: Path = ROOT) -> str:
    """Run ``git -C repo args`` and return its stdout, stripped; raise on failure."""
    out = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"git {' '.join(args)}: {out.stderr.strip()}")
    return out.stdout.strip()


def resolve(ref: str, repo: Path = ROOT) -> str:
    """The full commit id ``ref`` names (a branch, tag, ``HEAD~3``, a short id...)."""
    return _git("rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}", repo=repo)


def describe(tree: Path) -> str:
    """``git describe --always --dirty`` of a tree, or "" when it is not a git tree."""
    try:
        return _git("describe", "--always", "--dirty", repo=tree)
    except RuntimeError:
        return ""


def src_commit(tree: Path) -> str:
    """The last commit that changed ``tree``'s ``src/`` (+ "-dirty" if it has local edits).

    The figure of a server belongs to its source, not to the tree's HEAD: on the bench
    branch HEAD moves with every bench/ commit while src/ stays the code being measured.
    """
    try:
        sha = _git("log", "-1", "--format=%h", "--", "src", repo=tree)
        dirty = _git("status", "--porcelain", "--", "src", repo=tree)
    except RuntimeError:
        return ""
    return sha + ("-dirty" if dirty else "")


def src_dir(path: Path) -> Path:
    """The directory to put on ``PYTHONPATH`` for a tree: ``path/src`` or ``path`` itself.

    Accepts a repository root (``.../src/rtserve`` below it) or its ``src`` directory.
    """
    path = path.resolve()
    for cand in (path / "src", path):
        if (cand / "rtserve" / "__init__.py").is_file():
            return cand
    raise FileNotFoundError(f"no rtserve package under {path} or {path / 'src'}")


@contextlib.contextmanager
def worktree(ref: str, repo: Path = ROOT) -> Iterator[tuple[Path, str]]:
    """Yield ``(tree, commit)``: ``ref`` checked out, detached, in a temporary directory.

    The worktree is unregistered and deleted when the block ends, however it ends.
    """
    try:
        sha = resolve(ref, repo)
    except RuntimeError:
        raise RuntimeError(f"{ref!r} is not a commit in {repo}") from None
    tmp = Path(tempfile.mkdtemp(prefix=f"rtserve-{sha[:8]}-"))
    tree = tmp / "tree"
    try:
        _git("worktree", "add", "--detach", "--quiet", str(tree), sha, repo=repo)
        yield tree, sha
    finally:
        with contextlib.suppress(RuntimeError):
            _git("worktree", "remove", "--force", str(tree), repo=repo)
        shutil.rmtree(tmp, ignore_errors=True)
