"""Lambda artifacts: what ``python -m infra.build`` produces and the program deploys.

Layout under the artifact directory (``build/`` by default):

- ``lambda/router.zip`` — the router and the authorizer: the ``flstore_core`` and
  ``lambdas`` packages plus their numpy-free dependencies (boto3 is in the runtime),
  checked to unpack to less than Lambda's 250 MB.
- ``cache_node/`` — the Docker build context of the cache-node image: ``Dockerfile``
  (``infra/Dockerfile.cache_node``), ``pyproject.toml``, ``requirements.lock``, ``README.md``
  and the two packages. Staging a clean copy keeps the context small and free of ``.venv``.

Standard library only, so building does not need Pulumi.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
ROUTER_ZIP = Path("lambda") / "router.zip"
CACHE_NODE_CONTEXT = Path("cache_node")
DOCKERFILE_SOURCE = REPO_ROOT / "infra" / "Dockerfile.cache_node"

# The Lambda runtime of the zip functions, and of the image's base (see the Dockerfile).
LAMBDA_PYTHON = "3.12"
LAMBDA_RUNTIME = "python" + LAMBDA_PYTHON
PACKAGES = ("flstore_core", "lambdas")
# What the router and authorizer import beyond the runtime's boto3; versions come from
# requirements.lock so the zip runs what the tests ran.
ZIP_DEPENDENCIES = ("aws-lambda-powertools", "cachetools")
# Never in the zip: the router must stay light, and these alone exceed the 250 MB limit.
HEAVY_PACKAGES = frozenset({"numpy", "torch", "scipy", "sklearn", "pandas"})
MAX_UNZIPPED_BYTES = 250 * 2**20
CONTEXT_FILES = ("pyproject.toml", "requirements.lock", "README.md")
MANYLINUX = {"x86_64": "manylinux2014_x86_64", "arm64": "manylinux2014_aarch64"}
# Fixed timestamps make the zip byte-identical across rebuilds of the same sources, so
# Pulumi sees no change (and redeploys nothing) when nothing changed.
_EPOCH = (1980, 1, 1, 0, 0, 0)


class MissingArtifactError(FileNotFoundError):
    """The program was run before the build step."""


class PackageTooLargeError(ValueError):
    """The zip would unpack past Lambda's limit."""


@dataclass(frozen=True)
class BuildArtifacts:
    """Paths of the built artifacts under one artifact directory."""

    root: Path

    @property
    def router_zip(self) -> Path:
        return self.root / ROUTER_ZIP

    @property
    def cache_node_context(self) -> Path:
        return self.root / CACHE_NODE_CONTEXT

    @property
    def cache_node_dockerfile(self) -> Path:
        return self.cache_node_context / "Dockerfile"

    def missing(self) -> list[Path]:
        return [p for p in (self.router_zip, self.cache_node_dockerfile) if not p.is_file()]


def locate_artifacts(artifact_dir: Path) -> BuildArtifacts:
    """The artifacts under ``artifact_dir``; raises ``MissingArtifactError`` if not built."""
    artifacts = BuildArtifacts(Path(artifact_dir))
    missing = artifacts.missing()
    if missing:
        raise MissingArtifactError(
            f"Lambda artifacts not found ({', '.join(str(p) for p in missing)}): run "
            "`python -m infra.build` from the repository root before `pulumi up`, "
            "or point flstore:artifactDir at a build"
        )
    return artifacts


