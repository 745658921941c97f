"""Every FLSTORE_* setting is declared once, in flstore_core.config, and read through it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from flstore_core import config
from flstore_core.errors import ValidationError

ROOT = Path(__file__).resolve().parents[2]
NAME = re.compile(r"FLSTORE_[A-Z][A-Z0-9_]*")


def test_settings_have_unique_names():
    names = [s.name for s in config.SETTINGS]
    assert len(names) == len(set(names))


def test_get_falls_back_to_the_default_when_unset_or_blank():
    assert config.BUCKET.get({}) == "flstore"
    assert config.BUCKET.get({"FLSTORE_BUCKET": "  "}) == "flstore"
    assert config.BUCKET.get({"FLSTORE_BUCKET": "mine"}) == "mine"
    assert config.S3_ENDPOINT.get({}) is None


def test_get_int_names_the_variable_when_the_value_is_not_an_integer():
    with pytest.raises(ValidationError, match="FLSTORE_CACHE_NODES"):
        config.CACHE_NODES.get_int({"FLSTORE_CACHE_NODES": "eight"})
    assert config.CACHE_NODES.get_int({"FLSTORE_CACHE_NODES": "3"}) == 3


def test_get_list_splits_on_commas_and_drops_blanks():
    assert config.PREFETCH_MODELS.get_list({"FLSTORE_PREFETCH_MODELS": "fedavg, ,krum"}) == (
        "fedavg",
        "krum",
    )


@pytest.mark.parametrize("folder", ["flstore_core", "lambdas", "pipelines", "evaluation", "infra"])
def test_every_flstore_variable_the_code_names_is_declared(folder):
    declared = {s.name for s in config.SETTINGS}
    for path in (ROOT / folder).rglob("*.py"):
        if path.name == "config.py" and path.parent.name == "flstore_core":
            continue
        used = set(NAME.findall(path.read_text())) - {"FLSTORE_"}
        assert used <= declared, f"{path.relative_to(ROOT)} names undeclared {used - declared}"


@pytest.mark.parametrize("folder", ["flstore_core", "lambdas", "pipelines", "evaluation"])
def test_only_the_config_module_reads_flstore_variables_from_the_environment(folder):
    pattern = re.compile(r"environ(?:\.get)?\(\s*['\"]FLSTORE_|getenv\(\s*['\"]FLSTORE_")
    for path in (ROOT / folder).rglob("*.py"):
        assert not pattern.search(path.read_text()), path.relative_to(ROOT)
