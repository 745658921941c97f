"""One contract for every round view (:class:`~flstore_core.cache.round_view.RoundView`): a
whole round, the same round held in column blocks (the router's :class:`ShardedRound`) and read
one client at a time (a node's :class:`StreamedRound`) answer the same Gram-derived artifacts;
their model builders return a vector where the rows are at hand and an expression the blocks
evaluate to the same vector where they are not. Only the whole round has ``matrix``."""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import pytest

from flstore_core.cache.round_data import ArtifactStats, RoundData
from flstore_core.cache.round_loading import load_round, load_round_block
from flstore_core.cache.round_view import RoundView, VectorExpr, as_array
from flstore_core.cache.sharded import ShardedRound, evaluate
from flstore_core.cache.streamed import StreamedRound
from flstore_core.data.codec import Update
from flstore_core.data.manifest import JobSpec
from flstore_core.errors import UnavailableError
from flstore_core.storage.memory import MemoryBlobStore
from flstore_core.storage.object_store import ObjectStore

JOB = "views"
BLOCKS = 3
SHAPES = {"w": (6, 50), "b": (6,), "bn.running_mean": (6,), "bn.num_batches_tracked": ()}


@pytest.fixture(scope="module")
def store() -> Iterator[ObjectStore]:
    st = ObjectStore("mem", blobs=MemoryBlobStore())
    rng = np.random.default_rng(3)
    st.put_job_spec(JobSpec(job=JOB))

    def model(scale: float) -> dict[str, np.ndarray]:
        out = {k: (scale * rng.standard_normal(s)).astype(np.float32) for k, s in SHAPES.items()}
        out["bn.num_batches_tracked"] = np.array(7, np.int64)
        return out

    st.put_initial(JOB, Update(model(1.0)))
    entries = [
        st.put_update(JOB, 0, f"c{k}", Update(model(1.0), num_examples=5 + k)) for k in range(5)
    ]
    st.commit_round(JOB, 0, entries)
    yield st
    st.close()


class Views(NamedTuple):
    whole: RoundData
    sharded: ShardedRound
    streamed: StreamedRound
    blocks: list[RoundData]


@pytest.fixture(scope="module")
def views(store: ObjectStore) -> Views:
    whole = load_round(store, JOB, 0, ArtifactStats())
    blocks = [load_round_block(store, JOB, 0, b, BLOCKS, ArtifactStats()) for b in range(BLOCKS)]
    sharded = ShardedRound(
        JOB,
        0,
        whole.clients,
        whole.specs,
        whole.num_examples,
        whole.metrics,
        BLOCKS,
        lambda buffers: ([blk.gram_parts(buffers) for blk in blocks], whole.is_delta),
        sha256=whole.sha256,
    )
    parts = sharded.gram_parts()
    assert parts is not None
    streamed = StreamedRound(
        store,
        store.get_manifest(JOB, 0),
        parts,
        sharded.gram_parts(buffers=True),
        sharded.is_delta,
        capacity=0,
    )
    return Views(whole, sharded, streamed, blocks)


@pytest.mark.parametrize("kind", ["whole", "sharded", "streamed"])
def test_every_view_answers_the_gram_artifacts_of_the_whole_round(views: Views, kind: str) -> None:
    view: RoundView = getattr(views, kind)
    whole = views.whole
    assert isinstance(view, RoundView)
    assert hasattr(view, "matrix") == (kind == "whole")
    assert view.clients == whole.clients and view.is_delta == whole.is_delta
    for buffers in (False, True):
        np.testing.assert_allclose(view.gram(True, buffers), whole.gram(True, buffers), rtol=1e-6)
        np.testing.assert_allclose(
            view.distances(buffers), whole.distances(buffers), rtol=1e-6, atol=1e-9
        )
        np.testing.assert_allclose(
            view.sq_norms(False, buffers), whole.sq_norms(False, buffers), rtol=1e-5
        )


def test_models_are_vectors_where_rows_are_here_and_expressions_where_not(
    views: Views,
) -> None:
    whole, sharded, streamed, blocks = views
    w = np.arange(1.0, 6.0)
    expr = sharded.to_weights(sharded.weighted_mean(w))
    assert isinstance(expr, VectorExpr)
    from_blocks = np.concatenate([evaluate(expr.spec, blk) for blk in blocks])
    # a GEMV per block: within float32 rounding of the whole round's (column k of the mean
    # reads column k of the rows only, but BLAS may run another kernel on a block's columns)
    np.testing.assert_allclose(from_blocks, whole.to_weights(whole.weighted_mean(w)), rtol=1e-6)
    row = sharded.client_weights(2)
    assert isinstance(row, VectorExpr)
    np.testing.assert_array_equal(
        np.concatenate([evaluate(row.spec, blk) for blk in blocks]), whole.client_weights(2)
    )
    # a streamed round reads each client's row: the same float32 bits as the whole round's
    np.testing.assert_array_equal(as_array(streamed.client_weights(2)), whole.client_weights(2))
    assert isinstance(streamed.columnwise("zeros"), VectorExpr)
    with pytest.raises(UnavailableError):
        as_array(expr)
    with pytest.raises(UnavailableError):
        _ = sharded.base
