"""The class material names real things: every `module.function` in docs/glossary.md, docs/reading.md and
docs/exercises.md is defined in that module, and every flag the exercises turn is one the short file takes."""
import ast
import os
import re

from conftest import ROOT

MODULES = {"common": "common.py", "pairrm": "pairrm.py", "rank": "rank.py", "train_sppo": "train_sppo.py",
           "evaluate": "evaluate.py", "generate": "generate.py", "logps": "logps.py", "world": "examples/tiny/world.py"}
DOCS = ("docs/glossary.md", "docs/reading.md", "docs/exercises.md")


def defined(path):
    """Top-level functions and classes of a Python file."""
    tree = ast.parse(open(os.path.join(ROOT, path)).read())
    return {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}


def test_named_functions_exist():
    named = set()
    for doc in DOCS:
        text = open(os.path.join(ROOT, doc)).read()
        named |= {(m, f) for m, f in re.findall(r"`(?:examples/tiny/)?(\w+)(?:\.py)?\.(\w+)", text) if m in MODULES and f != "py"}
    assert len(named) > 15  # the three pages name about twenty
    missing = [f"{m}.{f}" for m, f in sorted(named) if f not in defined(MODULES[m])]
    assert not missing, f"named in the docs, not defined: {missing}"


def test_exercise_flags_exist():
    text = open(os.path.join(ROOT, "docs/exercises.md")).read()
    flags = set(re.findall(r"python examples/sppo_in_one_file\.py([^\n`]*)", text))
    used = {f for line in flags for f in re.findall(r"--[\w-]+", line)}
    source = open(os.path.join(ROOT, "examples/sppo_in_one_file.py")).read()
    assert {"--select", "--fresh-reference", "--eta", "--loss", "--out"} <= used
    assert all(f'"{f}"' in source for f in used), used
