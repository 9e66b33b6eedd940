"""Imports point down the documented layers: a package of ``src/heed`` imports only from the packages
listed below it in docs/architecture.md (packages on one line import neither each other), and the
packages form no import cycle among themselves."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "heed"


def documented_layers() -> list[set[str]]:
    """The layer block of docs/architecture.md, bottom layer first: one set of package names per line."""
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    block = re.search(r"```\n(heed\.cli.*?)```", text, re.S)
    assert block, "docs/architecture.md: no layer block starting with heed.cli"
    layers = []
    for line in block.group(1).splitlines():
        names = re.match(r"((?:heed\.\w+(?: / )?)+)", line)
        assert names, f"docs/architecture.md: unreadable layer line {line!r}"
        layers.append({n.split(".")[1] for n in names.group(1).split(" / ")})
    return layers[::-1]


def package_imports() -> list[tuple[str, str, str]]:
    """(importing package, imported package, file:line) for every ``heed.X`` import between packages."""
    found = []
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC).parts
        if len(parts) == 1:
            continue  # heed/__init__.py, heed/errors.py, heed/__main__.py sit outside the layers
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module:
                modules = [node.module]
            elif isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            else:
                continue
            for module in modules:
                bits = module.split(".")
                if bits[0] == "heed" and len(bits) > 1 and bits[1] != parts[0] and bits[1] != "errors":
                    found.append((parts[0], bits[1], f"{path.relative_to(ROOT)}:{node.lineno}"))
    return found


def test_layer_block_names_every_package() -> None:
    documented = set().union(*documented_layers())
    packages = {p.name for p in SRC.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert documented == packages


def test_every_import_points_down() -> None:
    level = {name: i for i, layer in enumerate(documented_layers()) for name in layer}
    upward = [
        f"{where}: heed.{me} imports heed.{other}"
        for me, other, where in package_imports()
        if level[other] >= level[me]
    ]
    assert upward == []


def test_the_check_sees_an_upward_import() -> None:
    # the same rule on a hand-made case: train (level 7) importing demo (level 9) is upward
    level = {name: i for i, layer in enumerate(documented_layers()) for name in layer}
    assert level["demo"] > level["train"] > level["algos"] == level["config"]


SHARED_TRAIN_MODULES = {"common", "loop", "collective", "reference"}


def test_no_trainer_imports_another() -> None:
    # the trainers share heed.train.common / loop / collective / reference and the layers below, never each other
    trainers = {p.stem for p in (SRC / "train").glob("*.py")} - SHARED_TRAIN_MODULES - {"__init__"}
    found = []
    for name in sorted(trainers):
        path = SRC / "train" / f"{name}.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module:
                bits = node.module.split(".")
                if bits[:2] == ["heed", "train"] and len(bits) > 2 and bits[2] in trainers - {name}:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: imports {node.module}")
    assert found == []
