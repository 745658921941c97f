"""The Lambda artifacts, built by the program itself on every ``pulumi up`` and preview.

- **The router zip** (router and authorizer): the tracked files of ``flstore_core`` and
  ``lambdas`` (``sources``) plus the files of their dependencies' wheels (``wheels``; boto3 is
  in the runtime), numpy and zstandard included but not scikit-learn, scipy or torch, checked
  to unpack to less than Lambda's 250 MB and to be at most the 50 MB uploaded with the function.
- **The cache-node image's Docker context**: ``Dockerfile`` (``infra/Dockerfile.cache_node``),
  ``pyproject.toml``, ``requirements.lock``, a stub ``README.md`` and the two packages; the
  ``docker-build`` provider builds it. A clean copy keeps ``.venv`` and tests out of it.

Both are deterministic: members in sorted order, fixed timestamps and modes, so the same
tree gives the same bytes and Pulumi sees no change (Pulumi hashes the zip file's bytes, the
image context's files). The zip is deflated at a fixed level, so its bytes also depend on the
zlib that compresses them: a deployer whose Python links another zlib build (zlib-ng) gets
another zip of the same files, which Pulumi shows as a code update of equal contents.
Both are named by a hash of their inputs under the build cache (``default_cache_dir``), so an
unchanged tree reuses them, a changed one gets new ones, and a few recent builds are kept.

Standard library only (pip runs as a subprocess), so building does not need Pulumi.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .sources import SourceTree, source_tree
from .target import MANYLINUX
from .wheels import WheelSet, locked_wheels, wheel_files

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE_SOURCE = REPO_ROOT / "infra" / "Dockerfile.cache_node"
PACKAGES = ("flstore_core", "lambdas")
# What the router and authorizer import beyond the runtime's boto3; versions come from
# requirements.lock so the zip runs what the tests ran. pydantic: the router's OpenAPI models
# and Powertools' validation (flstore_core/routing/openapi.py). numpy and zstandard:
# `import lambdas.router` needs them (the workload catalogue, the codec, the object store), and
# the router runs a sharded round's own math in numpy (flstore_core/cache/sharded.py: summing
# Gram pieces, the selections); threadpoolctl: that math runs on one BLAS thread
# (flstore_core/cache/blas.py). Measured for cp312 (numpy 2.4.6, zstandard 0.25.0): the wheels
# unpack to 54 + 23 MB on x86_64 (52 + 21 on arm64), the whole zip to 88 MB of Lambda's 250;
# stored, the zip would be past the 50 MB uploaded with the function; deflated it is 25 MB
# (24 on arm64). The alternative, the router in the cache-node image, was not taken: every
# router cold start would pull an image estimated at ~1.5 GB (the base image, CPU torch,
# scipy, scikit-learn; not built here) for modules the router never imports.
ZIP_DEPENDENCIES = (
    "aws-lambda-powertools",
    "cachetools",
    "numpy",
    "pydantic",
    "threadpoolctl",
    "zstandard",
)
# Never in the zip: the router must stay light (the workloads needing scikit-learn run on a
# cache node), and torch or scipy with scikit-learn alone exceed the 250 MB limit.
HEAVY_DISTRIBUTIONS = frozenset({"torch", "scipy", "scikit-learn", "pandas"})
# What the python3.12 runtime provides beside the standard library, so the zip leaves it out:
# boto3 and its dependencies.
RUNTIME_DISTRIBUTIONS = (
    "boto3",
    "botocore",
    "jmespath",
    "python-dateutil",
    "s3transfer",
    "six",
    "urllib3",
)
MAX_UNZIPPED_BYTES = 250 * 2**20
# The zip is uploaded with the function (no S3 staging), which Lambda allows up to 50 MB.
MAX_ZIP_BYTES = 50 * 2**20
LOCK = "requirements.lock"
# Copied into the image context beside the packages; the Dockerfile installs from them.
CONTEXT_FILES = ("pyproject.toml", LOCK)
# pyproject names README.md as the long description, so `pip install .` needs one; a fixed
# stub keeps documentation edits from rebuilding a multi-GB image.
CONTEXT_README = b"# FLStore\n\nThe cache-node image of FLStore.\n"
CACHE_ENV = "FLSTORE_BUILD_CACHE"
# Builds kept per kind in the cache (most recently used first); older ones are deleted.
KEEP_BUILDS = 5
# Bump when what goes into an artifact changes without its inputs changing. 2: deflated zip.
BUILD_FORMAT = 2
# zlib's default level, pinned: the same zlib gives the same bytes at the same level.
ZIP_COMPRESSLEVEL = 6
# 1980-01-01, the earliest time a zip can hold, for every member and staged file.
_EPOCH = (1980, 1, 1, 0, 0, 0)
_EPOCH_SECONDS = 315532800


class PackageTooLargeError(ValueError):
    """The zip would unpack past Lambda's limit, or pulled in a package it must not ship."""


