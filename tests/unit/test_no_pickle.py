"""No code path unpickles data (ARCHITECTURE §2, docs/security.md): the code is scanned for every
way Python and its libraries load pickles — ``pickle``/``cPickle``/``dill``/``cloudpickle``/
``joblib``/``marshal``/``shelve`` loads, ``torch.load`` without ``weights_only=True``,
``np.load``/``numpy.load`` with ``allow_pickle=True``, ``pandas.read_pickle``.

Beam pickles our DoFns into its job graph (code we wrote, in the job's own process tree); that is
Beam's transport, not data from storage or the network, and none of it is named here.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = ("flstore_core", "lambdas", "pipelines", "evaluation", "benchmarks", "infra", "examples")
PICKLERS = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}
LOADERS = {"load", "loads", "Unpickler"}


def sources() -> Iterator[Path]:
    for folder in FOLDERS:
        yield from sorted((ROOT / folder).rglob("*.py"))


def keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def findings(tree: ast.AST) -> list[str]:
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names]
            module = node.module if isinstance(node, ast.ImportFrom) else None
            for name in [module or "", *names]:
                if name.split(".")[0] in PICKLERS:
                    found.append(f"line {node.lineno}: imports {name}")
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        owner = node.func.value
        base = owner.id if isinstance(owner, ast.Name) else getattr(owner, "attr", "")
        attr = node.func.attr
        if base in PICKLERS and attr in LOADERS:
            found.append(f"line {node.lineno}: {base}.{attr}")
        if base == "torch" and attr == "load":
            safe = keyword(node, "weights_only")
            if not (isinstance(safe, ast.Constant) and safe.value is True):
                found.append(f"line {node.lineno}: torch.load without weights_only=True")
        if base in {"np", "numpy"} and attr == "load":
            allow = keyword(node, "allow_pickle")
            if (isinstance(allow, ast.Constant) and allow.value is True) or (
                allow is not None and not isinstance(allow, ast.Constant)
            ):
                found.append(f"line {node.lineno}: np.load with allow_pickle")
        if attr == "read_pickle":
            found.append(f"line {node.lineno}: read_pickle")
    return found


@pytest.mark.parametrize("path", list(sources()), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_code_loads_a_pickle(path: Path) -> None:
    assert findings(ast.parse(path.read_text())) == []


@pytest.mark.parametrize(
    ("code", "caught"),
    [
        ("import pickle", True),
        ("from pickle import loads", True),
        ("import cloudpickle as cp", True),
        ("x = pickle.loads(b)", True),
        ("m = torch.load(f)", True),
        ("m = torch.load(f, weights_only=False)", True),
        ("m = torch.load(f, weights_only=True)", False),
        ("a = np.load(f, allow_pickle=True)", True),
        ("a = np.load(f, allow_pickle=flag)", True),
        ("a = np.load(f)", False),
        ("d = pd.read_pickle(f)", True),
        ("import json; json.loads(s)", False),
    ],
)
def test_the_scan_catches_each_way_to_load_a_pickle(code: str, caught: bool) -> None:
    assert bool(findings(ast.parse(code))) is caught
