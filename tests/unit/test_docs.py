"""The docs in the repository stay true: generated sections are current, links stay inside."""

from __future__ import annotations

import re
from pathlib import Path

from flstore_core.workloads import catalogue
from flstore_core.workloads.reference import BEGIN, END, catalogue_markdown, replace_section

ROOT = Path(__file__).resolve().parents[2]
LINK = re.compile(r"\]\(([^)#\s]+)")


def test_the_api_docs_list_the_catalogue_as_the_registry_declares_it() -> None:
    text = (ROOT / "docs" / "api.md").read_text()
    assert text[text.index(BEGIN) : text.index(END) + len(END)] == catalogue_markdown(), (
        "docs/api.md is stale: run python -m flstore_core.workloads.reference --write docs/api.md"
    )


def test_the_generated_section_names_every_workload_and_param() -> None:
    section = catalogue_markdown()
    for w in catalogue():
        assert f"### `{w['name']}` ({w['class']})" in section
        for name in w["params"]:
            assert f"| `{name}` |" in section


def test_replacing_the_section_keeps_the_text_around_it() -> None:
    text = f"before\n{BEGIN}\nold\n{END}\nafter\n"
    assert replace_section(text) == f"before\n{catalogue_markdown()}\nafter\n"


def test_readme_and_docs_link_only_inside_the_repository() -> None:
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in LINK.findall(page.read_text()):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            resolved = (page.parent / target).resolve()
            assert resolved.is_relative_to(ROOT), f"{page.name} links outside the repo: {target}"
            assert resolved.exists(), f"{page.name} links to a missing file: {target}"
