"""The cache node's wire protocol: one frozen dataclass per operation a node answers.

The router, the benchmarks and the node speak the same JSON events (ARCHITECTURE §3); this
module is where their shape is written once. Each operation is a dataclass whose
:meth:`to_event` builds exactly the dict the router sends (same keys, an optional key left out
when unset), and whose ``from_event`` checks what the node used to check by hand, raising one
typed error, :class:`MalformedEventError` (HTTP 400, code ``invalid_request``: the answer the
node gave a malformed event before this module), that names the op and the field.
:func:`parse_event` dispatches on ``"op"``.

What the protocol checks is the event's shape and its ids (a bad job or round keeps its own
:class:`~flstore_core.errors.InvalidIdError`, as the node answered it before); what needs the
node's state or the workload registry (a workload's name and parameters, a shard key, a row
index against the round's manifest) is checked by the node's handler.

Operations: ``load``, ``artifacts`` (compute shares or adopt rounds), ``run``, ``partial``,
``model_part``, ``run_clients``, ``stage`` (an update before its round's commit), ``stats``,
``evict`` (shards or all), ``ping``. Prefetch is the router's sequence of ``load`` and
``artifacts``, not an operation of its own.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Self

from flstore_core.errors import ValidationError
from flstore_core.ids import validate_client, validate_job, validate_round


class MalformedEventError(ValidationError):
    """A cache-node event of the wrong shape: an unknown op, a missing field, a field of the
    wrong type (HTTP 400, code ``invalid_request``). ``op`` and ``field`` name what was
    wrong (``None`` when it is the event itself)."""

    def __init__(self, message: str, *, op: str | None = None, field: str | None = None) -> None:
        super().__init__(message)
        self.op = op
        self.field = field


def _check(ok: bool, op: str, field: str, message: str) -> None:
    if not ok:
        raise MalformedEventError(message, op=op, field=field)


def _is_int(value: Any) -> bool:
    """An int that is not a bool (JSON ``true`` is not a block number)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


@dataclass(frozen=True)
class LoadOp:
    """``{"op": "load", "shards": [...], "models": [...]}``: fetch shards now; the round
    shards in ``models`` also get their default aggregate models written."""

    op: ClassVar[str] = "load"
    shards: tuple[str, ...]
    models: tuple[str, ...] | None = None

    def to_event(self) -> dict[str, Any]:
        """The event the router sends."""
        event: dict[str, Any] = {"op": self.op, "shards": list(self.shards)}
        if self.models is not None:
            event["models"] = list(self.models)
        return event

    @classmethod
    def from_event(cls, event: Mapping[str, Any]) -> Self:
        """The op of ``event``; :class:`MalformedEventError` when it is malformed."""
        shards: Any = event.get("shards")
        models: Any = event.get("models")
        _check(_str_list(shards), "load", "shards", "load needs 'shards': a list of shard keys")
        _check(
            models is None or _str_list(models),
            "load",
            "models",
            "load's 'models' must be a list of shard keys",
        )
        return cls(tuple(shards), None if models is None else tuple(models))


@dataclass(frozen=True)
class ArtifactsOp:
    """``{"op": "artifacts", "compute": {shard: [share, shares]}}``: this node's share of held
    rounds' model artifacts; ``{"op": "artifacts", "rounds": {shard: {"content",
    "entries"}}}``: keep those another replica computed. An event may carry both.
    ``budget_s`` (with ``compute``): start no task after that many seconds — one bounded chunk
    of the share, the rest answered ``deferred`` for a later invocation (the node's own
    ``FLSTORE_ARTIFACTS_BUDGET_S`` when absent); a third number, ``[share, shares, start]``,
    skips the share's first ``start`` tasks (those earlier chunks did)."""

    op: ClassVar[str] = "artifacts"
    compute: Mapping[str, tuple[int, ...]] | None = None
    rounds: Mapping[str, Mapping[str, Any]] | None = None
    budget_s: float | None = None

    def to_event(self) -> dict[str, Any]:
        """The event the router sends."""
        event: dict[str, Any] = {"op": self.op}
        if self.compute is not None:
            event["compute"] = {k: list(v) for k, v in self.compute.items()}
        if self.rounds is not None:
            event["rounds"] = dict(self.rounds)
        if self.budget_s is not None:
            event["budget_s"] = self.budget_s
        return event

    @classmethod
    def from_event(cls, event: Mapping[str, Any]) -> Self:
        """The op of ``event``; :class:`MalformedEventError` when it is malformed."""
        compute, rounds = event.get("compute"), event.get("rounds")
        _check(
            compute is not None or rounds is not None,
            "artifacts",
            "compute",
            "artifacts needs 'compute' (shard -> [share, shares]) or 'rounds' "
            "(shard -> {content, entries})",
        )
        _check(
            compute is None
            or (
                isinstance(compute, dict)
                and all(
                    isinstance(v, list)
                    and len(v) in (2, 3)
                    and all(_is_int(i) for i in v)
                    and 0 <= v[0] < v[1]
                    and (len(v) == 2 or v[2] >= 0)
                    for v in compute.values()
                )
            ),
            "artifacts",
            "compute",
            "artifacts' 'compute' must map round shard keys to [share, shares] (or [share, "
            "shares, start]) with 0 <= share < shares and start >= 0",
        )
        _check(
            rounds is None or isinstance(rounds, dict),
            "artifacts",
            "rounds",
            "artifacts' 'rounds' must map shard keys to {content, entries}",
        )
        for text, item in (rounds or {}).items():
            _check(
                isinstance(item, dict),
                "artifacts",
                "rounds",
                f"artifacts of {text!r} must be {{'content', 'entries'}}",
            )
        budget = event.get("budget_s")
        _check(
            budget is None
            or (isinstance(budget, int | float) and not isinstance(budget, bool) and budget > 0),
            "artifacts",
            "budget_s",
            "artifacts' 'budget_s' must be a positive number of seconds",
        )
        shares = None if compute is None else {k: tuple(v) for k, v in compute.items()}
        return cls(shares, rounds, None if budget is None else float(budget))


