"""A client generated from the OpenAPI document is clean and typed: openapi-python-client turns
the document into a package that mypy accepts, with one class per workload's request and
params, so a typed caller cannot put one workload's params in another's request, and the error
answer's class does not clash with its own ``error`` field.

The generator and mypy run as processes (the document itself needs no stack). Two errors mypy
finds in any client this generator version writes are not the document's and are left out,
each matched exactly: its ``client.py`` template forwards ``__exit__(*args: object)`` to
httpx's typed ``__exit__``, and an optional request body that is a union of models is
serialised without first checking it was given (``Unset`` has no ``to_dict``).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from flstore_core.routing.request_body import parse_body
from flstore_core.workloads import catalogue, get
from lambdas.router import app, openapi_document

BIN = Path(sys.executable).parent
GENERATOR = shutil.which("openapi-python-client", path=str(BIN)) or shutil.which(
    "openapi-python-client"
)
PACKAGE = "flstore_api_client"
NO_META = ("--meta", "none")  # the package alone, no pyproject of its own
RUN_MODULE = "api/workloads/run_v1_jobs_job_workloads_name_post.py"
# the generator's own defects (module docstring), whatever the document
NOT_THE_DOCUMENTS = (
    re.compile(rf"^{PACKAGE}/client\.py:\d+: error: Argument 1 to \"__a?exit__\""),
    re.compile(
        rf"^{PACKAGE}/{RUN_MODULE}:\d+: error: Item \"Unset\" of \"\w+Request \| Unset\" has no "
        r"attribute \"to_dict\"  \[union-attr\]$"
    ),
)

pytestmark = pytest.mark.skipif(
    GENERATOR is None,
    reason="openapi-python-client is not installed (the dev extra of pyproject.toml has it)",
)


def _mypy(cwd: Path, *targets: str) -> list[str]:
    """mypy's error lines for ``targets``, run in ``cwd`` with its defaults (no project
    config: a generated client is checked as its users would check it)."""
    out = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-incremental", "--config-file", "", *targets],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return [line for line in out.stdout.splitlines() if ": error:" in line]


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The client generated from the document, in a fresh directory."""
    root = tmp_path_factory.mktemp("client")
    (root / "openapi.json").write_text(json.dumps(openapi_document(app)))
    assert GENERATOR is not None
    # the generator formats its output with ruff when ruff is on the PATH (the venv's is)
    env = {"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(root)}
    done = subprocess.run(
        [GENERATOR, "generate", "--path", "openapi.json", "--output-path", PACKAGE, *NO_META],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Warning" not in done.stdout + done.stderr, done.stdout + done.stderr
    return root


def _class_name(workload: str, suffix: str) -> str:
    return "".join(part.capitalize() for part in workload.split("_")) + suffix


def test_the_generated_client_type_checks(generated: Path) -> None:
    errors = _mypy(generated, PACKAGE)
    theirs = [e for e in errors if any(p.match(e) for p in NOT_THE_DOCUMENTS)]
    ours = [e for e in errors if e not in theirs]
    assert ours == [], "\n".join(ours)


def test_each_workload_has_its_own_typed_request_and_params(generated: Path) -> None:
    models = (generated / PACKAGE / "models" / "__init__.py").read_text()
    for entry in catalogue():
        for suffix in ("Request", "Params"):
            assert f'"{_class_name(entry["name"], suffix)}"' in models, (entry["name"], suffix)
    assert '"ErrorResponse"' in models and '"ErrorBody"' in models
    assert '"Error"' not in models
    run = (generated / PACKAGE / RUN_MODULE).read_text()
    for entry in catalogue():
        assert _class_name(entry["name"], "Request") in run, entry["name"]


def test_a_typed_caller_cannot_mix_one_workloads_params_into_anothers(generated: Path) -> None:
    (generated / "use.py").write_text(
        f"from {PACKAGE}.models import FedavgRequest, KrumParams, OortSelectParams\n"
        f"from {PACKAGE}.models import OortSelectRequest\n"
        "ok = OortSelectRequest(rounds=[0, 2], params=OortSelectParams(k=2))\n"
        "fed = FedavgRequest(round_=0)\n"
        "mixed = FedavgRequest(round_=0, params=KrumParams(f=1))\n"
    )
    errors = [e for e in _mypy(generated, "use.py") if e.startswith("use.py:")]
    assert len(errors) == 1 and errors[0].startswith("use.py:5:"), errors
    assert "KrumParams" in errors[0]
    # and the classes serialise to the body the router takes
    sys.path.insert(0, str(generated))
    try:
        from flstore_api_client.models import (
            FedavgRequest,
            OortSelectParams,
            OortSelectRequest,
        )
    finally:
        sys.path.remove(str(generated))
    body = OortSelectRequest(rounds=[0, 2], params=OortSelectParams(k=2)).to_dict()
    # with the params' defaults filled in: what the router fills in for a param not sent
    assert parse_body(json.dumps(body)) == body and body["rounds"] == [0, 2]
    oort = get("oort_select")
    assert oort.validate(body["params"]) == oort.validate({"k": 2})
    assert FedavgRequest(round_=0).to_dict() == {"round": 0}