class MissingSourceError(FileNotFoundError):
    """A file the artifacts are built from is not in the working tree."""


def default_cache_dir() -> Path:
    """``$FLSTORE_BUILD_CACHE``, else ``$XDG_CACHE_HOME/flstore``, else ``~/.cache/flstore``."""
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured).expanduser().resolve()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "flstore"


@dataclass(frozen=True)
class BuildArtifacts:
    """What the program deploys: the router zip and the cache-node image context."""

    router_zip: Path
    cache_node_context: Path
    # Files in the packages git does not track: not deployed (see ``sources``).
    untracked: tuple[str, ...] = ()
    # False when the sources were not listed by git (every file in the packages was taken).
    from_git: bool = True

    @property
    def cache_node_dockerfile(self) -> Path:
        return self.cache_node_context / "Dockerfile"


# --- the zip ---------------------------------------------------------------------------------


def write_zip(members: Iterable[tuple[str, bytes]], zip_path: Path) -> None:
    """A deterministic zip of ``(name in archive, content)`` pairs, written in the given order.

    Fixed timestamp, mode (0644) and creator system, deflated at ``ZIP_COMPRESSLEVEL``.
    Deflated, not stored: numpy and zstandard make the files 88 MB, past the 50 MB Lambda takes
    uploaded with the function; deflated they are 25 MB (x86_64). Deflate's output depends
    on the zlib build (zlib, zlib-ng), so the bytes are the same for the same contents on
    machines with the same zlib (see the module docstring).
    """
    zip_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=zip_path.parent, prefix=f".{zip_path.name}-")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as file, zipfile.ZipFile(file, "w") as archive:
            for name, content in members:
                info = zipfile.ZipInfo(name, date_time=_EPOCH)
                info.create_system = 3  # Unix, whatever builds it
                info.external_attr = 0o100644 << 16
                info.compress_type = zipfile.ZIP_DEFLATED
                archive.writestr(info, content, compresslevel=ZIP_COMPRESSLEVEL)
        tmp.replace(zip_path)
    finally:
        tmp.unlink(missing_ok=True)


def unzipped_size(zip_path: Path) -> int:
    with zipfile.ZipFile(zip_path) as archive:
        return sum(info.file_size for info in archive.infolist())


def check_unzipped_size(zip_path: Path, limit: int = MAX_UNZIPPED_BYTES) -> int:
    """The unpacked size of ``zip_path``; raises ``PackageTooLargeError`` at ``limit`` or more
    (or when the zip itself is past the upload limit, ``MAX_ZIP_BYTES``)."""
    size = unzipped_size(zip_path)
    if size >= limit:
        raise PackageTooLargeError(
            f"{zip_path} unpacks to {size / 2**20:.1f} MB; Lambda allows < {limit / 2**20:.0f} MB"
        )
    uploaded = zip_path.stat().st_size
    if uploaded > MAX_ZIP_BYTES:
        raise PackageTooLargeError(
            f"{zip_path} is {uploaded / 2**20:.1f} MB; Lambda takes zips of up to "
            f"{MAX_ZIP_BYTES / 2**20:.0f} MB with the function"
        )
    return size


def zip_members(sources: SourceTree, wheels: WheelSet | None) -> list[tuple[str, bytes]]:
    """The zip's members, sorted by name: the wheels' files, then the sources over them.

    Two wheels may ship the same file only with the same content, and no wheel may ship a
    file of the packages.
    """
    members: dict[str, bytes] = {}
    for wheel in wheels.wheels if wheels else ():
        for name, content in wheel_files(wheel):
            if members.setdefault(name, content) != content:
                raise PackageTooLargeError(f"two dependency wheels ship different {name}")
    for name in sources.files:
        if name in members:
            raise PackageTooLargeError(f"a dependency wheel ships {name}, a file of ours")
        members[name] = sources.read(name)
    return sorted(members.items())


def _input_digest(*parts: str) -> str:
    h = hashlib.sha256()
    for part in (f"format={BUILD_FORMAT}", *parts):
        h.update(part.encode() + b"\0")
    return h.hexdigest()[:16]


