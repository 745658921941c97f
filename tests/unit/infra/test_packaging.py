"""What the Pulumi program deploys, built from the working tree: the router zip and the
cache-node image context, deterministic, from git-tracked files only, with the dependency
wheels downloaded once per lock and target into the build cache.

No Pulumi here: packaging is plain Python. The real wheels come from the build cache
(``$FLSTORE_BUILD_CACHE``, else ``~/.cache/flstore``); the first run on a machine downloads
them from the package index, every later run finds them.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO / "infra"))

from flstore_infra import packaging, target  # noqa: E402
from flstore_infra import wheels as wheel_cache  # noqa: E402
from flstore_infra.sources import source_tree  # noqa: E402
from flstore_infra.wheels import WheelSet, cache_key, locked_requirements, locked_wheels  # noqa: E402

LOCK = REPO / "requirements.lock"
PACKAGES = packaging.PACKAGES
TRACKED = {
    "flstore_core/__init__.py": '"""A library."""\n',
    "flstore_core/codec.py": "def encode(x):\n    return x\n",
    "lambdas/__init__.py": "",
    "lambdas/router.py": "def handler(event, context):\n    return {'statusCode': 200}\n",
    "lambdas/authorizer.py": "def handler(event, context):\n    return {'isAuthorized': False}\n",
}


@pytest.fixture(scope="module")
def locked() -> WheelSet:
    """The zip's real dependency wheels (x86_64), from the build cache."""
    return locked_wheels(
        packaging.ZIP_DEPENDENCIES,
        LOCK,
        architecture="x86_64",
        cache_dir=packaging.default_cache_dir() / "wheels",
    )


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A small git checkout of the two packages, plus what must never be deployed: bytecode
    and a file nobody added."""
    if shutil.which("git") is None:
        pytest.skip("needs git")
    root = tmp_path / "repo"
    for name, text in {**TRACKED, "pyproject.toml": "[project]\nname = 'x'\n"}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    shutil.copyfile(LOCK, root / "requirements.lock")
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    subprocess.run(["git", "-C", str(root), "add", "."], check=True)
    (root / "flstore_core" / "__pycache__").mkdir()
    (root / "flstore_core" / "__pycache__" / "codec.cpython-311.pyc").write_bytes(b"\0bytecode")
    (root / "lambdas" / "scratch.py").write_text("print('work in progress')\n")
    return root


def build_zip(root: Path, wheels: WheelSet, out_dir: Path) -> Path:
    sources = source_tree(root, PACKAGES)
    return packaging.build_router_zip(sources, wheels, out_dir=out_dir, architecture="x86_64")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fake_wheel(directory: Path, filename: str, members: dict[str, str]) -> Path:
    path = directory / filename
    with zipfile.ZipFile(path, "w") as archive:
        for name, text in members.items():
            archive.writestr(name, text)
    return path


# --- the zip ---------------------------------------------------------------------------------


def test_building_twice_from_the_same_tree_gives_identical_zips(
    checkout: Path, locked: WheelSet, tmp_path: Path
) -> None:
    first = build_zip(checkout, locked, tmp_path / "one")
    second = build_zip(checkout, locked, tmp_path / "two")
    assert first.name == second.name
    assert first.read_bytes() == second.read_bytes()


def test_changing_a_source_file_changes_the_zip_and_its_name(
    checkout: Path, locked: WheelSet, tmp_path: Path
) -> None:
    before = build_zip(checkout, locked, tmp_path)
    digest = sha256(before)
    (checkout / "lambdas" / "router.py").write_text("def handler(event, context):\n    return 1\n")
    after = build_zip(checkout, locked, tmp_path)
    assert after != before
    assert sha256(after) != digest
    with zipfile.ZipFile(after) as archive:
        assert archive.read("lambdas/router.py").endswith(b"return 1\n")


def test_an_unchanged_tree_reuses_its_zip_without_rewriting_it(
    checkout: Path, locked: WheelSet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = build_zip(checkout, locked, tmp_path)

    def no_rewrite(*args: Any) -> None:
        raise AssertionError("rebuilt an unchanged zip")

    monkeypatch.setattr(packaging, "write_zip", no_rewrite)
    assert build_zip(checkout, locked, tmp_path) == first


def test_only_tracked_files_of_the_packages_go_in(
    checkout: Path, locked: WheelSet, tmp_path: Path
) -> None:
    sources = source_tree(checkout, PACKAGES)
    assert sources.from_git
    assert sources.untracked == ("lambdas/scratch.py",)  # reported, so the program warns
    with zipfile.ZipFile(build_zip(checkout, locked, tmp_path)) as archive:
        names = archive.namelist()
    ours = {n for n in names if n.split("/")[0] in PACKAGES}
    assert ours == set(TRACKED) == set(sources.files)
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)


def test_outside_a_git_checkout_every_file_but_bytecode_is_used(checkout: Path) -> None:
    shutil.rmtree(checkout / ".git")
    sources = source_tree(checkout, PACKAGES)
    assert set(sources.files) == {*TRACKED, "lambdas/scratch.py"}
    assert sources.untracked == () and not sources.from_git


def test_zip_members_are_sorted_with_fixed_time_mode_and_deflated(
    checkout: Path, locked: WheelSet, tmp_path: Path
) -> None:
    with zipfile.ZipFile(build_zip(checkout, locked, tmp_path)) as archive:
        infos = archive.infolist()
        assert archive.testzip() is None  # every member's CRC checks out
    assert [i.filename for i in infos] == sorted(i.filename for i in infos)
    assert {i.date_time for i in infos} == {(1980, 1, 1, 0, 0, 0)}
    assert {i.external_attr >> 16 for i in infos} == {0o100644}
    assert {i.compress_type for i in infos} == {zipfile.ZIP_DEFLATED}


def test_zip_holds_the_packages_and_the_locked_dependencies_under_lambdas_limits(
    locked: WheelSet, tmp_path: Path
) -> None:
    zip_path = build_zip(REPO, locked, tmp_path)
    with zipfile.ZipFile(zip_path) as archive:
        names = set(archive.namelist())
    for module in ("lambdas/router.py", "lambdas/authorizer.py", "flstore_core/__init__.py"):
        assert module in names
    for package in (
        "aws_lambda_powertools",
        "cachetools",
        "jmespath",
        "numpy",
        "pydantic",
        "pydantic_core",
        "zstandard",
    ):
        assert f"{package}/__init__.py" in names
    assert "threadpoolctl.py" in names
    # numpy's compiled core, for the runtime's Python
    assert any(n.startswith("numpy/_core/_multiarray_umath.cpython-312-") for n in names)
    # The versions are the lock's.
    for pin in locked_requirements(packaging.ZIP_DEPENDENCIES, LOCK):
        name, version = pin.split("==")
        assert f"{name.replace('-', '_')}-{version}.dist-info/METADATA" in names
    assert not any(n.split("/")[0] in packaging.HEAVY_DISTRIBUTIONS for n in names)
    assert not any("__pycache__" in n or n.startswith((".venv/", "tests/")) for n in names)
    assert packaging.check_unzipped_size(zip_path) < packaging.MAX_UNZIPPED_BYTES
    assert zip_path.stat().st_size <= packaging.MAX_ZIP_BYTES  # uploaded with the function


def test_zip_size_is_checked_against_lambdas_limit(tmp_path: Path) -> None:
    zip_path = tmp_path / "a.zip"
    packaging.write_zip([("pkg/handler.py", b"x = 1\n" * 1000)], zip_path)
    assert packaging.check_unzipped_size(zip_path) == 6000
    with pytest.raises(packaging.PackageTooLargeError, match="unpacks to"):
        packaging.check_unzipped_size(zip_path, limit=6000)


def test_a_heavy_dependency_is_refused(checkout: Path, tmp_path: Path) -> None:
    sklearn = fake_wheel(
        tmp_path,
        "scikit_learn-1.9.1-cp312-cp312-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl",
        {"sklearn/__init__.py": ""},
    )
    with pytest.raises(packaging.PackageTooLargeError, match=r"must not ship \['scikit-learn'\]"):
        build_zip(checkout, WheelSet(tmp_path, "fake", (sklearn,)), tmp_path / "out")


def test_zip_size_is_checked_against_the_upload_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    zip_path = tmp_path / "a.zip"
    packaging.write_zip([("pkg/data.bin", bytes(range(256)) * 64)], zip_path)
    monkeypatch.setattr(packaging, "MAX_ZIP_BYTES", zip_path.stat().st_size - 1)
    with pytest.raises(packaging.PackageTooLargeError, match="takes zips of up to"):
        packaging.check_unzipped_size(zip_path)


def test_a_wheel_shipping_a_file_of_ours_is_refused(checkout: Path, tmp_path: Path) -> None:
    rogue = fake_wheel(tmp_path, "rogue-1.0-py3-none-any.whl", {"lambdas/router.py": "evil"})
    with pytest.raises(packaging.PackageTooLargeError, match="a file of ours"):
        build_zip(checkout, WheelSet(tmp_path, "fake", (rogue,)), tmp_path / "out")


# --- the wheels ------------------------------------------------------------------------------


def test_wheel_files_are_what_pip_would_put_on_the_path(tmp_path: Path) -> None:
    wheel = fake_wheel(
        tmp_path,
        "pkg-1.0-py3-none-any.whl",
        {
            "pkg/__init__.py": "",
            "pkg/__pycache__/__init__.cpython-312.pyc": "",
            "pkg-1.0.dist-info/METADATA": "Name: pkg\n",
            "pkg-1.0.data/purelib/extra.py": "",
            "pkg-1.0.data/scripts/pkg-tool": "#!python\n",
        },
    )
    names = {name for name, _ in wheel_cache.wheel_files(wheel)}
    assert names == {"pkg/__init__.py", "pkg-1.0.dist-info/METADATA", "extra.py"}


def test_wheels_are_cached_by_lock_and_target_and_not_downloaded_again(
    locked: WheelSet, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_network(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("pip ran although the wheels are cached")

    monkeypatch.setattr(subprocess, "run", no_network)
    again = locked_wheels(
        packaging.ZIP_DEPENDENCIES,
        LOCK,
        architecture="x86_64",
        cache_dir=locked.directory.parent,
    )
    assert again == locked
    pins = locked_requirements(packaging.ZIP_DEPENDENCIES, LOCK)
    lock = LOCK.read_bytes()
    assert locked.key == cache_key(pins, lock, architecture="x86_64") == locked.directory.name
    assert cache_key(pins, lock, architecture="arm64") != locked.key
    assert cache_key(pins, lock + b"cachetools==0.1\n", architecture="x86_64") != locked.key
    manifest = json.loads((locked.directory / wheel_cache.MANIFEST).read_text())
    assert manifest["lock_sha256"] == hashlib.sha256(lock).hexdigest()
    assert manifest["wheels"] == [w.name for w in locked.wheels]
    # Their own dependencies come along, pinned by the lock as a constraints file.
    assert {"aws-lambda-powertools", "cachetools", "jmespath", "pydantic"} <= locked.distributions()
    assert {"numpy", "threadpoolctl", "zstandard"} <= locked.distributions()
    assert not locked.distributions() & packaging.HEAVY_DISTRIBUTIONS


def test_every_locked_wheel_runs_on_the_lambda_runtime(locked: WheelSet) -> None:
    # pure Python, or CPython 3.12 (abi3 or cp312) on a manylinux tag glibc 2.34 loads
    accepted = set(target.platform_tags("x86_64"))
    for wheel in locked.wheels:
        _, _, python, abi, platforms = wheel.name.removesuffix(".whl").rsplit("-", 4)
        if platforms == "any":
            continue
        assert python in {"cp312", "cp37", "cp38", "cp39", "cp310", "cp311"}, wheel.name
        assert abi in {"cp312", "abi3"}, wheel.name
        assert set(platforms.split(".")) & accepted, wheel.name
    # numpy 2.3+ ships manylinux_2_27/2_28 wheels only: manylinux2014 alone finds none
    (numpy,) = (w for w in locked.wheels if w.name.startswith("numpy-"))
    assert "manylinux2014_x86_64" not in numpy.name


def test_platform_tags_are_the_runtimes_glibc_down_to_manylinux2014() -> None:
    tags = target.platform_tags("arm64")
    assert tags[0] == "manylinux_2_34_aarch64" == target.MANYLINUX["arm64"]
    assert {"manylinux_2_28_aarch64", "manylinux_2_17_aarch64"} <= set(tags)
    assert tags[-1] == "manylinux2014_aarch64"
    assert not any("2_35" in t or "x86_64" in t for t in tags)


def test_import_names_are_a_wheels_top_level_modules(tmp_path: Path) -> None:
    wheel = fake_wheel(
        tmp_path,
        "pkg-1.0-cp312-cp312-manylinux_2_28_x86_64.whl",
        {
            "pkg/__init__.py": "",
            "single.py": "",
            "_ext.cpython-312-x86_64-linux-gnu.so": "",
            "pkg.libs/libfoo.so": "",
            "pkg-1.0.dist-info/METADATA": "Name: pkg\n",
            "pkg-1.0.data/platlib/plat/__init__.py": "",
            "pkg-1.0.data/scripts/tool": "",
        },
    )
    assert wheel_cache.import_names(wheel) == {"pkg", "single", "_ext", "plat"}


# --- the image context -----------------------------------------------------------------------


def test_image_context_has_the_dockerfile_and_tracked_sources_only(tmp_path: Path) -> None:
    sources = source_tree(REPO, PACKAGES)
    context = packaging.stage_image_context(sources, out_dir=tmp_path)
    dockerfile = (context / "Dockerfile").read_text()
    assert "FROM public.ecr.aws/lambda/python:" in dockerfile
    assert 'CMD ["lambdas.cache_node.handler"]' in dockerfile
    assert (context / "pyproject.toml").read_bytes() == (REPO / "pyproject.toml").read_bytes()
    assert (context / "requirements.lock").read_bytes() == LOCK.read_bytes()
    assert (context / "README.md").read_bytes() == packaging.CONTEXT_README
    staged = {p.relative_to(context).as_posix() for p in context.rglob("*") if p.is_file()}
    assert staged == {*sources.files, "Dockerfile", "README.md", *packaging.CONTEXT_FILES}
    assert {(p.stat().st_mode & 0o777) for p in context.rglob("*") if p.is_file()} == {0o644}


def test_image_context_is_named_by_its_content(checkout: Path, tmp_path: Path) -> None:
    def stage() -> Path:
        return packaging.stage_image_context(source_tree(checkout, PACKAGES), out_dir=tmp_path)

    first = stage()
    assert stage() == first
    (checkout / "flstore_core" / "codec.py").write_text("def encode(x):\n    return 2 * x\n")
    changed = stage()
    assert changed != first
    assert (changed / "flstore_core" / "codec.py").read_text().endswith("2 * x\n")
    assert not (changed / "lambdas" / "scratch.py").exists()
