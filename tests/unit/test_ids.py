"""Ids are validated before any I/O, exactly as ARCHITECTURE §2 states."""

from __future__ import annotations

import pytest

from flstore_core.data import layout
from flstore_core.errors import InvalidIdError, ValidationError
from flstore_core.ids import parse_round, validate_client, validate_job, validate_round


@pytest.mark.parametrize("job", ["a", "demo", "job-1", "0abc", "a" * 63])
def test_valid_job_ids_pass(job: str) -> None:
    assert validate_job(job) == job


@pytest.mark.parametrize(
    "job", ["", "../x", "..", "-a", "A", "a_b", "a" * 64, "a" * 200, "jöb", "a/b", None, 3]
)
def test_invalid_job_ids_are_rejected(job: object) -> None:
    with pytest.raises(InvalidIdError) as err:
        validate_job(job)
    assert err.value.status == 400
    assert "job id" in err.value.message


@pytest.mark.parametrize("client", ["c1", "Client_9", "a.b-c", ".hidden", "x" * 128, "..."])
def test_valid_client_ids_pass(client: str) -> None:
    assert validate_client(client) == client


@pytest.mark.parametrize(
    "client", ["", ".", "..", "../x", "a/b", "x" * 129, "x" * 200, "clïent", "a b", None]
)
def test_invalid_client_ids_are_rejected(client: object) -> None:
    with pytest.raises(InvalidIdError):
        validate_client(client)


@pytest.mark.parametrize("round_", [-1, 1.0, "1", True, None, 10**9])
def test_invalid_rounds_are_rejected(round_: object) -> None:
    with pytest.raises(InvalidIdError):
        validate_round(round_)


@pytest.mark.parametrize("text", ["-1", "1.5", "", "١", "abc", "123456789"])
def test_round_text_must_be_plain_digits(text: str) -> None:
    with pytest.raises(InvalidIdError):
        parse_round(text)


def test_invalid_id_is_a_validation_error() -> None:
    assert issubclass(InvalidIdError, ValidationError)


def test_layout_keys_follow_the_contract() -> None:
    assert layout.job_spec_key("j") == "jobs/j/job.json"
    assert layout.update_key("j", 3, "c.1") == "jobs/j/rounds/00000003/updates/c.1.safetensors.zst"
    assert layout.manifest_key("j", 12) == "jobs/j/rounds/00000012/manifest.json"
    assert layout.global_key("j", 7) == "jobs/j/global/00000007.safetensors.zst"
    assert layout.initial_key("j") == "jobs/j/global/initial.safetensors.zst"
    assert layout.validation_key("j") == "jobs/j/validation.safetensors.zst"
    assert layout.results_prefix("j", "fedavg", 2) == "jobs/j/results/fedavg/00000002/"


def test_layout_refuses_bad_ids_before_building_a_key() -> None:
    with pytest.raises(InvalidIdError):
        layout.update_key("j", 0, "../../etc")
    with pytest.raises(InvalidIdError):
        layout.manifest_key("../j", 0)


def test_layout_parses_its_own_keys() -> None:
    key = layout.update_key("j", 5, "c7")
    assert layout.parse_round_from_key("j", key) == 5
    assert layout.parse_client_from_update_key(key) == "c7"
    assert layout.parse_client_from_update_key(layout.manifest_key("j", 5)) is None
