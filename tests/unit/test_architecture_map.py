"""ARCHITECTURE.md is the one map (issue 29, item 7), and it cannot go stale either way: every module of the
project's packages is named in it, and every path (or ``module.name``) it names exists."""

from __future__ import annotations

import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MAP = ROOT / "ARCHITECTURE.md"
#: the project's packages (``pyproject.toml``'s ``packages.find``); ``triton_models/python`` (model sources copied
#: into repositories) is a folder of ``triton_models``
PACKAGES = ("glad_runtime", "glad_cli", "export", "training", "calib", "bench", "triton_models")
#: folders that are neither the project's code nor its files (caches, environments, outputs, builds, the team's
#: shared references)
SKIP = {".git", ".venv", "venv", ".pytest_cache", ".ruff_cache", ".mypy_cache", "__pycache__", "runs", "build",
        "dist", "node_modules", "shared"}
#: what a named file may end with (anything else after a dot is a module's attribute: ``core/images.load_image``)
FILE_SUFFIXES = (".py", ".md", ".json", ".jsonl", ".toml", ".txt", ".yaml", ".yml", ".cfg", ".sh", ".pbtxt",
                 ".onnx", ".plan", ".png", ".csv", ".html", ".safetensors")


def _tree() -> tuple[set[str], set[str]]:
    """(files, folders) of the checkout, relative POSIX paths, without the :data:`SKIP` folders (pruned, so the
    walk never enters ``.venv``)."""
    files, dirs = set(), set()
    for here, subdirs, names in os.walk(ROOT):
        subdirs[:] = [d for d in subdirs if d not in SKIP and not d.endswith(".egg-info")]
        rel = Path(here).relative_to(ROOT)
        dirs.update((rel / d).as_posix() for d in subdirs)
        files.update((rel / n).as_posix() for n in names)
    return files, dirs


def _modules(files: set[str]) -> list[str]:
    """Every ``.py`` file of the project's packages (tests aside)."""
    return sorted(f for f in files if f.endswith(".py") and f.split("/")[0] in PACKAGES)


def _code_spans(text: str) -> list[str]:
    return re.findall(r"`([^`\n]+)`", text)


def _expand(token: str) -> list[str]:
    """``a/{x, y}`` -> ``a/x``, ``a/y``."""
    m = re.fullmatch(r"(.*)\{([^{}]*)\}(.*)", token)
    if not m:
        return [token]
    return [t for part in m.group(2).split(",") for t in _expand(m.group(1) + part.strip() + m.group(3))]


def _rows(text: str) -> list[list[str]]:
    """The body rows of the Markdown tables, as lists of cells."""
    rows = []
    for line in text.splitlines():
        if line.startswith("|") and not re.fullmatch(r"\|[-| :]+\|", line.strip()):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def _named(module_path: str, text: str) -> bool:
    """A module is named by its path (``glad_runtime/core/images.py``) or dotted name anywhere, or by its file name
    or stem (``images``) in a table row whose "where" cell names its folder (``glad_runtime/core/``). A package's
    ``__init__.py`` is named with its folder."""
    module = Path(module_path)
    spans = {t for s in _code_spans(text) for t in _expand(s)}
    path, dotted = module.as_posix(), ".".join(module.with_suffix("").parts)
    folder = module.parent.as_posix() + "/"
    if module.name == "__init__.py":
        return folder in spans or module.parent.as_posix() in spans or path in spans
    if path in spans or dotted in spans:
        return True
    for cells in _rows(text):
        if len(cells) >= 2 and folder in _code_spans(cells[1]):
            row = {t for c in cells for s in _code_spans(c) for t in _expand(s)}
            if module.stem in row or module.name in row:
                return True
    return False


def test_every_module_is_on_the_map():
    text = MAP.read_text()
    missing = [m for m in _modules(_tree()[0]) if not _named(m, text)]
    assert missing == [], (f"ARCHITECTURE.md does not name {missing}: add each, with its purpose, to the table "
                           f"row of its package")


def test_every_package_with_code_is_known():
    """A new top-level folder of Python code is a new package of the project: it goes into PACKAGES and the map."""
    tops = {f.split("/")[0] for f in _tree()[0] if f.endswith(".py") and "/" in f} - {"tests"}
    assert tops <= set(PACKAGES), sorted(tops - set(PACKAGES))


def _defines(source: str, name: str) -> bool:
    return re.search(rf"^\s*(?:async\s+def|def|class)\s+{re.escape(name)}\b|^\s*{re.escape(name)}\s*[:=]",
                     source, re.M) is not None


