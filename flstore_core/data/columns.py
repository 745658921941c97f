"""Which columns of a round's rows a direction- or distance-based computation reads.

A row is the whole state dict (ARCHITECTURE §2), but cosines, Gram matrices, Krum, clustering,
FLTrust trust, CFL, peer similarity and the ingest summaries are defined on the model's
*trainable parameters* — FLTrust (Cao et al. 2021), CFL's authors' code (Sattler et al. 2020)
and Krum (Blanchard et al. 2017) all work on ``model.parameters()``. A BatchNorm counter
(``num_batches_tracked``, an integer that grows by one per batch) appended to every row makes
every cosine ≈ 1 and dominates every distance; running statistics (``running_mean``,
``running_var``) are data statistics, not learned weights. So the columns are split in three:

* **parameters** — the floating-point trainable parameters: always read;
* **buffers** — floating-point non-trainable tensors (BatchNorm's running statistics): read
  only when a workload's ``include_buffers`` param is true;
* integer tensors — never read by these computations.

Where the split comes from:

1. When the job declares a registry model, ``flstore job create`` records the names of its
   ``named_parameters()`` in ``job.json`` (:attr:`JobSpec.parameters`); a float tensor is a
   parameter exactly when its name is in that list, a buffer otherwise. Cache nodes apply it
   without torch.
2. Otherwise (no model, an old ``job.json`` without the list, or a list that names none of the
   round's tensors), by names and dtypes: every float tensor is a parameter, except names
   ending in ``running_mean`` or ``running_var`` (buffers) and ``num_batches_tracked``
   (never read, even if stored as floats).

Aggregates (fedavg, trimmed_mean, multi_krum, fltrust, personalize) are not affected: they still
return every tensor (see each workload's docstring for how buffers are aggregated).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

from flstore_core.data.codec import TensorSpec, np_dtype, slices_of
from flstore_core.data.manifest import JobSpec

BUFFER_SUFFIXES = ("running_mean", "running_var")
NEVER_SUFFIXES = ("num_batches_tracked",)

Runs = tuple[tuple[int, int], ...]


def is_float(spec: TensorSpec) -> bool:
    """Whether a tensor is floating point in its source (BF16 and F16 count)."""
    return spec.dtype == "BF16" or np_dtype(spec.dtype).kind == "f"


@dataclass(frozen=True)
class ColumnSplit:
    """The tensors of a round's rows by role: indices into the specs, and column runs.

    ``parameter_runs`` / ``buffer_runs`` are maximal contiguous ``[a, b)`` column ranges of the
    flattened row (adjacent tensors merged), so a computation over them is a few strided BLAS
    calls, never a gather copy of the matrix.
    """

    parameters: tuple[int, ...]
    buffers: tuple[int, ...]
    parameter_runs: Runs
    buffer_runs: Runs
    source: str  # "model" (recorded from the registry model) or "names" (the name/dtype rule)

    def tensors(self, include_buffers: bool = False) -> tuple[int, ...]:
        """Indices (in spec order) of the tensors read."""
        if not include_buffers:
            return self.parameters
        return tuple(sorted(self.parameters + self.buffers))

    def runs(self, include_buffers: bool = False) -> Runs:
        """Column runs read (parameters, plus buffers when ``include_buffers``)."""
        if not include_buffers:
            return self.parameter_runs
        return merge_runs(sorted(self.parameter_runs + self.buffer_runs))

    def width(self, include_buffers: bool = False) -> int:
        """Number of columns read."""
        return sum(b - a for a, b in self.runs(include_buffers))


def merge_runs(ranges: Sequence[tuple[int, int]]) -> Runs:
    """Sorted ``[a, b)`` ranges with touching neighbours merged; empty ranges dropped."""
    out: list[tuple[int, int]] = []
    for a, b in ranges:
        if b <= a:
            continue
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return tuple(out)


def split_columns(
    specs: Sequence[TensorSpec], parameter_names: Collection[str] | None = None
) -> ColumnSplit:
    """Split a round's tensors into parameters and buffers (module docstring has the rule)."""
    names = set(parameter_names) if parameter_names is not None else None
    if names is not None and not any(s.name in names for s in specs):
        names = None  # the recorded list does not describe these rows: fall back to the rule
    params: list[int] = []
    buffers: list[int] = []
    for i, spec in enumerate(specs):
        if not is_float(spec):
            continue
        if names is not None:
            (params if spec.name in names else buffers).append(i)
        elif spec.name.endswith(NEVER_SUFFIXES):
            continue
        elif spec.name.endswith(BUFFER_SUFFIXES):
            buffers.append(i)
        else:
            params.append(i)
    ranges = slices_of(specs)
    return ColumnSplit(
        parameters=tuple(params),
        buffers=tuple(buffers),
        parameter_runs=merge_runs([ranges[i] for i in params]),
        buffer_runs=merge_runs([ranges[i] for i in buffers]),
        source="names" if names is None else "model",
    )


def job_columns(specs: Sequence[TensorSpec], job: JobSpec | None) -> ColumnSplit:
    """The split of a job's rows: by the parameter names its ``job.json`` recorded, else by the
    name/dtype rule (``job`` None or without a list).

    The one entry point for every layer that scores a round — the cache node's Gram
    (``RoundData.columns``), ingestion's and backfill's summaries, the Flower sink — so
    ``cos_to_mean`` in a manifest and ``cosine_select``'s score read the same columns.
    """
    return split_columns(specs, job.parameters if job is not None else None)
