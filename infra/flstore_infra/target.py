"""The Lambda runtime every artifact is built for: one Python, manylinux wheels per architecture.

Python 3.12, not the project's 3.11: the 3.11 Lambda base image is Amazon Linux 2 (glibc 2.26),
for which numpy, scipy, scikit-learn and torch publish no current wheels; 3.12 runs on Amazon
Linux 2023 (glibc 2.34). The zip functions (router, authorizer) and the cache-node image use the
same one.

The zip's wheels are downloaded for every manylinux tag that glibc 2.34 runs, newest first
(``platform_tags``): pip takes a wheel only if one of its tags is among those asked for, and
does not widen ``manylinux_2_28`` to older tags itself. numpy 2.3+ publishes only
``manylinux_2_27/2_28`` wheels, zstandard and pydantic-core ``manylinux2014`` (2.17) ones.
"""

from __future__ import annotations

LAMBDA_PYTHON = "3.12"
LAMBDA_RUNTIME = "python" + LAMBDA_PYTHON
# Amazon Linux 2023's glibc: the newest manylinux_2_x the runtime's interpreter loads.
LAMBDA_GLIBC = (2, 34)
# The oldest manylinux tag asked for (manylinux2014 is manylinux_2_17).
_OLDEST_GLIBC_MINOR = 17
# The wheel platform tag (newest accepted) by ``flstore:architecture``; names the wheel cache.
MANYLINUX = {
    "x86_64": f"manylinux_2_{LAMBDA_GLIBC[1]}_x86_64",
    "arm64": f"manylinux_2_{LAMBDA_GLIBC[1]}_aarch64",
}


def platform_tags(architecture: str) -> list[str]:
    """Every manylinux tag the runtime loads on ``architecture``, newest first, for pip's
    ``--platform`` (``manylinux_2_34`` … ``manylinux_2_17``, then the legacy ``manylinux2014``
    spelling that older wheels carry alone)."""
    machine = MANYLINUX[architecture].split("_", 3)[3]
    minors = range(LAMBDA_GLIBC[1], _OLDEST_GLIBC_MINOR - 1, -1)
    return [f"manylinux_2_{m}_{machine}" for m in minors] + [f"manylinux2014_{machine}"]
