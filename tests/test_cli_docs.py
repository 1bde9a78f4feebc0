"""The command-line tools' help texts say what the docs say: the usage line names the command a user
types (`python -m jedi_jax.X`, not `X.py`), and the commands in a module docstring keep their line
continuations (a backslash-newline in a non-raw docstring joins the two lines in `--help`).

Static (the source, not a subprocess per tool): one file read each, no jax import.
"""
import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODULES = sorted(p for p in (REPO / "jedi_jax").rglob("*.py") if "__pycache__" not in p.parts)


def _module(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] in ("__init__", "__main__") else parts)


def _argparse_tools():
    return [p for p in MODULES if "argparse.ArgumentParser(" in p.read_text()]


def test_there_are_argparse_tools_to_check():
    assert len(_argparse_tools()) >= 10  # demo, sample, convert, export, average, the eval tools, ...


@pytest.mark.parametrize("path", _argparse_tools(), ids=lambda p: p.relative_to(REPO).as_posix())
def test_usage_line_names_the_python_m_command(path):
    """Every ArgumentParser of a tool sets prog to the `python -m` command of its own module."""
    src = path.read_text()
    calls = re.findall(r"argparse\.ArgumentParser\((.*?)\)", src, flags=re.S)
    progs = [re.search(r'prog="([^"]+)"', c) for c in calls]
    assert progs and all(progs), f"{path.name}: an ArgumentParser without prog= (its usage line says {path.name})"
    assert {m.group(1) for m in progs} == {f"python -m {_module(path)}"}, [m.group(1) for m in progs]


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_docstring_line_continuations_survive(path):
    src = path.read_text()
    tree = ast.parse(src)
    if not (tree.body and isinstance(tree.body[0], ast.Expr) and isinstance(tree.body[0].value, ast.Constant)
            and isinstance(tree.body[0].value.value, str)):
        return  # no module docstring
    literal = ast.get_source_segment(src, tree.body[0].value)
    if "\\\n" in literal:
        assert literal.startswith(("r", "R")), f"{path.name}: a backslash-newline in a non-raw docstring"
