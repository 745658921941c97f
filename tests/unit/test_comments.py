"""Comments and docstrings give the reason, never the number of an issue: a reader of the repo
cannot see the tracker, so "(issue 12 item 3)" tells them nothing the sentence should not say."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = (
    "flstore_core",
    "lambdas",
    "pipelines",
    "infra",
    "benchmarks",
    "evaluation",
    "examples",
    "tests",
)
ISSUE_NUMBER = re.compile(r"\bissues? ?#?\d+", re.IGNORECASE)


@pytest.mark.parametrize("folder", FOLDERS)
def test_no_comment_points_to_an_issue_number(folder: str) -> None:
    found = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in sorted((ROOT / folder).rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if ISSUE_NUMBER.search(line) and path.name != "test_comments.py"
    ]
    assert not found, "say the reason instead:\n" + "\n".join(found)
