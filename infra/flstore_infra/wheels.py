"""The dependency wheels of the router zip: downloaded once per lock and target, then cached.

``pip download`` fetches the manylinux wheels of the zip's dependencies for the Lambda
runtime (whatever the deployer's machine is; every manylinux tag its glibc loads, see
``target.platform_tags``), at the versions ``requirements.lock`` pins;
the lock is also the constraints file, so their own dependencies are pinned too. The wheels
land in ``<cache>/wheels/<key>/``, where the key is a hash of the lock's content, the
requested names, the platform tag and the Python version: a run with the same lock and
target finds them there and needs no network, and a changed lock gets a directory of its own.
A key directory appears only complete (downloaded beside it, then renamed into place).

The zip takes the wheels' files as they are in the wheel (what pip would install into a
``--target``, minus scripts and data): same wheels, same bytes.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .target import LAMBDA_PYTHON, MANYLINUX, platform_tags

# Bump when what a key directory holds changes, so old caches are not reused. 2: every
# manylinux tag of the runtime's glibc is asked for (``target.platform_tags``), not manylinux2014.
CACHE_FORMAT = 2
MANIFEST = "wheels.json"


class WheelDownloadError(RuntimeError):
    """pip could not download the locked wheels (no index reachable, no wheel for the target)."""


def normalize(name: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def locked_requirements(names: Iterable[str], lock: Path) -> list[str]:
    """``name==version`` for each name, as pinned in ``requirements.lock``."""
    pins = {}
    for line in lock.read_text().splitlines():
        name, sep, version = line.strip().partition("==")
        if sep:
            pins[normalize(name)] = f"{name}=={version}"
    missing = [n for n in names if normalize(n) not in pins]
    if missing:
        raise ValueError(f"{lock} pins none of {missing}")
    return [pins[normalize(n)] for n in names]


@dataclass(frozen=True)
class WheelSet:
    """The cached wheels of one key, sorted by file name."""

    directory: Path
    key: str
    wheels: tuple[Path, ...]

    def distributions(self) -> set[str]:
        """Normalized names of the distributions the wheels hold."""
        return {normalize(w.name.split("-", 1)[0]) for w in self.wheels}


def cache_key(requirements: Iterable[str], lock: bytes, *, architecture: str) -> str:
    """``<platform>-cp<python>-<hash of format, target, requirements and the lock>``."""
    platform, python = MANYLINUX[architecture], LAMBDA_PYTHON.replace(".", "")
    h = hashlib.sha256()
    for part in (f"format={CACHE_FORMAT}", platform, python, *requirements):
        h.update(part.encode() + b"\0")
    h.update(lock)
    return f"{platform}-cp{python}-{h.hexdigest()[:16]}"


def _pip_download(requirements: list[str], lock: Path, dest: Path, architecture: str) -> None:
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--quiet",
        "--disable-pip-version-check",
        "--progress-bar",
        "off",
        "--dest",
        str(dest),
        *(arg for tag in platform_tags(architecture) for arg in ("--platform", tag)),
        "--implementation",
        "cp",
        "--python-version",
        LAMBDA_PYTHON,
        "--only-binary=:all:",
        "--constraint",
        str(lock),
        *requirements,
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise WheelDownloadError(
            f"pip could not download {requirements} for {MANYLINUX[architecture]}, "
            f"Python {LAMBDA_PYTHON} (the package index is needed once per requirements.lock; "
            f"PIP_INDEX_URL picks another):\n{done.stderr.strip()[-2000:]}"
        )


def locked_wheels(
    names: Iterable[str], lock: Path, *, architecture: str, cache_dir: Path
) -> WheelSet:
    """The wheels of ``names`` and their dependencies at the lock's versions, from the cache
    under ``cache_dir`` (``<cache_dir>/<key>/``), downloading them the first time."""
    requirements = locked_requirements(names, lock)
    key = cache_key(requirements, lock.read_bytes(), architecture=architecture)
    directory = cache_dir / key
    if not directory.is_dir():
        cache_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=cache_dir))
        try:
            _pip_download(requirements, lock, staging, architecture)
            manifest = {
                "requirements": requirements,
                "platforms": platform_tags(architecture),
                "python": LAMBDA_PYTHON,
                "lock_sha256": hashlib.sha256(lock.read_bytes()).hexdigest(),
                "wheels": sorted(p.name for p in staging.glob("*.whl")),
            }
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            try:
                staging.rename(directory)
            except OSError:
                if not directory.is_dir():  # not a concurrent run finishing first
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return WheelSet(directory, key, tuple(sorted(directory.glob("*.whl"))))


def _install_path(info: zipfile.ZipInfo) -> PurePosixPath | None:
    """Where installing a wheel puts one of its members, relative to ``sys.path``; None for
    what ``wheel_files`` leaves out."""
    if info.is_dir():
        return None
    path = PurePosixPath(info.filename)
    if path.parts[0].endswith(".data"):
        if len(path.parts) < 3 or path.parts[1] not in {"purelib", "platlib"}:
            return None
        path = PurePosixPath(*path.parts[2:])
    if "__pycache__" in path.parts or path.suffix in {".pyc", ".pyo"}:
        return None
    return path


def wheel_files(wheel: Path) -> Iterator[tuple[str, bytes]]:
    """``(path, content)`` of what installing ``wheel`` puts on ``sys.path``.

    Library files as they are; ``<name>.data/purelib`` and ``platlib`` moved to the top; the
    other ``.data`` schemes (scripts, headers, data) and bytecode left out.
    """
    with zipfile.ZipFile(wheel) as archive:
        for info in archive.infolist():
            path = _install_path(info)
            if path is not None:
                yield path.as_posix(), archive.read(info)


def import_names(wheel: Path) -> set[str]:
    """The top-level modules and packages ``wheel`` makes importable (``numpy``, ``yaml``,
    ``_cffi_backend``): its top-level directories and ``.py``/extension modules, not its
    ``.dist-info`` or bundled ``.libs``."""
    names = set()
    with zipfile.ZipFile(wheel) as archive:
        for info in archive.infolist():
            path = _install_path(info)
            if path is None:
                continue
            top = path.parts[0]
            if len(path.parts) > 1:
                if not top.endswith((".dist-info", ".libs", ".data")):
                    names.add(top)
            elif path.suffix in {".py", ".so", ".pyd"}:
                names.add(top.split(".", 1)[0])
    return names
