"""Canonical S3 keys of FLStore (ARCHITECTURE §2); pure functions, one per kind of object.

Everything of a job lives under ``jobs/{job}/``; rounds are zero-padded to eight digits so that
a lexicographic listing is in round order.
"""

from __future__ import annotations

from flstore_core.ids import validate_client, validate_job, validate_round

UPDATE_SUFFIX = ".safetensors.zst"
# what a listing of a job's rounds is delimited by: every round's update objects roll up into
# one common prefix, so the listing names the manifests without the updates
UPDATES_DELIMITER = "/updates/"


def job_prefix(job: str) -> str:
    """``jobs/{job}/``: the prefix of everything of a job."""
    return f"jobs/{validate_job(job)}/"


def job_spec_key(job: str) -> str:
    """``jobs/{job}/job.json``: the job spec."""
    return job_prefix(job) + "job.json"


def rounds_prefix(job: str) -> str:
    """``jobs/{job}/rounds/``: the prefix of every round."""
    return job_prefix(job) + "rounds/"


def round_prefix(job: str, round_: int) -> str:
    """``jobs/{job}/rounds/{round:08d}/``."""
    return f"{rounds_prefix(job)}{validate_round(round_):08d}/"


def updates_prefix(job: str, round_: int) -> str:
    """``jobs/{job}/rounds/{round:08d}/updates/``."""
    return round_prefix(job, round_) + "updates/"


def update_key(job: str, round_: int, client: str) -> str:
    """``jobs/{job}/rounds/{round:08d}/updates/{client}.safetensors.zst``."""
    return updates_prefix(job, round_) + validate_client(client) + UPDATE_SUFFIX


def meta_rows_key(job: str) -> str:
    """``jobs/{job}/meta/rows.zst``: the job's meta rows as one object, derived from the
    manifests (:mod:`flstore_core.cache.meta_snapshot`)."""
    return job_prefix(job) + "meta/rows.zst"


def manifest_key(job: str, round_: int) -> str:
    """``jobs/{job}/rounds/{round:08d}/manifest.json``: makes the round visible."""
    return round_prefix(job, round_) + "manifest.json"


def global_key(job: str, round_: int) -> str:
    """``jobs/{job}/global/{round:08d}.safetensors.zst``: the aggregated model after a round."""
    return f"{job_prefix(job)}global/{validate_round(round_):08d}{UPDATE_SUFFIX}"


def initial_key(job: str) -> str:
    """``jobs/{job}/global/initial.safetensors.zst``: the model before round 0."""
    return f"{job_prefix(job)}global/initial{UPDATE_SUFFIX}"


def validation_key(job: str) -> str:
    """``jobs/{job}/validation.safetensors.zst``: the server-side validation set."""
    return job_prefix(job) + "validation" + UPDATE_SUFFIX


def results_prefix(job: str, workload: str, round_: int) -> str:
    """``jobs/{job}/results/{workload}/{round:08d}/``: results too large to return inline."""
    return f"{job_prefix(job)}results/{workload}/{validate_round(round_):08d}/"


def parse_round_from_key(job: str, key: str) -> int | None:
    """The round of a key under ``jobs/{job}/rounds/``, or ``None`` if it is not one."""
    prefix = rounds_prefix(job)
    if not key.startswith(prefix):
        return None
    part = key[len(prefix) :].split("/", 1)[0]
    return int(part) if len(part) == 8 and part.isdigit() else None


def parse_client_from_update_key(key: str) -> str | None:
    """The client id of an update key, or ``None`` if the key is not an update."""
    name = key.rsplit("/", 1)[-1]
    if "/updates/" not in key or not name.endswith(UPDATE_SUFFIX):
        return None
    return name[: -len(UPDATE_SUFFIX)]
