"""The Lambda runtime every artifact is built for: one Python, manylinux wheels per architecture.

Python 3.12, not the project's 3.11: the 3.11 Lambda base image is Amazon Linux 2 (glibc 2.26),
for which numpy, scipy, scikit-learn and torch publish no current wheels; 3.12 runs on Amazon
Linux 2023. The zip functions (router, authorizer) and the cache-node image use the same one.
"""

from __future__ import annotations

LAMBDA_PYTHON = "3.12"
LAMBDA_RUNTIME = "python" + LAMBDA_PYTHON
# The wheel platform tag pip downloads for, by ``flstore:architecture``.
MANYLINUX = {"x86_64": "manylinux2014_x86_64", "arm64": "manylinux2014_aarch64"}