def _source_files(root: Path, packages: Sequence[str]) -> Iterator[Path]:
    for package in packages:
        for path in sorted((root / package).rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                yield path


def stale_sources(artifacts: BuildArtifacts, repo_root: Path = REPO_ROOT) -> list[Path]:
    """Sources changed since the zip was built (a deploy would ship old code)."""
    built = artifacts.router_zip.stat().st_mtime
    sources = [*_source_files(repo_root, PACKAGES), DOCKERFILE_SOURCE]
    return [p for p in sources if p.exists() and p.stat().st_mtime > built]


def locked_requirements(names: Iterable[str], lock: Path) -> list[str]:
    """``name==version`` for each name, as pinned in ``requirements.lock``."""

    def norm(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    pins = {}
    for line in lock.read_text().splitlines():
        name, sep, version = line.strip().partition("==")
        if sep:
            pins[norm(name)] = f"{name}=={version}"
    missing = [n for n in names if norm(n) not in pins]
    if missing:
        raise ValueError(f"{lock} pins none of {missing}")
    return [pins[norm(n)] for n in names]


def install_dependencies(requirements: Sequence[str], target: Path, *, architecture: str) -> None:
    """Install Linux wheels for the Lambda runtime into ``target`` (whatever the host is)."""
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-compile",
            "--target",
            str(target),
            "--platform",
            MANYLINUX[architecture],
            "--implementation",
            "cp",
            "--python-version",
            LAMBDA_PYTHON,
            "--only-binary=:all:",
            *requirements,
        ],
        check=True,
    )
    heavy = sorted(p.name for p in target.iterdir() if p.name in HEAVY_PACKAGES)
    if heavy:
        raise PackageTooLargeError(f"the router zip must stay numpy-free; it pulled in {heavy}")


def _zip_members(dependencies: Path | None, repo_root: Path) -> list[tuple[str, Path]]:
    members: dict[str, Path] = {}
    if dependencies is not None:
        for path in sorted(dependencies.rglob("*")):
            rel = path.relative_to(dependencies)
            if path.is_file() and rel.parts[0] != "bin" and "__pycache__" not in rel.parts:
                members[rel.as_posix()] = path
    for path in _source_files(repo_root, PACKAGES):
        members[path.relative_to(repo_root).as_posix()] = path
    return sorted(members.items())


def write_zip(members: Iterable[tuple[str, Path]], zip_path: Path) -> None:
    """A deterministic zip of ``(name in archive, file)`` pairs."""
    zip_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = zip_path.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        for name, path in members:
            info = zipfile.ZipInfo(name, date_time=_EPOCH)
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, path.read_bytes())
    tmp.replace(zip_path)


def unzipped_size(zip_path: Path) -> int:
    with zipfile.ZipFile(zip_path) as archive:
        return sum(info.file_size for info in archive.infolist())


def check_unzipped_size(zip_path: Path, limit: int = MAX_UNZIPPED_BYTES) -> int:
    """The unpacked size of ``zip_path``; raises ``PackageTooLargeError`` at ``limit`` or more."""
    size = unzipped_size(zip_path)
    if size >= limit:
        raise PackageTooLargeError(
            f"{zip_path} unpacks to {size / 2**20:.1f} MB; Lambda allows < {limit / 2**20:.0f} MB"
        )
    return size


def build_router_zip(
    out_dir: Path, *, architecture: str = "x86_64", repo_root: Path = REPO_ROOT
) -> Path:
    """Build ``lambda/router.zip`` under ``out_dir`` and return its path."""
    requirements = locked_requirements(ZIP_DEPENDENCIES, repo_root / "requirements.lock")
    dependencies = out_dir / "lambda" / "deps"
    install_dependencies(requirements, dependencies, architecture=architecture)
    zip_path = out_dir / ROUTER_ZIP
    write_zip(_zip_members(dependencies, repo_root), zip_path)
    check_unzipped_size(zip_path)
    return zip_path


def stage_image_context(out_dir: Path, *, repo_root: Path = REPO_ROOT) -> Path:
    """Copy what the cache-node Dockerfile needs into ``cache_node/`` under ``out_dir``."""
    context = out_dir / CACHE_NODE_CONTEXT
    if context.exists():
        shutil.rmtree(context)
    context.mkdir(parents=True)
    shutil.copyfile(DOCKERFILE_SOURCE, context / "Dockerfile")
    for name in CONTEXT_FILES:
        if (repo_root / name).is_file():
            shutil.copyfile(repo_root / name, context / name)
        elif name == "README.md":  # pyproject names it as the long description
            (context / name).write_text("# FLStore\n")
        else:
            raise MissingArtifactError(f"{repo_root / name} is needed to build the image")
    for path in _source_files(repo_root, PACKAGES):
        dest = context / path.relative_to(repo_root)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest)
    return context
