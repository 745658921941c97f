"""A job's models and data outside its rounds: the initial model (before round 0), the global
model after each round, and the server-side validation set — each one safetensors object,
encoded like an update in the job's storage precision and verified when read back.

Past answers are computed from these, so they are final (ARCHITECTURE §2): the initial model and
each round's global model are written once, by a conditional create (storing the same model
again succeeds, another one is a :class:`~flstore_core.errors.ConflictError`); the validation set
of a job with committed rounds is changed only when forced.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from flstore_core.data import layout
from flstore_core.data.codec import CodecLimits, Update, describe_frames, encode_update
from flstore_core.errors import NotFoundError, StoredObjectCorruptError, ValidationError
from flstore_core.storage import catalog
from flstore_core.storage.counted import CountedBlobs, sha256_of
from flstore_core.storage.jobs import JobSpecs
from flstore_core.storage.verified import decode_stored


def base_key(job: str, round_: int) -> str:
    """The key of the model a round's clients started from (ARCHITECTURE §2): the global
    model after the round before, or the initial model at round 0."""
    return layout.global_key(job, round_ - 1) if round_ > 0 else layout.initial_key(job)


class StoredModels:
    """The initial and global models and the validation set of a store's jobs."""

    def __init__(self, io: CountedBlobs, jobs: JobSpecs, limits: CodecLimits) -> None:
        self.io = io
        self.jobs = jobs
        self.limits = limits

    def _read(self, key: str, what: str) -> Update:
        return decode_stored(self.io.get(key, what), key, self.limits)

    def _create(self, key: str, data: bytes, what: str) -> None:
        """Write a model once: the same model again is a no-op, another a ConflictError."""
        self.io.create(key, data, what, digest=self._content_digest)

    def _content_digest(self, data: bytes) -> str:
        """The SHA-256 of a stored model's uncompressed bytes, so that the same model compressed
        by another build (another zstd) is still the same model."""
        raw, _, _ = describe_frames(data, self.limits)
        return sha256_of(raw)

    def put_global(self, job: str, round_: int, update: Update) -> str:
        """Store the aggregated model after ``round_``, once; returns its key."""
        spec = self.jobs.ensure(job)
        update.job, update.round, update.client, update.kind = job, round_, None, "global"
        key = layout.global_key(job, round_)
        what = f"the global model of round {round_} of job {job!r}"
        self._create(key, encode_update(update, spec.precision).data, what)
        return key

    def get_global(self, job: str, round_: int) -> Update:
        """The aggregated model after ``round_``."""
        return self._read(layout.global_key(job, round_), f"global model of round {round_}")

    def put_initial(self, job: str, update: Update) -> str:
        """Store the job's model before round 0, once; returns its key."""
        spec = self.jobs.ensure(job)
        update.job, update.round, update.client, update.kind = job, None, None, "initial"
        key = layout.initial_key(job)
        what = f"the initial model of job {job!r}"
        self._create(key, encode_update(update, spec.precision).data, what)
        return key

    def get_initial(self, job: str) -> Update:
        """The job's model before round 0."""
        return self._read(layout.initial_key(job), f"initial model of job {job!r}")

    def get_base(self, job: str, round_: int) -> Update | None:
        """The model a round's clients started from (ARCHITECTURE §2), or ``None`` if unknown."""
        try:
            return self.get_global(job, round_ - 1) if round_ > 0 else self.get_initial(job)
        except NotFoundError:
            return None

    def put_validation_set(
        self,
        job: str,
        x: npt.NDArray[np.floating[Any]],
        y: npt.NDArray[np.integer[Any]],
        *,
        force: bool = False,
    ) -> str:
        """Store the server-side validation set (``x`` float32, ``y`` int64). Once the job has
        committed rounds, another set than the stored one is a ConflictError unless ``force``
        (model answers of past rounds were computed on it)."""
        x = np.asarray(x, dtype=np.float32)
        y = np.asarray(y, dtype=np.int64)
        if x.ndim < 1 or y.ndim != 1 or len(x) != len(y) or len(y) == 0:
            raise ValidationError(
                f"validation set needs x of shape (n, ...) and y of shape (n,), got "
                f"{list(x.shape)} and {list(y.shape)}"
            )
        self.jobs.ensure(job)
        key = layout.validation_key(job)
        encoded = encode_update(
            Update({"x": x, "y": y}, num_examples=len(y), job=job, kind="initial")
        )
        if force or not catalog.manifest_versions(self.io.blobs, job):
            self.io.put(key, encoded.data)
        else:
            what = f"the validation set of job {job!r} (it has committed rounds; force to change)"
            self._create(key, encoded.data, what)
        return key

    def get_validation_set(self, job: str) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        """The server-side validation set ``(x, y)``."""
        update = self._read(layout.validation_key(job), f"validation set of job {job!r}")
        if set(update.tensors) != {"x", "y"}:
            raise StoredObjectCorruptError("validation set must hold exactly 'x' and 'y'")
        return (
            np.asarray(update.tensors["x"], dtype=np.float32),
            np.asarray(update.tensors["y"], dtype=np.int64),
        )
