"""Flower train replies as FLStore updates.

- **Updates**: each reply's ``ArrayRecord`` becomes an :class:`~flstore_core.data.codec.Update`
  whose tensor names are the record's keys in order (the state-dict names when the ClientApp
  sent ``ArrayRecord(model.state_dict())``; pass ``tensor_names`` when it sent a plain list of
  arrays, whose keys are ``"0"``, ``"1"``, …). The reply's ``MetricRecord`` gives
  ``num_examples`` (the strategy's ``weighted_by_key``, ``num-examples`` by default) and the
  metrics; Flower's usual names are mapped to FLStore's (``train_loss`` → ``loss``,
  ``train_time`` → ``duration_s``, …, see :data:`METRIC_NAMES`), others are kept as sent.
- **Client ids** are the replying node ids (``str(node_id)``), unless the ClientApp reports its
  own id under ``client-id`` (:data:`CLIENT_ID_KEY`) in a ``ConfigRecord`` of its reply (a
  string) or in its ``MetricRecord`` (an integer; MetricRecords only hold numbers).

flwr is needed only for type checking: the functions read the records they are given.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from flstore_core.data.codec import Update
from flstore_core.errors import ValidationError
from flstore_core.ids import validate_client

if TYPE_CHECKING:
    from flwr.app import ArrayRecord, Message

__all__ = [
    "CLIENT_ID_KEY",
    "METRIC_NAMES",
    "ReplyUpdate",
    "arrays_to_tensors",
    "read_replies",
    "read_reply",
    "reported_client_id",
    "update_from_reply",
    "updates_from_replies",
]

CLIENT_ID_KEY = "client-id"
"""Key under which a ClientApp may report its FLStore client id (ConfigRecord str or int)."""

METRIC_NAMES: dict[str, str] = {
    "loss": "loss",
    "train_loss": "loss",
    "train-loss": "loss",
    "loss_sq_mean": "loss_sq_mean",
    "loss-sq-mean": "loss_sq_mean",
    "duration_s": "duration_s",
    "duration": "duration_s",
    "train_time": "duration_s",
    "train-time": "duration_s",
    "train_duration": "duration_s",
    "train-duration": "duration_s",
}
"""Flower metric names → FLStore's (Oort reads ``loss``, ``loss_sq_mean`` and ``duration_s``)."""


def array_values(array: Any) -> npt.NDArray[Any]:
    """A Flower ``Array``'s values: a read-only view of its bytes when they are the ``.npy``
    serialization of a plain numeric array (Flower's own), else what ``Array.numpy()`` returns
    (which never unpickles). A view spares a copy of every update in the round (~0.2-1 s for
    ResNet-18 × 10); the bytes are immutable, so the view never changes."""
    data = getattr(array, "data", None)
    if getattr(array, "stype", None) == "numpy.ndarray" and isinstance(data, bytes):
        stream = io.BytesIO(data)
        try:
            version = np.lib.format.read_magic(stream)
            read_header = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, fortran, dtype = read_header(stream)
        except ValueError:
            shape, fortran, dtype = (), False, np.dtype(object)  # numpy() says what is wrong
        offset = stream.tell()
        count = math.prod(shape)
        if not dtype.hasobject and offset + count * dtype.itemsize == len(data):
            flat = np.frombuffer(data, dtype, count=count, offset=offset)
            return flat.reshape(shape, order="F" if fortran else "C")
    return np.asarray(array.numpy())


def arrays_to_tensors(
    record: ArrayRecord | Mapping[str, Any], tensor_names: Sequence[str] | None = None
) -> dict[str, npt.NDArray[Any]]:
    """An ``ArrayRecord`` as an ordered ``name -> ndarray`` mapping (keys or ``tensor_names``);
    the arrays are read-only (:func:`array_values`)."""
    arrays = [array_values(array) for array in record.values()]
    names = list(record.keys()) if tensor_names is None else list(tensor_names)
    if len(names) != len(arrays):
        raise ValidationError(
            f"tensor_names has {len(names)} names but the ArrayRecord holds {len(arrays)} "
            "arrays: give one name per array, in order"
        )
    return dict(zip(names, arrays, strict=True))