def _clients(value: Any) -> tuple[str, ...] | None:
    _check(
        value is None or isinstance(value, list),
        "run",
        "clients",
        "a client-class run's 'clients' must be a list of client ids",
    )
    return None if value is None else tuple(validate_client(c) for c in value)


def _rounds(value: Any) -> tuple[int, ...] | None:
    _check(
        value is None or isinstance(value, list),
        "run",
        "rounds",
        "'rounds' must be a list of round numbers",
    )
    return None if value is None else tuple(validate_round(r) for r in value)


@dataclass(frozen=True)
class RunOp:
    """``{"op": "run", "workload", "job", "round" | "rounds", "params"}``: run a workload on
    the cached data (``round`` for a round workload; ``rounds``, and ``clients``, for one
    that spans rounds). The workload's name and parameters are checked by the node."""

    op: ClassVar[str] = "run"
    workload: str
    job: str
    params: Mapping[str, Any] | None = None
    round: int | None = None
    rounds: tuple[int, ...] | None = None
    clients: tuple[str, ...] | None = None

    def to_event(self) -> dict[str, Any]:
        """The event the router sends."""
        event: dict[str, Any] = {"op": self.op, "workload": self.workload, "job": self.job}
        if self.params is not None:
            event["params"] = self.params
        if self.round is not None:
            event["round"] = self.round
        if self.rounds is not None:
            event["rounds"] = list(self.rounds)
        if self.clients is not None:
            event["clients"] = list(self.clients)
        return event

    @classmethod
    def from_event(cls, event: Mapping[str, Any]) -> Self:
        """The op of ``event``; :class:`MalformedEventError` when it is malformed (a bad id:
        :class:`~flstore_core.errors.InvalidIdError`)."""
        workload, params, round_ = (
            event.get("workload", ""),
            event.get("params"),
            event.get("round"),
        )
        _check(isinstance(workload, str), "run", "workload", "run's 'workload' must be a name")
        _check(
            params is None or isinstance(params, dict),
            "run",
            "params",
            "run's 'params' must be an object",
        )
        # an empty list of clients asks for every client, as no list does
        clients = _clients(event.get("clients") or None)
        return cls(
            workload,
            validate_job(event.get("job")),
            params,
            None if round_ is None else validate_round(round_),
            _rounds(event.get("rounds")),
            clients,
        )


def _block_fields(op: str, event: Mapping[str, Any]) -> tuple[str, int, tuple[int, ...], int]:
    """``job``, ``round``, ``indices`` (or one ``block``) and ``blocks`` of a block op."""
    job = validate_job(event.get("job"))
    round_ = validate_round(event.get("round"))
    indices: Any = event.get("indices")
    blocks: Any = event.get("blocks")
    if indices is None and "block" in event:
        indices = [event.get("block")]
    _check(
        isinstance(indices, list)
        and bool(indices)
        and all(_is_int(i) for i in indices)
        and _is_int(blocks),
        op,
        "indices",
        "a block op needs 'blocks' (the round's block count) and 'indices' (a non-empty "
        "list of block numbers) or 'block'",
    )
    return job, round_, tuple(indices), blocks


