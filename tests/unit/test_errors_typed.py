"""Errors that reach a user are :class:`~glad_runtime.errors.GladError` subclasses (issue 29, item 8).

The project's own source is read with ``ast``: a ``raise`` of a builtin exception class (``ValueError``,
``RuntimeError``, ``FileNotFoundError``, ...) is refused outside :data:`ALLOWED`, the few places where it reports a
programming error or is a Python protocol, never something a CLI user, SDK caller or served request can cause. A
new user-facing check raises the fitting class of ``glad_runtime/errors.py`` instead (each also derives from the
builtin it replaces, so ``except ValueError`` callers keep working).
"""

from __future__ import annotations

import ast
import builtins
from pathlib import Path

import pytest

from glad_runtime import errors

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("glad_runtime", "glad_cli", "export", "training", "calib", "triton_models", "bench")

#: every builtin ``Exception`` class but the iteration protocol's (``KeyboardInterrupt`` / ``SystemExit`` are
#: ``BaseException`` only: an interrupt and an exit status are not errors)
BUILTIN_ERRORS = frozenset(name for name, obj in vars(builtins).items()
                           if isinstance(obj, type) and issubclass(obj, Exception)) \
    - {"StopIteration", "StopAsyncIteration"}

#: ``(file, function) -> the builtin raised there``: programming errors and protocols, each with its reason
ALLOWED = {
    # the module __getattr__ protocol (lazy re-exports): an unknown attribute is an AttributeError
    ("glad_runtime/__init__.py", "__getattr__"): "AttributeError",
    ("glad_runtime/engines/__init__.py", "__getattr__"): "AttributeError",
    # abstract methods: each backend / each client flavour implements them
    ("glad_runtime/engines/base.py", "GraphEngines._run_graph"): "NotImplementedError",
    ("glad_runtime/serving/client/core.py", "ClientCore._sleep"): "NotImplementedError",
    # invariants of a library's output size (scipy zoom, torch interpolate): a bug if ever raised
    ("glad_runtime/core/scoring.py", "resize_bilinear"): "AssertionError",
    ("export/models.py", "dino_interpolate_pos_embed"): "ValueError",
    # a lookup of a replica the pool itself handed out (the mapping protocol)
    ("glad_runtime/serving/routing.py", "Pool._find"): "KeyError",
    # the object used out of order (score before fit): the calling code's bug
    ("training/knn.py", "KnnBaseline.score"): "RuntimeError",
}


def _builtin_raises(path: Path) -> list[tuple[str, str, int]]:
    """``(qualified function, builtin class, line)`` of each ``raise <Builtin>`` / ``raise <Builtin>(...)``."""
    found: list[tuple[str, str, int]] = []

    def visit(node: ast.AST, scope: tuple[str, ...]) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                visit(child, scope + (child.name,))
                continue
            if isinstance(child, ast.Raise) and child.exc is not None:
                exc = child.exc.func if isinstance(child.exc, ast.Call) else child.exc
                name = exc.id if isinstance(exc, ast.Name) else \
                    exc.attr if isinstance(exc, ast.Attribute) and getattr(exc.value, "id", "") == "builtins" else None
                if name in BUILTIN_ERRORS:
                    found.append((".".join(scope) or "<module>", name, child.lineno))
            visit(child, scope)

    visit(ast.parse(path.read_text(), str(path)), ())
    return found


def _project_raises() -> dict[tuple[str, str], list[tuple[str, int]]]:
    out: dict[tuple[str, str], list[tuple[str, int]]] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            for function, name, line in _builtin_raises(path):
                out.setdefault((rel, function), []).append((name, line))
    return out


def test_no_untyped_user_facing_raise():
    raises = _project_raises()
    bad = [f"{file}:{line} {function}: raise {name}" for (file, function), sites in raises.items()
           for name, line in sites if ALLOWED.get((file, function)) != name]
    assert not bad, ("raise a GladError subclass (glad_runtime/errors.py) for what a user can cause; a programming "
                     "error may stay a builtin, listed in ALLOWED with its reason:\n  " + "\n  ".join(bad))


def test_allow_list_is_current():
    raises = _project_raises()
    stale = [f"{file} {function}: {name}" for (file, function), name in ALLOWED.items()
             if name not in {n for n, _ in raises.get((file, function), [])}]
    assert not stale, f"ALLOWED names sites that no longer raise these: {stale}"


def test_the_scan_sees_raises(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("class A:\n    def f(self):\n        raise ValueError('x')\n\n"
                   "def g():\n    raise builtins.KeyError\n\n"
                   "def h():\n    raise UsageError('typed')\n\n"
                   "def i():\n    raise KeyboardInterrupt\n")
    assert _builtin_raises(src) == [("A.f", "ValueError", 3), ("g", "KeyError", 6)]


@pytest.mark.parametrize("cls, builtin", [(errors.PathNotFoundError, FileNotFoundError),
                                          (errors.PathNotFoundError, errors.UsageError),
                                          (errors.UsageError, ValueError), (errors.InvalidInputError, ValueError),
                                          (errors.EngineSpecError, errors.UsageError)])
def test_typed_errors_keep_their_builtin(cls, builtin):
    """Callers written against the builtins (``except FileNotFoundError``, ``pytest.raises(ValueError)``) keep
    working, and the CLI's exit code follows the class (2 for a UsageError)."""
    assert issubclass(cls, builtin) and issubclass(cls, errors.GladError)
    assert str(cls("no such file or folder: x.png")) == "no such file or folder: x.png"
