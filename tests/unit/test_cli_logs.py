"""The command line's logging: warnings and errors show, chatter and named notices do not."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest

from flstore_core.cli.logs import configure_logging

APITOOLS = "apitools not found, and bigquery client libraries are not available despite it."


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    before = (list(root.handlers), root.level)
    handler = configure_logging()
    out = io.StringIO()
    handler.setStream(out)  # type: ignore[attr-defined]
    yield out
    root.handlers[:] = before[0]
    root.setLevel(before[1])


def test_library_warnings_and_errors_show(stream: io.StringIO) -> None:
    logging.getLogger("some.library").warning("disk almost full")
    logging.getLogger("some.library").error("it failed")
    assert "WARNING some.library: disk almost full" in stream.getvalue()
    assert "ERROR some.library: it failed" in stream.getvalue()


def test_debug_of_a_library_that_sets_its_own_level_does_not_show(stream: io.StringIO) -> None:
    chatty = logging.getLogger("chatty")
    chatty.setLevel(logging.DEBUG)
    chatty.debug("Using InMemoryObjectStore")
    chatty.info("starting")
    assert stream.getvalue() == ""


def test_the_named_import_notice_is_dropped_but_not_as_an_error(stream: io.StringIO) -> None:
    logging.warning(APITOOLS)
    assert stream.getvalue() == ""
    logging.error(APITOOLS)
    assert APITOOLS in stream.getvalue()


def test_configuring_twice_installs_one_handler() -> None:
    root = logging.getLogger()
    before = list(root.handlers)
    try:
        first = configure_logging()
        assert configure_logging(verbose=True) is first
        assert first.level == logging.INFO
        assert sum(getattr(h, "flstore_cli", False) for h in root.handlers) == 1
    finally:
        root.handlers[:] = before
