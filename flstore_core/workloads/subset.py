"""The ``clients`` param of the aggregating round workloads (fedavg, trimmed_mean, multi_krum):
aggregate over a subset of the round's clients — the "what if we drop these clients?" question
— without a new round. Not a workload: a helper the three share.

A subset is a set: the rows are taken in the round's order whatever order the request lists
them in, so the same subset gives the same model bit for bit. The model is still computed on
the round's rows as cached (a sharded round's blocks too): zero weights for the others in a
weighted mean, the subset's row indices for a coordinate-wise function.
"""

from __future__ import annotations

from collections.abc import Sequence

from flstore_core.cache.round_view import RoundView
from flstore_core.errors import InvalidParamsError, NotFoundError
from flstore_core.workloads import Param

CLIENTS_PARAM = Param(
    "array",
    None,
    "aggregate over these client ids only (default: every client of the round)",
    nullable=True,
)


def client_rows(data: RoundView, clients: Sequence[object] | None) -> list[int] | None:
    """Row indices of ``clients`` in the round's order (``None``: every client).

    An empty list, a non-string id or a duplicate is a 400 naming it; an id not in the round a
    404, as for every param naming a client.
    """
    if clients is None:
        return None
    if not clients:
        raise InvalidParamsError(
            "param 'clients' is empty: list at least one of the round's clients, or omit it to "
            "aggregate over all of them"
        )
    seen: set[str] = set()
    for c in clients:
        if not isinstance(c, str):
            raise InvalidParamsError(f"param 'clients' must list client ids (strings), got {c!r}")
        if c in seen:
            raise InvalidParamsError(f"param 'clients' lists client {c!r} twice: list it once")
        seen.add(c)
    index = {c: i for i, c in enumerate(data.clients)}
    for c in clients:
        if c not in index:
            raise NotFoundError(
                f"client {c!r} is not in round {data.round} of job {data.job!r} "
                f"(param 'clients'; the round has {data.n} clients, e.g. {data.clients[0]!r})"
            )
    return sorted(index[c] for c in seen)