def _reuse_or_prune(path: Path, pattern: str) -> bool:
    """True if ``path`` was already built (and marks it used); else deletes all but the
    ``KEEP_BUILDS - 1`` most recently used builds matching ``pattern`` beside it."""
    if path.exists():
        os.utime(path)
        return True
    if path.parent.is_dir():
        builds = sorted(path.parent.glob(pattern), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in builds[KEEP_BUILDS - 1 :]:
            if old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)
    return False


def build_router_zip(
    sources: SourceTree, wheels: WheelSet, *, out_dir: Path, architecture: str
) -> Path:
    """``<out_dir>/router-<arch>-<input hash>.zip``, built unless it already is."""
    heavy = sorted(wheels.distributions() & HEAVY_DISTRIBUTIONS)
    if heavy:
        raise PackageTooLargeError(
            f"the router zip must not ship {heavy}: the workloads needing them run on the cache "
            "nodes, and they would take the zip past Lambda's 250 MB"
        )
    digest = _input_digest(architecture, wheels.key, sources.digest())
    zip_path = out_dir / f"router-{architecture}-{digest}.zip"
    if not _reuse_or_prune(zip_path, "router-*.zip"):
        write_zip(zip_members(sources, wheels), zip_path)
    check_unzipped_size(zip_path)
    return zip_path


# --- the image context -----------------------------------------------------------------------


def image_context_files(sources: SourceTree) -> list[tuple[str, bytes]]:
    """``(path in the context, content)`` of the cache-node image's build context."""
    files = [("Dockerfile", DOCKERFILE_SOURCE.read_bytes()), ("README.md", CONTEXT_README)]
    for name in CONTEXT_FILES:
        path = sources.root / name
        if not path.is_file():
            raise MissingSourceError(f"{path} is needed to build the cache-node image")
        files.append((name, path.read_bytes()))
    files += [(name, sources.read(name)) for name in sources.files]
    return sorted(files)


def stage_image_context(sources: SourceTree, *, out_dir: Path) -> Path:
    """``<out_dir>/cache-node-<content hash>/``, staged unless it already is.

    Files 0644 with a fixed mtime: the provider's context hash covers path, mode and content,
    and Docker's COPY keeps the mtime, so equal trees stage equal contexts.
    """
    files = image_context_files(sources)
    h = hashlib.sha256()
    for name, content in files:
        h.update(name.encode() + b"\0" + hashlib.sha256(content).digest())
    context = out_dir / f"cache-node-{_input_digest(h.hexdigest())}"
    if _reuse_or_prune(context, "cache-node-*"):
        return context
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".cache-node-", dir=out_dir))
    try:
        for name, content in files:
            path = staging / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
            path.chmod(0o644)
            os.utime(path, (_EPOCH_SECONDS, _EPOCH_SECONDS))
        for directory in (p for p in staging.rglob("*") if p.is_dir()):
            directory.chmod(0o755)
        staging.chmod(0o755)
        try:
            staging.rename(context)
        except OSError:
            if not context.is_dir():  # not a concurrent run finishing first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return context


# --- both --------------------------------------------------------------------------------------


def build_artifacts(
    *, architecture: str, repo_root: Path = REPO_ROOT, cache_dir: Path | None = None
) -> BuildArtifacts:
    """Build (or find, unchanged, in the cache) everything the program deploys.

    The cache (``default_cache_dir()`` unless given) holds ``wheels/<key>/`` (see ``wheels``),
    ``lambda/router-<arch>-<hash>.zip`` and ``image/cache-node-<hash>/``.
    """
    if architecture not in MANYLINUX:
        raise ValueError(f"architecture must be one of {sorted(MANYLINUX)}, not {architecture!r}")
    cache = cache_dir or default_cache_dir()
    lock = repo_root / LOCK
    if not lock.is_file():
        raise MissingSourceError(f"{lock} pins the deployed dependencies; it is missing")
    sources = source_tree(repo_root, PACKAGES)
    wheels = locked_wheels(
        ZIP_DEPENDENCIES, lock, architecture=architecture, cache_dir=cache / "wheels"
    )
    return BuildArtifacts(
        router_zip=build_router_zip(
            sources, wheels, out_dir=cache / "lambda", architecture=architecture
        ),
        cache_node_context=stage_image_context(sources, out_dir=cache / "image"),
        untracked=sources.untracked,
        from_git=sources.from_git,
    )