def _stale(token: str, files: set[str], dirs: set[str], stems: dict[str, list[str]]) -> str | None:
    """Why ``token`` (one code span) names nothing, or None (it exists, or is not a path)."""

    def exists(rel: str, kinds: tuple[set[str], ...]) -> list[str]:  # the checkout's paths equal to or ending in rel
        return [p for kind in kinds for p in kind if p == rel or p.endswith("/" + rel)]

    token = re.sub(r"\(.*\)$", "", token)  # core/calibration.label(score, ...): the name called
    if not re.fullmatch(r"[A-Za-z0-9_.\-/]+", token) or token.startswith(("-", "/")) or "//" in token:
        return None
    if "/" in token:
        if token.endswith("/"):
            return None if exists(token.rstrip("/"), (dirs,)) else "no such folder"
        head, _, last = token.rpartition("/")
        if last.endswith(FILE_SUFFIXES) or "." not in last:
            if exists(token, (files, dirs)) or exists(token + ".py", (files,)):
                return None
            return "no such file or folder"
        stem, *attrs = last.split(".")  # core/images.load_image: a module and a name defined in it
        candidates = exists(f"{head}/{stem}.py", (files,))
    else:
        parts = token.split(".")
        if token.endswith(".py"):
            return None if exists(token, (files,)) else "no such file"
        if token.endswith(FILE_SUFFIXES):
            return None
        if len(parts) < 2 or not all(p.isidentifier() for p in parts):
            return None
        if parts[0] in PACKAGES:  # glad_runtime.core.images[.name]: the longest module prefix, then names
            for k in range(len(parts), 0, -1):
                rel = "/".join(parts[:k])
                if rel + ".py" in files or (rel in dirs and rel + "/__init__.py" in files):
                    candidates = [rel + ".py" if rel + ".py" in files else rel + "/__init__.py"]
                    attrs = parts[k:]
                    break
            else:
                return "no such module"
        elif parts[0] in stems:  # protocol.to_wire, glad_bls.Served.response: a module by its stem, then names
            candidates, attrs = stems[parts[0]], parts[1:]
        else:
            return None  # Detector.open, GladClient.stream: a class's attribute, not a path
    if not candidates:
        return "no such module"
    sources = [(ROOT / c).read_text() for c in candidates]
    for a in attrs:
        if not any(_defines(s, a) for s in sources):
            return f"{a!r} is not defined in {candidates}"
    return None


def test_every_path_on_the_map_exists():
    """Backticked paths (``pkg/sub/``, ``core/images.py``, relative to the checkout or to any folder in it),
    module names with what they define (``core/calibration.label``, ``protocol.glad_output_arrays``,
    ``glad_runtime.serving.client``): each must exist, so a rename or a removal updates the map."""
    files, dirs = _tree()
    stems: dict[str, list[str]] = {}
    for f in sorted(files):
        if f.endswith(".py") and not f.startswith("tests/") and not f.endswith("__init__.py"):
            stems.setdefault(Path(f).stem, []).append(f)
    stale = {}
    for span in _code_spans(MAP.read_text()):
        for token in _expand(span):
            why = _stale(token, files, dirs, stems)
            if why:
                stale[token] = why
    assert stale == {}, f"ARCHITECTURE.md names what does not exist: {stale}"


#: the runtime's layers as the map states them, in order: a module imports only its own layer and those before it
LAYERS = {"errors": 0, "core": 1, "engines": 2, "pipeline": 3, "detector": 4, "output": 5, "render": 5}
#: ``serving`` (contract, routing, client SDK) needs only these, so the client installs light
SERVING_NEEDS = {"errors", "core", "serving"}


def test_runtime_layers_import_as_the_map_says():
    """The layer rule of ARCHITECTURE.md, for every import in ``glad_runtime`` (module level or in a function):
    errors, core, engines, pipeline, the facade, the output, each importing only what comes before it; ``serving``
    only errors and core; ``engines/triton.py`` the one engine that imports ``serving``."""
    import ast

    bad = []
    for path in sorted((ROOT / "glad_runtime").rglob("*.py")):
        rel = path.relative_to(ROOT / "glad_runtime")
        me = rel.with_suffix("").parts[0]
        if me == "__init__":
            continue
        if me not in LAYERS and me != "serving":
            bad.append(f"glad_runtime/{rel.as_posix()}: in no layer of the map (ARCHITECTURE.md and LAYERS)")
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                parts = name.split(".")
                if parts[0] != "glad_runtime" or len(parts) < 2:
                    continue
                to = parts[1]
                if me == "serving":
                    ok = to in SERVING_NEEDS
                elif to == "serving":
                    ok = rel.as_posix() == "engines/triton.py"
                else:
                    ok = to in LAYERS and LAYERS[to] <= LAYERS[me]
                if not ok:
                    bad.append(f"glad_runtime/{rel.as_posix()}:{node.lineno} imports {name}")
    assert bad == [], bad


def test_readme_and_package_docstring_point_to_the_map():
    """One map: the README and the package docstring link to ARCHITECTURE.md and hold no layout table of their own."""
    import glad_runtime

    readme = (ROOT / "README.md").read_text()
    assert "ARCHITECTURE.md" in readme and "ARCHITECTURE.md" in (glad_runtime.__doc__ or "")
    assert "| `glad_runtime/core/` |" not in readme
    assert len((glad_runtime.__doc__ or "").splitlines()) <= 8
