"""Build the Lambda artifacts ``pulumi up`` deploys.

    python -m infra.build [--out build] [--architecture x86_64|arm64]

writes ``build/lambda/router.zip`` (router + authorizer, checked < 250 MB unzipped) and
stages ``build/cache_node/`` (the cache-node image's Docker context, built by
``pulumi up``). Use the architecture of ``flstore:architecture``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from flstore_infra import packaging


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m infra.build", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=packaging.REPO_ROOT / "build",
        help="artifact directory (flstore:artifactDir); default: build/ in the repo",
    )
    parser.add_argument(
        "--architecture",
        choices=sorted(packaging.MANYLINUX),
        default="x86_64",
        help="Lambda architecture the wheels are chosen for (flstore:architecture)",
    )
    args = parser.parse_args(argv)
    out = args.out.resolve()
    try:
        zip_path = packaging.build_router_zip(out, architecture=args.architecture)
        size = packaging.unzipped_size(zip_path)
        context = packaging.stage_image_context(out)
    except (packaging.PackageTooLargeError, packaging.MissingArtifactError, ValueError) as exc:
        print(f"build failed: {exc}", file=sys.stderr)
        return 1
    limit = packaging.MAX_UNZIPPED_BYTES
    print(f"{zip_path}: {size / 2**20:.1f} MB unzipped (limit {limit / 2**20:.0f} MB)")
    print(f"{context}: cache-node image context (built and pushed by `pulumi up`)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
