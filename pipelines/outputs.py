# mypy: disallow-untyped-calls=False
# (Apache Beam's transforms are not annotated)
"""A DoFn's several outputs carried in its elements, so that every runner keeps them apart.

``beam.ParDo(fn).with_outputs(DEAD, main="stored")`` relies on the runner to route tagged
outputs; Beam's Dask runner (2.77) does not: it puts a ParDo's main and tagged outputs in one
bag, untagged, and every consumer of any output reads all of them. :class:`TaggedParDo` runs the
same DoFn with its outputs marked ``(tag, value)`` in one collection and splits that collection
with one ``FlatMap`` per tag: the same results on FnApiRunner, Dataflow and Dask (where the
runner fuses the steps, the split costs nothing).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import apache_beam as beam
from apache_beam import pvalue


class Outputs(dict[str, Any]):
    """A step's output collections by tag, also as attributes (``outputs.stored``), like the
    result of ``with_outputs``."""

    def __getattr__(self, tag: str) -> Any:
        try:
            return self[tag]
        except KeyError:
            raise AttributeError(tag) from None


class _MarkOutputs(beam.DoFn):
    """Run ``fn``; emit each of its outputs as ``(tag, value)`` (``None``: the main output)."""

    def __init__(self, fn: beam.DoFn) -> None:
        self.fn = fn

    def setup(self) -> None:
        self.fn.setup()

    def start_bundle(self) -> None:
        self.fn.start_bundle()

    # unannotated: Beam would check the side inputs' types against an annotation of *args
    def process(self, element, *side_inputs):  # type: ignore[no-untyped-def]
        for out in self.fn.process(element, *side_inputs) or ():
            if isinstance(out, pvalue.TaggedOutput):
                yield out.tag, out.value
            else:
                yield None, out

    def finish_bundle(self) -> None:
        self.fn.finish_bundle()

    def teardown(self) -> None:
        self.fn.teardown()


def _only(marked: tuple[str | None, Any], tag: str | None) -> Iterable[Any]:
    return (marked[1],) if marked[0] == tag else ()


class TaggedParDo(beam.PTransform[Any, Any]):
    """``beam.ParDo(fn, *side_inputs).with_outputs(*tags, main=main)`` on any runner."""

    def __init__(self, fn: beam.DoFn, *tags: str, main: str, side_inputs: Iterable[Any] = ()):
        super().__init__()
        self.fn = fn
        self.tags = tags
        self.main = main
        self.side_inputs = tuple(side_inputs)

    def expand(self, pcoll: Any) -> Outputs:
        marked = pcoll | "Run" >> beam.ParDo(_MarkOutputs(self.fn), *self.side_inputs)
        out = Outputs()
        for name, tag in ((self.main, None), *((t, t) for t in self.tags)):
            out[name] = marked | f"Only_{name}" >> beam.FlatMap(_only, tag)
        return out


def run_every_branch(*leaves: Any) -> Any:
    """Join the pipeline's leaf collections in one last step.

    Beam's Dask runner computes only the graph behind the pipeline's *last* step, so a branch
    that step does not read (the dead letters of a backfill that re-warms owners afterwards)
    would never run there; every runner runs a step that reads all leaves.
    """
    return leaves | "RunEveryBranch" >> beam.Flatten()
