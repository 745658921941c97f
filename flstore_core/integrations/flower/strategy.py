"""The strategy wrapper: one line turns a Flower strategy into one that feeds FLStore.

:func:`with_flstore` returns the same strategy (an instance of a subclass of its class, so
``isinstance(strategy, FedAvg)`` still holds) that, after each ``aggregate_train``, hands the
sink every reply's update (read as :mod:`~flstore_core.integrations.flower.replies` says) and
the aggregate:

- **Rounds**: Flower's rounds start at 1, FLStore's at 0: FLStore round = ``server_round - 1``.
- **Global model**: the aggregated ``ArrayRecord`` (with the aggregated metrics) is stored as
  the round's global model — the base the next round's deltas are taken from. The arrays the
  first ``configure_train`` sends are the job's initial model (the base of round 0), stored when
  the sink accepts one (:class:`~flstore_core.integrations.flower.sinks.InitialModelSink`).

- **Out of the training loop**: ``aggregate_train`` decodes the round's arrays (Flower holds
  them as serialised bytes: the decoded arrays are this process's own, no one else writes to
  them) and hands the round to a background writer (:class:`~flstore_core.sdk.handover.
  RoundHandover`): the sink stores, summarises, commits (and warms) it, one round at a time in
  round order, while the next round trains. At most ``max_in_flight`` rounds are in flight
  (default 2; run config ``flstore-max-in-flight``); past that ``aggregate_train`` waits. A
  round that fails is logged with its number; ``start`` returns only once every round is
  stored, and raises :class:`~flstore_core.sdk.handover.RoundsNotStoredError` if one was not
  (so ``flwr run`` reports the run failed). A loop that calls ``aggregate_train`` itself calls
  ``strategy.flstore.flush()`` at its end.

What the wrapped strategy returns is returned unchanged: FLStore observes, it never steers the
aggregate. Optionally (``select_with="oort_select"`` or ``"cosine_select"`` and an
:class:`~flstore_core.sdk.client.FLStoreClient`), ``configure_train`` asks FLStore which clients to
train, falling back to the strategy's own sampling when FLStore cannot answer.

flwr is imported only inside functions, so this module imports without it.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TypeVar, cast

import numpy as np
import numpy.typing as npt

from flstore_core.data.codec import Update
from flstore_core.errors import FLStoreError, ValidationError
from flstore_core.ids import validate_job
from flstore_core.integrations.flower.replies import (
    CLIENT_ID_KEY,
    METRIC_NAMES,
    ReplyUpdate,
    arrays_to_tensors,
    read_replies,
)
from flstore_core.integrations.flower.sinks import FLStoreSink, InitialModelSink
from flstore_core.sdk.handover import DEFAULT_MAX_IN_FLIGHT, RoundHandover

if TYPE_CHECKING:
    from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
    from flwr.serverapp import Grid
    from flwr.serverapp.strategy import Result, Strategy

    # the mixin is typed as a Strategy; at run time it is a plain class placed before the
    # wrapped strategy's class in the MRO of a class created by `with_flstore`
    from flwr.serverapp.strategy import Strategy as _MixinBase

    from flstore_core.sdk.client import FLStoreClient
else:
    _MixinBase = object

__all__ = [
    "SELECT_WORKLOADS",
    "FLStoreSettings",
    "FLStoreStrategy",
    "SelectWith",
    "with_flstore",
]

log = logging.getLogger(__name__)

S = TypeVar("S", bound="Strategy")
SelectWith = Literal["oort_select", "cosine_select"]
SELECT_WORKLOADS: tuple[str, ...] = ("oort_select", "cosine_select")


@dataclass
class FLStoreSettings:
    """What a wrapped strategy knows of FLStore (kept under the strategy's ``_flstore``)."""

    sink: FLStoreSink
    job: str
    select_with: SelectWith | None = None
    client: FLStoreClient | None = None
    select_k: int | None = None
    tensor_names: Sequence[str] | None = None
    on_sink_error: Literal["raise", "log"] = "raise"
    initial_stored: bool = False
    node_of_client: dict[str, int] = field(default_factory=dict)
    client_of_node: dict[int, str] = field(default_factory=dict)
    rounds_stored: dict[int, list[str]] = field(default_factory=dict)
    """FLStore round → the client ids the sink stored, for the rounds it stored."""
    handover: RoundHandover = field(default_factory=RoundHandover)
    """The background writer the rounds are handed to."""

    def flush(self) -> None:
        """Wait until every round handed over is stored; a round that was not raises
        :class:`~flstore_core.sdk.handover.RoundsNotStoredError` (``on_sink_error="raise"``)
        or is logged again (``"log"``)."""
        if self.on_sink_error == "raise":
            self.handover.flush()
            return
        failures = self.handover.wait()
        if failures:
            log.warning(
                "FLStore: %d round(s) of job %r were not stored: %s",
                len(failures),
                self.job,
                "; ".join(map(str, failures)),
            )


class FLStoreStrategy(_MixinBase):
    """The mixin :func:`with_flstore` puts in front of a strategy's class.

    It overrides ``configure_train`` (initial model, optional FLStore selection) and
    ``aggregate_train`` (hand the round to the sink); everything else is the wrapped class's.
    ``isinstance(strategy, FLStoreStrategy)`` tells a wrapped strategy.
    """

    _flstore: FLStoreSettings

    @property
    def flstore(self) -> FLStoreSettings:
        """The FLStore settings and bookkeeping of this strategy."""
        return self._flstore

    def start(self, *args: Any, **kwargs: Any) -> Result:
        """The wrapped strategy's ``start`` (the whole run), then wait until every round is
        stored: a ServerApp's ``main`` returns, and ``flwr run`` ends, only once they are."""
        base = cast("Strategy", super())
        try:
            result = base.start(*args, **kwargs)
        except BaseException:
            # the run's own error is the one to report; the rounds handed over still land
            self._flstore.handover.wait()
            raise
        self._flstore.flush()
        return result

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        settings = self._flstore
        if server_round == 1 and not settings.initial_stored:
            self._flstore_put_initial(arrays)
        base = cast("Strategy", super())
        messages = list(base.configure_train(server_round, arrays, config, grid))
        if settings.select_with and settings.client is not None and server_round > 1 and messages:
            # FLStore selects from the rounds it has stored: wait for those handed over
            settings.handover.wait()
            messages = self._flstore_select(server_round, messages, grid)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)  # read twice: by the strategy, then by FLStore
        base = cast("Strategy", super())
        result = base.aggregate_train(server_round, replies)
        self._flstore_put_round(server_round, replies, result[0], result[1])
        return result

    # -- FLStore side ------------------------------------------------------------------

    def _flstore_sink_call(self, what: str, call: Callable[[], None]) -> bool:
        """Run ``call`` (the initial model's storing; a round's decoding and hand-over); on
        failure raise or log, as ``on_sink_error`` says."""
        try:
            call()
            return True
        except Exception as exc:
            if self._flstore.on_sink_error == "raise":
                raise
            log.warning("FLStore: could not store %s of job %r: %s", what, self._flstore.job, exc)
            return False

    def _flstore_put_initial(self, arrays: ArrayRecord) -> None:
        settings = self._flstore
        settings.initial_stored = True
        sink = settings.sink
        if not isinstance(sink, InitialModelSink):
            return
        update = Update(arrays_to_tensors(arrays, settings.tensor_names), kind="initial")
        self._flstore_sink_call("the initial model", lambda: sink.put_initial(settings.job, update))

    def _flstore_put_round(
        self,
        server_round: int,
        replies: list[Message],
        arrays: ArrayRecord | None,
        metrics: MetricRecord | None,
    ) -> None:
        settings = self._flstore
        round_ = server_round - 1

        def put() -> None:
            # only what is quick happens in the training loop: which clients replied and the
            # arrays they sent (Flower Arrays, whose bytes never change); decoding them into
            # updates (~0.2-1 s a ResNet-18 × 10 round) is the background writer's work
            read, nodes = read_replies(
                replies,
                weighted_by_key=str(getattr(self, "weighted_by_key", "num-examples")),
                arrayrecord_key=getattr(self, "arrayrecord_key", None),
                tensor_names=settings.tensor_names,
            )
            if not read:
                log.warning(
                    "FLStore: round %d of job %r had no successful reply", round_, settings.job
                )
                return
            for client, node in nodes.items():
                settings.node_of_client[client] = node
                settings.client_of_node[node] = client
            model = None
            if arrays is not None:
                model = ReplyUpdate(
                    dict(arrays.items()),
                    sum(u.num_examples for u in read.values()),
                    {
                        METRIC_NAMES.get(k, k): v
                        for k, v in (metrics or {}).items()
                        if k != CLIENT_ID_KEY
                    },
                    settings.tensor_names,
                )
            settings.handover.submit(round_, functools.partial(store, read, model))

        def store(read: dict[str, ReplyUpdate], model: ReplyUpdate | None) -> None:
            updates = {client: r.update() for client, r in read.items()}
            global_model = None
            if model is not None:
                sent = next(iter(updates.values())).tensors
                aggregated = model.update()
                global_model = Update(
                    {
                        name: _dtype_like(array, sent.get(name))
                        for name, array in aggregated.tensors.items()
                    },
                    num_examples=aggregated.num_examples,
                    metrics=aggregated.metrics,
                    kind="global",
                )
            settings.sink.put_round(settings.job, round_, updates, global_model)
            settings.rounds_stored[round_] = list(updates)

        self._flstore_sink_call(f"round {round_}", put)

    def _flstore_select(
        self, server_round: int, messages: list[Message], grid: Grid
    ) -> list[Message]:
        """Re-address the strategy's train messages to the clients FLStore selects."""
        settings = self._flstore
        if settings.client is None:
            return messages
        k = min(settings.select_k or len(messages), len(messages))
        node_of = {settings.client_of_node.get(n, str(n)): int(n) for n in grid.get_node_ids()}
        try:
            if settings.select_with == "oort_select":
                answer = settings.client.run(
                    settings.job,
                    "oort_select",
                    k=min(k, len(node_of)),
                    candidates=sorted(node_of),
                    round=server_round - 1,
                    seed=server_round,
                )
            else:
                previous = server_round - 2  # the last round FLStore has (FLStore numbering)
                seen = settings.rounds_stored.get(previous)
                if not seen:
                    return messages
                answer = settings.client.run(
                    settings.job, "cosine_select", round=previous, k=min(k, len(seen))
                )
        except (FLStoreError, OSError) as exc:
            log.warning(
                "FLStore: %s failed (%s); keeping the strategy's own sampling",
                settings.select_with,
                exc,
            )
            return messages
        chosen: list[int] = []
        for client in answer.get("result", {}).get("selected", []):
            node = node_of.get(client)
            if node is not None and node not in chosen:
                chosen.append(node)
        # fewer picks than k (e.g. cosine_select saw fewer clients): top up with the strategy's
        for message in messages:
            if len(chosen) >= k:
                break
            if message.metadata.dst_node_id not in chosen:
                chosen.append(message.metadata.dst_node_id)
        return _address(messages, chosen[:k])


