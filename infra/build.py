"""Build the Lambda artifacts exactly as ``pulumi up`` does, and say where they are.

    python -m infra.build [--architecture x86_64|arm64] [--cache DIR]

``pulumi up`` needs no build step: the program builds (or finds, unchanged, in the build
cache) the router zip and the cache-node image context itself. This command runs the same
code, for looking at what would be deployed, checking the zip's size, or filling the wheel
cache ahead of an offline run. Use the architecture of ``flstore:architecture``.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from flstore_infra import packaging
from flstore_infra.target import MANYLINUX
from flstore_infra.wheels import WheelDownloadError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m infra.build", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--architecture",
        choices=sorted(MANYLINUX),
        default="x86_64",
        help="Lambda architecture the wheels are chosen for (flstore:architecture)",
    )
    parser.add_argument(
        "--cache",
        type=Path,
        default=None,
        help=f"build cache (default ${packaging.CACHE_ENV}, else ~/.cache/flstore)",
    )
    args = parser.parse_args(argv)
    try:
        built = packaging.build_artifacts(architecture=args.architecture, cache_dir=args.cache)
    except (packaging.PackageTooLargeError, FileNotFoundError, WheelDownloadError) as exc:
        print(f"build failed: {exc}", file=sys.stderr)
        return 1
    size = packaging.unzipped_size(built.router_zip)
    digest = hashlib.sha256(built.router_zip.read_bytes()).hexdigest()
    limit = packaging.MAX_UNZIPPED_BYTES
    print(f"{built.router_zip}: {size / 2**20:.1f} MB unzipped (limit {limit / 2**20:.0f} MB)")
    print(f"  sha256 {digest}")
    print(f"{built.cache_node_context}: cache-node image context (built by `pulumi up`)")
    if not built.from_git:
        print("not a git checkout: every file in the packages was taken", file=sys.stderr)
    for name in built.untracked:
        print(f"not tracked by git, not deployed: {name}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
