"""What the command line prints besides its own output: warnings and errors, nothing chatty.

Libraries FLStore runs log at every level, and some log on import through the root logger, which
makes Python install its default ``LEVEL:name:message`` handler — after which every library's
DEBUG records (Flower's, for one) reach the terminal. The command line installs its own handler
first: warnings and errors of every library still show (``--verbose`` adds INFO), minus a short,
named list of import-time notices that do not concern FLStore.
"""

from __future__ import annotations

import logging
import sys

# (logger name, message prefix) of third-party notices that say nothing about FLStore's run
IGNORED_NOTICES: tuple[tuple[str, str], ...] = (
    # apache_beam.io.gcp's BigQuery clients, which FLStore never uses (no apitools installed)
    ("root", "apitools not found, and bigquery client libraries are not available"),
)


class IgnoredNoticeFilter(logging.Filter):
    """Drops the records of :data:`IGNORED_NOTICES`; everything at ERROR or above passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        message = record.getMessage()
        return not any(
            record.name == name and message.startswith(prefix) for name, prefix in IGNORED_NOTICES
        )


def configure_logging(verbose: bool = False) -> logging.Handler:
    """Install the command line's handler on the root logger (once) and return it."""
    root = logging.getLogger()
    for handler in root.handlers:
        if getattr(handler, "flstore_cli", False):
            handler.setLevel(logging.INFO if verbose else logging.WARNING)
            return handler
    handler = logging.StreamHandler(sys.stderr)
    handler.flstore_cli = True  # type: ignore[attr-defined]
    handler.setLevel(logging.INFO if verbose else logging.WARNING)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.addFilter(IgnoredNoticeFilter())
    root.addHandler(handler)
    if verbose and root.getEffectiveLevel() > logging.INFO:
        root.setLevel(logging.INFO)
    return handler