def _dtype_like(array: npt.NDArray[Any], like: npt.NDArray[Any] | None) -> npt.NDArray[Any]:
    """``array`` in the dtype the clients sent (averaging turns integer counters into floats)."""
    if like is None or array.dtype == like.dtype:
        return array
    if np.issubdtype(like.dtype, np.integer):
        return np.asarray(np.rint(array), dtype=like.dtype)
    return array.astype(like.dtype)


def _address(messages: list[Message], nodes: list[int]) -> list[Message]:
    """Messages for ``nodes``: the strategy's own where it had one, else copies of the first."""
    from flwr.app import Message

    by_node = {m.metadata.dst_node_id: m for m in messages}
    template = messages[0]
    return [
        by_node.get(node)
        or Message(
            content=template.content,
            dst_node_id=node,
            message_type=template.metadata.message_type,
            group_id=template.metadata.group_id or None,
            ttl=template.metadata.ttl,
        )
        for node in nodes
    ]


def _max_in_flight(sink: FLStoreSink, given: int | None) -> int:
    """``given``, else the sink's ``max_in_flight`` (set from the run config), else 2."""
    if given is None:
        hinted = getattr(sink, "max_in_flight", None)
        given = DEFAULT_MAX_IN_FLIGHT if hinted is None else int(hinted)
    if given < 0:
        raise ValidationError(f"max_in_flight={given}: use 0 (no background) or more")
    return given