@dataclass(frozen=True)
class PartialOp:
    """``{"op": "partial", "job", "round", "indices", "blocks", "buffers"}``: the Gram pieces
    of column blocks of a sharded round (of its buffers' columns with ``buffers``)."""

    op: ClassVar[str] = "partial"
    job: str
    round: int
    indices: tuple[int, ...]
    blocks: int
    buffers: bool = False

    def to_event(self) -> dict[str, Any]:
        """The event the router sends."""
        return {
            "op": self.op,
            "job": self.job,
            "round": self.round,
            "indices": list(self.indices),
            "blocks": self.blocks,
            "buffers": self.buffers,
        }

    @classmethod
    def from_event(cls, event: Mapping[str, Any]) -> Self:
        """The op of ``event``; :class:`MalformedEventError` when it is malformed."""
        job, round_, indices, blocks = _block_fields("partial", event)
        return cls(job, round_, indices, blocks, bool(event.get("buffers")))


@dataclass(frozen=True)
class ModelPartOp:
    """``{"op": "model_part", "job", "round", "indices", "blocks", "expr", "part_keys",
    "metadata"}``: blocks of a model result, each written as one zstd frame to its part key
    (block 0, which carries the safetensors header, needs the result's ``metadata``)."""

    op: ClassVar[str] = "model_part"
    job: str
    round: int
    indices: tuple[int, ...]
    blocks: int
    expr: Mapping[str, Any]
    part_keys: tuple[str, ...]
    metadata: Mapping[str, Any] | None = None

    def to_event(self) -> dict[str, Any]:
        """The event the router sends."""
        return {
            "op": self.op,
            "job": self.job,
            "round": self.round,
            "indices": list(self.indices),
            "blocks": self.blocks,
            "expr": self.expr,
            "part_keys": list(self.part_keys),
            "metadata": self.metadata,
        }

    @classmethod
    def from_event(cls, event: Mapping[str, Any]) -> Self:
        """The op of ``event``; :class:`MalformedEventError` when it is malformed."""
        job, round_, indices, blocks = _block_fields("model_part", event)
        part_keys: Any = event.get("part_keys")
        expr: Any = event.get("expr")
        if part_keys is None and "part_key" in event:
            part_keys = [event.get("part_key")]
        keys_ok = _str_list(part_keys) and len(part_keys) == len(indices)
        _check(
            keys_ok and isinstance(expr, dict),
            "model_part",
            "expr" if keys_ok else "part_keys",
            "model_part needs 'expr' and 'part_keys': one string per block in 'indices'",
        )
        metadata = event.get("metadata")
        _check(
            isinstance(metadata, dict) or 0 not in indices,
            "model_part",
            "metadata",
            "model_part of block 0 needs the result's 'metadata'",
        )
        if not isinstance(metadata, dict):
            metadata = None  # only block 0 reads it
        return cls(job, round_, indices, blocks, expr, tuple(part_keys), metadata)


@dataclass(frozen=True)
class RunClientsOp:
    """``{"op": "run_clients", "workload", "job", "round", "params", "gram", "buffers",
    "is_delta", "rows"}``: a per-client model workload on a round this node does not hold,
    with the Gram pieces the router gathered; with ``rows``, only that group's scores."""

    op: ClassVar[str] = "run_clients"
    workload: str
    job: str
    round: int
    gram: Mapping[str, Any]
    params: Mapping[str, Any] | None = None
    buffers: Mapping[str, Any] | None = None
    is_delta: bool = False
    rows: tuple[int, ...] | None = None

    def to_event(self) -> dict[str, Any]:
        """The event the router sends."""
        event: dict[str, Any] = {
            "op": self.op,
            "workload": self.workload,
            "job": self.job,
            "round": self.round,
            "params": self.params,
            "gram": self.gram,
            "buffers": self.buffers,
            "is_delta": self.is_delta,
        }
        if self.rows is not None:
            event["rows"] = list(self.rows)
        return event

    @classmethod
    def from_event(cls, event: Mapping[str, Any]) -> Self:
        """The op of ``event``; :class:`MalformedEventError` when it is malformed."""
        workload, params = event.get("workload", ""), event.get("params")
        _check(
            isinstance(workload, str),
            "run_clients",
            "workload",
            "run_clients' 'workload' must be a name",
        )
        _check(
            params is None or isinstance(params, dict),
            "run_clients",
            "params",
            "run_clients' 'params' must be an object",
        )
        job, round_ = validate_job(event.get("job")), validate_round(event.get("round"))
        gram: Any = event.get("gram")
        buffers: Any = event.get("buffers")
        rows: Any = event.get("rows")
        _check(
            isinstance(gram, dict) and (buffers is None or isinstance(buffers, dict)),
            "run_clients",
            "gram" if not isinstance(gram, dict) else "buffers",
            "run_clients needs the round's Gram pieces ('gram', 'buffers')",
        )
        _check(
            rows is None or (isinstance(rows, list) and all(isinstance(r, int) for r in rows)),
            "run_clients",
            "rows",
            "run_clients' 'rows' must be a list of row indices",
        )
        return cls(
            workload,
            job,
            round_,
            gram,
            params,
            buffers,
            bool(event.get("is_delta")),
            None if rows is None else tuple(rows),
        )


