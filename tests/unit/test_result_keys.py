"""Result keys are a job's own ``jobs/{job}/results/…`` and nothing else: the same prefix IAM
grants the functions (docs/security.md), so a key with ``results/`` deeper in a job's tree —
inside a round's updates, say — is never written as a result."""

from __future__ import annotations

import pytest

from flstore_core.errors import ValidationError
from flstore_core.storage.results import check_result_key


@pytest.mark.parametrize(
    "key", ["jobs/a/results/fedavg/00000001/model.safetensors.zst", "jobs/j-1/results/x"]
)
def test_a_key_under_the_jobs_results_prefix_is_a_result_key(key: str) -> None:
    check_result_key(key)


@pytest.mark.parametrize(
    "key",
    [
        "jobs/a/rounds/00000001/updates/results/x",  # results/ below a round: an update's place
        "jobs/a/global/results/x",
        "jobs/results/x",
        "jobs/a/results/",
        "other/a/results/x",
        "jobs/../results/x",
        "jobs/A B/results/x",
    ],
)
def test_any_other_key_is_refused(key: str) -> None:
    with pytest.raises(ValidationError):
        check_result_key(key)