@functools.cache
def _wrapped_class(base: type) -> type:
    return type(
        f"FLStore{base.__name__}",
        (FLStoreStrategy, base),
        {
            "__module__": __name__,
            "__doc__": f"{base.__name__} that hands every round to FLStore (see with_flstore).",
        },
    )


def with_flstore(
    strategy: S,
    *,
    sink: FLStoreSink,
    job: str,
    select_with: SelectWith | None = None,
    client: FLStoreClient | None = None,
    select_k: int | None = None,
    tensor_names: Sequence[str] | None = None,
    on_sink_error: Literal["raise", "log"] = "raise",
    max_in_flight: int | None = None,
) -> S:
    """The Flower ``strategy``, handing every round to FLStore through ``sink``.

    Parameters
    ----------
    strategy : flwr.serverapp.strategy.Strategy
        Any Message-API strategy (``FedAvg``, ``MultiKrum``, ``FedProx``, a subclass of yours…).
        It is copied (shallowly) into an instance of a subclass of its class, so the result is
        still a ``FedAvg`` (or whatever it was) with the same settings; use the result.
    sink : FLStoreSink
        Receives each round (:class:`~flstore_core.integrations.flower.sinks.StoreSink` writes to
        an object store).
    job : str
        The FLStore job id the rounds belong to.
    select_with : {"oort_select", "cosine_select"} or None, default None
        From round 2 on, ask FLStore (through ``client``) which clients to train: Oort over all
        connected nodes, or the clients of the previous round most similar to its mean. The
        strategy still builds the messages; they are re-addressed to the selection. On any
        FLStore error the strategy's own sampling stands.
    client : FLStoreClient or None, default None
        The HTTP API client used by ``select_with``.
    select_k : int or None, default None
        How many clients to select (default: as many as the strategy sampled).
    tensor_names : sequence of str or None, default None
        Names for the arrays of every ArrayRecord, in order, when the ClientApp does not send a
        state dict (e.g. ``list(model.state_dict())``).
    on_sink_error : {"raise", "log"}, default "raise"
        Whether a failure to store a round (the sink's, or a reply FLStore cannot read) stops
        the run or is logged while training goes on. Committed updates are immutable: rerun
        a job under a fresh job id. A round that fails in the background is logged at once and,
        with ``"raise"``, raised by ``start`` (or ``strategy.flstore.flush()``) at the end.
    max_in_flight : int or None, default None
        Rounds handed over and not yet stored before ``aggregate_train`` waits (0: stored
        inside it). None: the sink's ``max_in_flight`` (run config ``flstore-max-in-flight``),
        else 2.

    Returns
    -------
    Strategy
        The wrapped strategy; ``aggregate_train`` returns exactly what the original does.
    """
    validate_job(job)
    if not isinstance(sink, FLStoreSink):
        raise ValidationError(f"sink {sink!r} has no put_round(job, round, updates, global_model)")
    if isinstance(strategy, FLStoreStrategy):
        raise ValidationError("this strategy already hands its rounds to FLStore")
    if select_with is not None and select_with not in SELECT_WORKLOADS:
        raise ValidationError(
            f"select_with={select_with!r}: use one of {', '.join(SELECT_WORKLOADS)} or None"
        )
    if select_with is not None and client is None:
        raise ValidationError(f"select_with={select_with!r} needs client=FLStoreClient(...)")
    if select_k is not None and select_k < 1:
        raise ValidationError(f"select_k={select_k}: select at least one client")
    cls = _wrapped_class(type(strategy))
    # a new instance with the strategy's attributes (a shallow copy): __init__ is not re-run
    wrapped: FLStoreStrategy = object.__new__(cls)
    wrapped.__dict__.update(vars(strategy))
    wrapped._flstore = FLStoreSettings(
        sink=sink,
        job=job,
        select_with=select_with,
        client=client,
        select_k=select_k,
        tensor_names=list(tensor_names) if tensor_names is not None else None,
        on_sink_error=on_sink_error,
        handover=RoundHandover(_max_in_flight(sink, max_in_flight), what=f"job {job!r}"),
    )
    return cast(S, wrapped)