def reported_client_id(content: Any) -> str | None:
    """The ``client-id`` a ClientApp put in a ConfigRecord (str) or MetricRecord (int), if any."""
    for record in content.config_records.values():
        if CLIENT_ID_KEY in record:
            return str(record[CLIENT_ID_KEY])
    for record in content.metric_records.values():
        value = record.get(CLIENT_ID_KEY)
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
    return None


@dataclass(frozen=True)
class ReplyUpdate:
    """A train reply's update, read but not yet decoded: :func:`read_reply` takes it from the
    reply in microseconds (the arrays are Flower ``Array`` objects, whose bytes never change),
    and :meth:`update` decodes the arrays later, off the training loop, even if the reply's
    records were changed in the meantime."""

    arrays: Mapping[str, Any]
    num_examples: int
    metrics: dict[str, Any]
    tensor_names: Sequence[str] | None = None

    def update(self) -> Update:
        """The decoded update (read-only arrays over bytes no one can change)."""
        return Update(
            arrays_to_tensors(self.arrays, self.tensor_names),
            num_examples=self.num_examples,
            metrics=dict(self.metrics),
        )


def read_reply(
    reply: Message,
    *,
    weighted_by_key: str = "num-examples",
    arrayrecord_key: str | None = None,
    tensor_names: Sequence[str] | None = None,
) -> tuple[str, ReplyUpdate]:
    """``(client id, update not yet decoded)`` of one successful train reply (see the module
    docstring); a reply without arrays, or with an invalid client id, raises here."""
    content = reply.content
    records = content.array_records
    if not records:
        raise ValidationError(
            f"the reply of node {reply.metadata.src_node_id} carries no ArrayRecord"
        )
    if arrayrecord_key is not None and arrayrecord_key in records:
        record = records[arrayrecord_key]
    else:
        record = next(iter(records.values()))
    metrics: dict[str, Any] = {}
    for metric_record in content.metric_records.values():
        for key, value in metric_record.items():
            if key != CLIENT_ID_KEY:
                metrics[METRIC_NAMES.get(key, key)] = value
    num_examples = metrics.pop(weighted_by_key, 0)
    client = reported_client_id(content) or str(reply.metadata.src_node_id)
    validate_client(client)
    arrays = dict(record.items())  # the Array objects as they are now
    return client, ReplyUpdate(arrays, int(num_examples), metrics, tensor_names)


def update_from_reply(
    reply: Message,
    *,
    weighted_by_key: str = "num-examples",
    arrayrecord_key: str | None = None,
    tensor_names: Sequence[str] | None = None,
) -> tuple[str, Update]:
    """``(client id, update)`` of one successful train reply (see the module docstring)."""
    client, read = read_reply(
        reply,
        weighted_by_key=weighted_by_key,
        arrayrecord_key=arrayrecord_key,
        tensor_names=tensor_names,
    )
    return client, read.update()


def read_replies(
    replies: Iterable[Message],
    *,
    weighted_by_key: str = "num-examples",
    arrayrecord_key: str | None = None,
    tensor_names: Sequence[str] | None = None,
) -> tuple[dict[str, ReplyUpdate], dict[str, int]]:
    """The updates of a round's successful replies, not yet decoded (:class:`ReplyUpdate`),
    and the node each client id came from; two nodes reporting one client id raise."""
    updates: dict[str, ReplyUpdate] = {}
    nodes: dict[str, int] = {}
    for reply in replies:
        if reply.has_error():
            continue
        client, update = read_reply(
            reply,
            weighted_by_key=weighted_by_key,
            arrayrecord_key=arrayrecord_key,
            tensor_names=tensor_names,
        )
        node = int(reply.metadata.src_node_id)
        if client in updates:
            raise ValidationError(
                f"nodes {nodes[client]} and {node} both report client id {client!r}: "
                "client ids must be unique within a round"
            )
        updates[client], nodes[client] = update, node
    return updates, nodes


def updates_from_replies(
    replies: Iterable[Message],
    *,
    weighted_by_key: str = "num-examples",
    arrayrecord_key: str | None = None,
    tensor_names: Sequence[str] | None = None,
) -> tuple[dict[str, Update], dict[str, int]]:
    """The updates of a round's successful replies and the node each client id came from."""
    read, nodes = read_replies(
        replies,
        weighted_by_key=weighted_by_key,
        arrayrecord_key=arrayrecord_key,
        tensor_names=tensor_names,
    )
    return {client: r.update() for client, r in read.items()}, nodes