@dataclass(frozen=True)
class _FieldlessOp:
    """An op that carries nothing but its name."""

    op: ClassVar[str]

    def to_event(self) -> dict[str, Any]:
        """The event the router sends."""
        return {"op": self.op}

    @classmethod
    def from_event(cls, event: Mapping[str, Any]) -> Self:
        """The op of ``event`` (it has no fields)."""
        return cls()


@dataclass(frozen=True)
class StatsOp(_FieldlessOp):
    """``{"op": "stats"}``: hits, misses, loads, bytes held, evictions, S3 GETs, reuse."""

    op: ClassVar[str] = "stats"


@dataclass(frozen=True)
class EvictOp:
    """``{"op": "evict", "shards": [...]}`` or ``{"op": "evict", "all": true}`` (which also
    drops the node's cached manifests and job contexts)."""

    op: ClassVar[str] = "evict"
    shards: tuple[str, ...] = ()
    all: bool = False

    def to_event(self) -> dict[str, Any]:
        """The event the router sends."""
        if self.all:
            return {"op": self.op, "all": True}
        return {"op": self.op, "shards": list(self.shards)}

    @classmethod
    def from_event(cls, event: Mapping[str, Any]) -> Self:
        """The op of ``event``; :class:`MalformedEventError` when it is malformed."""
        if event.get("all"):
            return cls(all=True)
        shards = event.get("shards", [])
        _check(
            _str_list(shards), "evict", "shards", "evict's 'shards' must be a list of shard keys"
        )
        return cls(tuple(shards))


@dataclass(frozen=True)
class PingOp(_FieldlessOp):
    """``{"op": "ping"}``: keeps the instance warm and says which node it is."""

    op: ClassVar[str] = "ping"


@dataclass(frozen=True)
class StageOp:
    """``{"op": "stage", "job", "round", "client", "tensors_round", "etag"}``: read one update
    of a round not yet committed (its canonical key, never a key the event names), decode it
    in the tensor order of the committed round ``tensors_round`` and hold it until the round's
    commit (:mod:`flstore_core.cache.staging`); ``etag`` is the object's, as S3 notified it."""

    op: ClassVar[str] = "stage"
    job: str
    round: int
    client: str
    tensors_round: int
    etag: str = ""

    def to_event(self) -> dict[str, Any]:
        """The event the router sends."""
        event: dict[str, Any] = {
            "op": self.op,
            "job": self.job,
            "round": self.round,
            "client": self.client,
            "tensors_round": self.tensors_round,
        }
        if self.etag:
            event["etag"] = self.etag
        return event

    @classmethod
    def from_event(cls, event: Mapping[str, Any]) -> Self:
        """The op of ``event``; :class:`MalformedEventError` when it is malformed (a bad id:
        :class:`~flstore_core.errors.InvalidIdError`)."""
        etag = event.get("etag", "")
        _check(isinstance(etag, str), "stage", "etag", "stage's 'etag' must be a string")
        return cls(
            validate_job(event.get("job")),
            validate_round(event.get("round")),
            validate_client(event.get("client")),
            validate_round(event.get("tensors_round")),
            etag,
        )


NodeOp = (
    LoadOp
    | RunOp
    | PartialOp
    | ModelPartOp
    | RunClientsOp
    | ArtifactsOp
    | StageOp
    | StatsOp
    | EvictOp
    | PingOp
)

# op name -> its class, in the order the unknown-op error lists them
OPS: dict[str, type[NodeOp]] = {
    cls.op: cls
    for cls in (
        LoadOp,
        RunOp,
        PartialOp,
        ModelPartOp,
        RunClientsOp,
        ArtifactsOp,
        StageOp,
        StatsOp,
        EvictOp,
        PingOp,
    )
}


def parse_event(event: Any) -> NodeOp:
    """The typed op of a JSON event; :class:`MalformedEventError` for an event that is not an
    object, an unknown op (the message lists the known ones) or a malformed field."""
    if not isinstance(event, dict):
        raise MalformedEventError("a cache-node event must be a JSON object")
    op = event.get("op")
    # an op that is not a string (a list, say) is unknown too, not a crash
    cls = OPS.get(op) if isinstance(op, str) else None
    if cls is None:
        names = list(OPS)
        raise MalformedEventError(
            f"unknown op {op!r}: use {', '.join(names[:-1])} or {names[-1]}", field="op"
        )
    return cls.from_event(event)
