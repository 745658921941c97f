"""The workload catalogue (ARCHITECTURE §5): one module per workload, registered here by name.

A workload declares its class (which data it needs, hence where it runs and how that data is
cached), a parameter schema with types, defaults and bounds (served by ``GET /v1/workloads``
and enforced before any data is touched), a description and its reference, and a pure function
from the data to a :class:`WorkloadResult`. A model result is returned as a weights vector; the
code that runs the workload (a cache node, or a baseline aggregator) stores it under the job's
``results/`` prefix and replaces it with ``model_key``.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from flstore_core.cache.round_view import Vector
from flstore_core.data.codec.metadata import MAX_JSON_DEPTH
from flstore_core.errors import InvalidParamsError, NotFoundError
from flstore_core.workloads.estimates import Estimate, RoundShape, cheap

__all__ = ["Estimate", "RoundShape"]

WorkloadClass = Literal["round", "client", "model", "meta"]
ParamType = Literal["int", "float", "bool", "str", "array"]
MAX_ARRAY_ITEMS = 100_000

# one module per workload; imported on first use of the registry
_MODULES = (
    "fedavg",
    "cosine_select",
    "malicious_cosine",
    "krum",
    "multi_krum",
    "trimmed_mean",
    "kmeans",
    "cfl_split",
    "oort_select",
    "reputation",
    "incentive",
    "inference",
    "accuracy_select",
    "contribution_loo",
    "contribution_shapley",
    "personalize",
    "feddebug",
    "fltrust",
)


# the range of an "int" param: the integers JSON carries exactly everywhere (I-JSON, RFC 7493,
# §2.2); a larger one would also overflow numpy's and torch's 64-bit integers in a workload
INT_MAX = 2**53 - 1
INT_MIN = -INT_MAX


@dataclass(frozen=True)
class Param:
    """One workload parameter: JSON type, default and bounds."""

    type: ParamType
    default: Any
    description: str = ""
    minimum: float | None = None
    maximum: float | None = None
    # a bound the value must stay strictly below (e.g. trimmed_mean's β < 0.5)
    exclusive_maximum: float | None = None
    choices: tuple[str, ...] | None = None
    nullable: bool = False

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.type, "default": self.default}
        for key in ("minimum", "maximum", "exclusive_maximum", "description"):
            if getattr(self, key) not in (None, ""):
                out[key] = getattr(self, key)
        if self.choices:
            out["choices"] = list(self.choices)
        return out

    def coerce(self, name: str, value: Any) -> Any:
        """Check ``value`` against the type and bounds; ints are accepted where floats are."""
        if value is None and self.nullable:
            return None
        ok = {
            "int": isinstance(value, int) and not isinstance(value, bool),
            "float": isinstance(value, int | float) and not isinstance(value, bool),
            "bool": isinstance(value, bool),
            "str": isinstance(value, str),
            "array": isinstance(value, list),
        }[self.type]
        if not ok:
            raise InvalidParamsError(f"param {name!r} must be of type {self.type}, got {value!r}")
        if self.type == "int" and not INT_MIN <= value <= INT_MAX:
            raise InvalidParamsError(
                f"param {name!r} must be an integer from {INT_MIN} to {INT_MAX} (2**53 - 1)"
            )
        if self.type == "array":
            _check_items(name, value)
        if self.type == "float":
            try:
                value = float(value)
            except OverflowError:  # an int past the largest double
                value = math.inf
            if not math.isfinite(value):
                raise InvalidParamsError(f"param {name!r} must be finite")
        if self.minimum is not None and value < self.minimum:
            raise InvalidParamsError(f"param {name!r} must be >= {self.minimum}, got {value}")
        if self.maximum is not None and value > self.maximum:
            raise InvalidParamsError(f"param {name!r} must be <= {self.maximum}, got {value}")
        if self.exclusive_maximum is not None and value >= self.exclusive_maximum:
            raise InvalidParamsError(
                f"param {name!r} must be < {self.exclusive_maximum}, got {value}"
            )
        if self.choices is not None and value not in self.choices:
            raise InvalidParamsError(
                f"param {name!r} must be one of {', '.join(self.choices)}, got {value!r}"
            )
        return value


def _check_items(name: str, value: list[Any]) -> None:
    """At most :data:`MAX_ARRAY_ITEMS` values nested at most ``MAX_JSON_DEPTH`` deep in the
    array param ``name``: walked with a stack, not by recursion (a recursive count overflowed
    Python's stack at 500 levels, a 500 for the caller's own input)."""
    items = 0
    stack: list[tuple[list[Any], int]] = [(value, 1)]
    while stack:
        array, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise InvalidParamsError(
                f"param {name!r} nests arrays more than {MAX_JSON_DEPTH} levels deep"
            )
        for v in array:
            if isinstance(v, list):
                stack.append((v, depth + 1))
            else:
                items += 1
        if items > MAX_ARRAY_ITEMS:
            raise InvalidParamsError(
                f"param {name!r} has more than {MAX_ARRAY_ITEMS} values: send fewer per request"
            )


@dataclass
class WorkloadResult:
    """What a workload returns: JSON-able result fields and, optionally, a model to store.

    ``model`` is a weights vector, or a function computing it: the code that stores results
    skips the computation when it already wrote that exact model (its key is deterministic in
    the workload, its params and the round's content). On a round whose rows are not here the
    vector is a :class:`~flstore_core.cache.round_view.VectorExpr`, written by the blocks'
    holders.
    """

    result: dict[str, Any]
    model: Vector | Callable[[], Vector] | None = None

    def model_vector(self) -> Vector | None:
        """The model, computed now if it was deferred."""
        return self.model() if callable(self.model) else self.model


@dataclass(frozen=True)
class ClientSplit:
    """How a per-client workload runs over groups of a round's clients in parallel (workload
    affinity): each group's node scores its rows, the router merges.

    ``check(clients, params)`` raises a caller error before any node is invoked;
    ``score(data, params, rows)`` is what one node answers for the rows ``rows`` of ``data``
    (JSON-able); ``merge(clients, params, parts)`` builds the workload's result from every
    group's answer — the same result the workload gives on the whole round.
    """

    check: Callable[[list[str], dict[str, Any]], None]
    score: Callable[[Any, dict[str, Any], list[int]], dict[str, Any]]
    merge: Callable[[list[str], dict[str, Any], list[dict[str, Any]]], dict[str, Any]]


@dataclass(frozen=True)
class Workload:
    """A registered workload."""

    name: str
    cls: WorkloadClass
    description: str
    reference: str
    run: Callable[..., Any]
    params: Mapping[str, Param] = field(default_factory=dict)
    # client class only: combines what every node returned for its clients into the result
    finalize: Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]] | None = None
    # round class: whether the workload evaluates whole client models (a model built from a
    # row, run on the validation set) for these params — its unit is a client, not a column
    # block (ARCHITECTURE §3, workload affinity); either a constant or a function of params
    per_client: bool | Callable[[Mapping[str, Any]], bool] = False
    # per-client workloads whose clients can be evaluated in groups on several nodes
    split: ClientSplit | None = None

    # the memory and time one piece of its plan needs for these params, on a round of this
    # shape (:mod:`flstore_core.workloads.estimates`); the router refuses what no node can run
    estimate: Callable[[Mapping[str, Any], RoundShape], Estimate] = cheap

    # libraries the workload imports beyond numpy (e.g. ``("sklearn",)``): the router does not
    # carry them, so on a sharded round such a workload runs on a node, not in the router
    needs: tuple[str, ...] = ()

    def evaluates_clients(self, params: Mapping[str, Any]) -> bool:
        """Whether a run with ``params`` evaluates whole client models (see ``per_client``)."""
        return bool(self.per_client(params) if callable(self.per_client) else self.per_client)

    def evaluates_models(self, params: Mapping[str, Any]) -> bool:
        """Whether a run with ``params`` evaluates models (the global model's inference, or
        whole client models): a job that asks none needs no model artifacts built."""
        return self.cls == "model" or self.evaluates_clients(params)

    def validate(self, params: Mapping[str, Any] | None) -> dict[str, Any]:
        """Params with defaults filled in; unknown or ill-typed ones raise a 400."""
        if params is None:
            params = {}
        if not isinstance(params, Mapping):
            raise InvalidParamsError("params must be a JSON object")
        unknown = sorted(set(params) - set(self.params))
        if unknown:
            known = ", ".join(sorted(self.params)) or "none"
            raise InvalidParamsError(
                f"workload {self.name!r} has no param {unknown[0]!r}; its params are: {known}"
            )
        return {
            name: spec.coerce(name, params[name]) if name in params else spec.default
            for name, spec in self.params.items()
        }

    def describe(self) -> dict[str, Any]:
        """The entry of ``GET /v1/workloads``."""
        return {
            "name": self.name,
            "class": self.cls,
            "params": {n: p.to_json() for n, p in self.params.items()},
            "description": self.description,
            "reference": self.reference,
        }


_REGISTRY: dict[str, Workload] = {}


def register(workload: Workload) -> Workload:
    """Add a workload to the catalogue (each workload module calls this once)."""
    if workload.name in _REGISTRY and _REGISTRY[workload.name] is not workload:
        raise ValueError(f"workload {workload.name!r} registered twice")
    _REGISTRY[workload.name] = workload
    return workload


_LOADED: list[bool] = []  # set once every workload module imported


def load_all() -> None:
    """Import every workload module, so the registry and the coordinate-wise functions they
    register (:func:`~flstore_core.cache.round_data.register_columnwise`) are complete.

    Once they all imported, a call returns at once: :func:`get` runs on every request, on the
    router and on the node, and 18 ``import_module`` look-ups were ~10 µs of each."""
    if _LOADED:
        return
    for module in _MODULES:
        importlib.import_module(f"flstore_core.workloads.{module}")
    _LOADED.append(True)


def get(name: str) -> Workload:
    """The workload called ``name``; :class:`NotFoundError` lists the known ones."""
    load_all()
    if not isinstance(name, str) or name not in _REGISTRY:
        raise NotFoundError(
            f"unknown workload {name!r}; known workloads: {', '.join(sorted(_REGISTRY))}"
        )
    return _REGISTRY[name]


def catalogue() -> list[dict[str, Any]]:
    """Every workload's description, sorted by name."""
    load_all()
    return [_REGISTRY[n].describe() for n in sorted(_REGISTRY)]


def check_k(k: int, n: int, what: str = "clients") -> None:
    """A k that exceeds the round is a 400 that says how many there are."""
    if k > n:
        raise InvalidParamsError(f"k={k} but the round has only {n} {what}: use k <= {n}")


CLIENTS = Param("array", None, "client ids (default: every client of the job)", nullable=True)
USE_DELTA = Param("bool", True, "work on deltas w_i - base when the round's base model is stored")
INCLUDE_BUFFERS = Param(
    "bool",
    False,
    "also read BatchNorm running statistics (running_mean, running_var); similarities and "
    "distances read the float trainable parameters only by default, integer tensors never",
)
