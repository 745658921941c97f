"""Which files of the working tree the artifacts are built from.

The deployed packages (``flstore_core``, ``lambdas``) are the files git tracks in them, read
from the working tree: an edit is deployed without a commit, while ``__pycache__``, editor
droppings and files nobody added never are. Untracked files are reported, so a module
forgotten in ``git add`` is a warning at ``pulumi up`` and not an ImportError in Lambda.
Outside a git checkout (a source tarball) every file but ``__pycache__`` and ``*.pyc`` is used.
"""

from __future__ import annotations

import hashlib
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath


@dataclass(frozen=True)
class SourceTree:
    """The files to deploy: POSIX paths relative to ``root``, sorted."""

    root: Path
    files: tuple[str, ...]
    # In the packages but neither tracked nor ignored: left out of every artifact.
    untracked: tuple[str, ...] = ()
    # False outside a git checkout (or without git): then every file was taken.
    from_git: bool = True

    def read(self, name: str) -> bytes:
        return (self.root / name).read_bytes()

    def digest(self) -> str:
        """sha256 over every file's name and content: equal digests, equal trees."""
        h = hashlib.sha256()
        for name in self.files:
            h.update(name.encode() + b"\0")
            h.update(hashlib.sha256(self.read(name)).digest())
        return h.hexdigest()


def _is_bytecode(name: str) -> bool:
    path = PurePosixPath(name)
    return "__pycache__" in path.parts or path.suffix in {".pyc", ".pyo"}


def _git_ls_files(root: Path, packages: Sequence[str], *options: str) -> list[str] | None:
    """``git ls-files`` under ``packages``, or None when ``root`` is not a git checkout."""
    try:
        listed = subprocess.run(
            ["git", "-C", str(root), "ls-files", "-z", *options, "--", *packages],
            capture_output=True,
            check=True,
        )
    except (FileNotFoundError, subprocess.CalledProcessError):
        return None
    return [name for name in listed.stdout.decode().split("\0") if name]


def _walk(root: Path, packages: Sequence[str]) -> list[str]:
    return [
        path.relative_to(root).as_posix()
        for package in packages
        for path in (root / package).rglob("*")
        if path.is_file()
    ]


def source_tree(root: Path, packages: Sequence[str]) -> SourceTree:
    """The deployable files of ``packages`` under ``root`` (see the module docstring)."""
    tracked = _git_ls_files(root, packages, "--cached")
    untracked = _git_ls_files(root, packages, "--others", "--exclude-standard") or []
    names = _walk(root, packages) if tracked is None else tracked
    # A tracked file deleted from the working tree is not deployed; neither is bytecode,
    # even if someone committed it.
    files = sorted({n for n in names if (root / n).is_file() and not _is_bytecode(n)})
    missing = [p for p in packages if not any(f.startswith(f"{p}/") for f in files)]
    if missing:
        raise FileNotFoundError(f"no source files of {missing} under {root}")
    left_out = sorted(n for n in untracked if not _is_bytecode(n))
    return SourceTree(root, tuple(files), tuple(left_out), from_git=tracked is not None)
