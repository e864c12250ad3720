"""The files, code names and doc sections that the docs and docstrings cite exist.

Scanned: README.md, docs/*.md, and the docstrings, comments (consecutive
comment lines as one text) and argparse ``help=`` strings of every .py file
under dsu_models/, pipelines/, benchmarks/ and tests/. The rules, each next to
its regex below:

* A path under a top folder (dsu_models/, pipelines/, benchmarks/, tests/,
  docs/, tune_spaces/, .ci/) or a root file (README.md, pyproject.toml,
  ray_cluster.yaml, serve_config.yaml) exists. Placeholders are skipped
  (PLACEHOLDER), and so are paths a run writes (GENERATED).
* A bare or partial source file name (``trial.py``, ``nn/native.py``; .py, .md,
  .c, .sh, .html) names exactly one file of the repo, or one under a folder
  cited earlier on the same line (a docs table row); else it is missing or
  ambiguous.
* A dotted name under ``dsu_models.`` / ``pipelines.`` (``module:attr`` too)
  resolves: its longest module prefix is a file of the repo, the rest is bound
  there (read with ``ast``; classes followed into; lazy PEP 562 exports
  counted), else the module is imported and the rest got with getattr.
* A backticked name right after a .py file or a module, in one of two shapes,
  ``FILE's `name``` or ``FILE`, `name```, is defined in that file (a def,
  class, assignment target, argument or import at any level).
* A Sphinx role in a docstring (``:func:`broken_references```,
  ``:meth:`Chunk.line_at```) names something defined or imported in its file,
  or in the sibling module it starts with (``common.as_if_frozen`` in
  dsu_models/stages/).
* A section cited right after a doc file, as ``FILE, "Title"`` (or ``FILE
  "Title"``, ``FILE ("Title")``), ``FILE's Title section`` or ``FILE section
  N``, is a heading of that file: any level, outside code fences, a bold title
  opening a paragraph counting as one; the cited title a prefix of it.

All broken references are reported in one failure, as ``file:line: reference:
why``. It reads text and ``ast`` only; a module is imported only where a name
is not bound in its source, and that must not start Ray.
"""
from __future__ import annotations

import ast
import importlib
import io
import os
import re
import sys
import tokenize
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOP_FOLDERS = ("dsu_models", "pipelines", "benchmarks", "tests", "docs", "tune_spaces", ".ci")
ROOT_FILES = ("README.md", "pyproject.toml", "ray_cluster.yaml", "serve_config.yaml")
SCANNED_PY = ("dsu_models", "pipelines", "benchmarks", "tests")
PACKAGES = ("dsu_models", "pipelines")
# folders a run writes (.gitignore): cited as where output goes, absent in a checkout
GENERATED = ("benchmarks/out",)
# a bare or partial file name is checked only for these: a bare .yaml/.json/.pt
# name is nearly always a file a run writes (config.yaml, best_config.yaml,
# manifest.json, handoff.pt), not one of the repo's
SOURCE_EXTS = (".py", ".md", ".c", ".sh", ".html")


@dataclass(frozen=True)
class Chunk:
    """A piece of documentation text: ``path`` (repo-relative), the line its text starts on."""
    path: str
    line: int
    text: str

    def line_at(self, pos: int) -> int:
        return self.line + self.text.count("\n", 0, pos)


# ---------------------------------------------------------------- what is scanned

def _py_files() -> list[Path]:
    return sorted(p for top in SCANNED_PY for p in (ROOT / top).rglob("*.py")
                  if "__pycache__" not in p.parts)


def _py_chunks(path: Path) -> list[Chunk]:
    rel, src = path.relative_to(ROOT).as_posix(), path.read_text()
    chunks = []
    tree = ast.parse(src)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            first = node.body[0] if node.body else None
            if (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                    and isinstance(first.value.value, str)):
                chunks.append(Chunk(rel, first.value.lineno, first.value.value))
        elif isinstance(node, ast.keyword) and node.arg == "help":
            if isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
                chunks.append(Chunk(rel, node.value.lineno, node.value.value))
    # consecutive comment lines are one chunk, so a reference may wrap across them
    lines: list[tuple[int, str]] = []
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            lines.append((tok.start[0], tok.string.lstrip("#").strip()))
    block: list[tuple[int, str]] = []
    for lineno, text in lines + [(-10, "")]:
        if block and lineno != block[-1][0] + 1:
            chunks.append(Chunk(rel, block[0][0], "\n".join(t for _, t in block)))
            block = []
        block.append((lineno, text))
    return chunks


def doc_chunks() -> list[Chunk]:
    mds = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    chunks = [Chunk(p.relative_to(ROOT).as_posix(), 1, p.read_text()) for p in mds]
    for path in _py_files():
        chunks += _py_chunks(path)
    return chunks


@lru_cache(maxsize=None)
def repo_files() -> tuple[str, ...]:
    """Repo-relative paths of the files a bare or partial file name may mean."""
    out = [f for f in ROOT_FILES if (ROOT / f).is_file()]
    for top in TOP_FOLDERS:
        for dirpath, dirnames, filenames in os.walk(ROOT / top):
            rel = Path(dirpath).relative_to(ROOT).as_posix()
            dirnames[:] = [d for d in dirnames if d != "__pycache__" and f"{rel}/{d}" not in GENERATED]
            out += [f"{rel}/{f}" for f in filenames]
    return tuple(sorted(out))


# ---------------------------------------------------------------- file paths

# A path token: path characters between non-path ones. Not preceded by a path
# character, "$", "~", ":" or "@" (so $DSU_HOME/tune, s3://BUCKET/x and
# /tmp/dsu-fresh are not read from their middle).
PATH_TOKEN = re.compile(r"(?<![\w./\-$~:@<>*{}])([\w.<>*{}\-]+(?:/[\w.<>*{}\-]*)+"
                        r"|[\w\-]+\.(?:py|md|c|sh|html)(?![\w.]))")
# Placeholders, not files: <stage>, <name>, <dataset> (angle brackets), docs/*.md
# (globs), {name} (format fields), dsu_models/... (elided), and an upper-case
# segment: X.yaml, NAME, DIR, ROOT, W (the folder of docs/inputs.md's examples),
# BUCKET, PARENT_RUN_ID. Paths that never start with a top folder (DIR/stage1,
# $DSU_HOME/tune, prepared/mine, /tmp/...) are not checked at all.
PLACEHOLDER = re.compile(r"[<>*{}]|\.\.\.|(?:^|/)[A-Z][A-Z_]*(?:\.\w+)?(?:/|$)")


def resolve_file(ref: str, chunk: Chunk, pos: int) -> tuple[str | None, str | None]:
    """(the repo file ``ref`` means, or None; why not, or None when it is not checked)."""
    ref = ref.removeprefix("./")
    if ref.rstrip(".") in ROOT_FILES:
        ref = ref.rstrip(".")
        return (ref, None) if (ROOT / ref).is_file() else (None, "no such file")
    if PLACEHOLDER.search(ref) or ref.startswith("../"):  # a path above the repository: not ours to check
        return None, None
    ref = ref.rstrip(".-")  # the full stop of a sentence
    if ref.split("/")[0] in TOP_FOLDERS:
        if any(ref == g or ref.startswith(g + "/") for g in GENERATED):
            return None, None
        return (ref, None) if (ROOT / ref).exists() else (None, "no such path")
    if not ref.endswith(SOURCE_EXTS):
        return None, None
    hits = [f for f in repo_files() if f == ref or f.endswith("/" + ref)]
    if len(hits) == 1:
        return hits[0], None
    if len(hits) > 1:
        # a folder cited earlier on the same line says which (a table row
        # "| `pipelines/data/` | `loading.py` ...")
        start = chunk.text.rfind("\n", 0, pos) + 1
        for folder in re.findall(r"((?:%s)/[\w/]*?)/?`" % "|".join(map(re.escape, TOP_FOLDERS)),
                                 chunk.text[start:pos]):
            if f"{folder.rstrip('/')}/{ref}" in hits:
                return f"{folder.rstrip('/')}/{ref}", None
        return None, "ambiguous: " + ", ".join(hits)
    return None, "no such file in the repo"


# ---------------------------------------------------------------- code names

@lru_cache(maxsize=None)
def _tree(rel: str) -> ast.Module:
    return ast.parse((ROOT / rel).read_text())


def _bound(body: list[ast.stmt]) -> set[str]:
    """Names a module or class body binds, through if/try/with/for but not into defs."""
    names: set[str] = set()
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
            continue
        for sub in ast.walk(node):
            if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Store):
                names.add(sub.id)
            elif isinstance(sub, ast.alias):
                names.add((sub.asname or sub.name).split(".")[0])
            elif isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(sub.name)
    if "__getattr__" in names:
        # lazy exports (PEP 562, as dsu_models/data/__init__.py has them): the
        # names listed in the module's tables, read without importing it
        names |= {c.value for node in body if not isinstance(node, ast.FunctionDef)
                  for c in ast.walk(node)
                  if isinstance(c, ast.Constant) and isinstance(c.value, str) and c.value.isidentifier()}
    return names


@lru_cache(maxsize=None)
def defined_anywhere(rel: str) -> frozenset[str]:
    """Every name a file defines at any level: defs, classes, assignment targets
    (``self.x`` too), arguments, imports."""
    names: set[str] = set()
    for node in ast.walk(_tree(rel)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, ast.alias):
            names.add((node.asname or node.name).split(".")[0])
    return frozenset(names)


def module_name(rel: str) -> str | None:
    """``dsu_models/data/__init__.py`` -> ``dsu_models.data``; None outside the packages."""
    if rel.split("/")[0] not in PACKAGES:
        return None
    return rel.removesuffix(".py").removesuffix("/__init__").replace("/", ".")


@lru_cache(maxsize=None)
def imported(rel: str) -> dict[str, str]:
    """The names a file binds by import -> what they are (``p`` -> ``pipelines.serving.protocol``)."""
    package = (module_name(rel) or "").rsplit(".", 0 if rel.endswith("__init__.py") else 1)[0]
    out = {}
    for node in ast.walk(_tree(rel)):
        if isinstance(node, ast.Import):
            for a in node.names:
                out[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            for a in node.names:
                out[a.asname or a.name] = f"{base}.{a.name}"
    return out


def resolve_in_file(rel: str, name: str) -> str | None:
    """Why ``name`` (``x`` or ``x.y``), cited in file ``rel``, names nothing there, or None.

    ``x`` is defined in the file (its rest: defined there too), or imported
    (its rest: resolved where it comes from; not checked when that is outside
    the repo, as ``mlflow.models.set_model``), or a sibling module
    (``common.as_if_frozen`` in dsu_models/stages/stage1.py), or, in a package
    module, got from the module (lazy exports)."""
    first, *rest = name.split(".")
    where = imported(rel).get(first)
    if where is not None:
        if where.split(".")[0] not in PACKAGES:
            return None
        return resolve_dotted(".".join([where, *rest]))
    if first in defined_anywhere(rel):
        missing = [part for part in rest if part not in defined_anywhere(rel)]
        return f"{rel} defines no {missing[0]}" if missing else None
    sibling = f"{rel.rsplit('/', 1)[0]}/{first}.py"
    if rest and (ROOT / sibling).is_file():
        if module_name(sibling):
            return resolve_dotted(".".join([module_name(sibling), *rest]))
        return None if _static_attr(sibling, rest) else f"{sibling} defines no {'.'.join(rest)}"
    if module_name(rel) and rel.endswith("__init__.py"):
        return resolve_dotted(f"{module_name(rel)}.{name}")
    return f"{rel} defines no {first}"


def module_file(dotted: str) -> str | None:
    base = dotted.replace(".", "/")
    for rel in (base + ".py", base + "/__init__.py"):
        if (ROOT / rel).is_file():
            return rel
    return base + "/" if (ROOT / base).is_dir() else None  # a namespace package


def _static_attr(rel: str, attrs: list[str]) -> bool:
    """Whether ``attrs`` (a name, then names inside the class it names) are bound in ``rel``."""
    body = _tree(rel).body
    for i, name in enumerate(attrs):
        if name not in _bound(body):
            return False
        cls = [n for n in body if isinstance(n, ast.ClassDef) and n.name == name]
        if i < len(attrs) - 1:
            if not cls:
                return False
            body = cls[0].body
    return True


def resolve_dotted(dotted: str) -> str | None:
    """Why ``dotted`` (``pkg.module[.attr...]``) does not resolve, or None.

    The longest prefix that is a module of the repo is the module; the rest
    must be bound in its source (ast), else the module is imported and the rest
    got with getattr (a name built at import time, a re-export by ``*``)."""
    parts = dotted.split(".")
    for n in range(len(parts), 0, -1):
        rel = module_file(".".join(parts[:n]))
        if rel is not None:
            break
    else:
        return "no such module"
    attrs = parts[n:]
    if not attrs:
        return None
    if rel.endswith(".py") and _static_attr(rel, attrs):
        return None
    # Ray may already run in this test session (other tests' fixture): only a start caused
    # by this import counts
    ray_was_up = "ray" in sys.modules and sys.modules["ray"].is_initialized()
    try:
        obj = importlib.import_module(".".join(parts[:n]))
        for name in attrs:
            obj = getattr(obj, name)
    except Exception as e:  # an import error is as broken as a missing name
        return f"{'.'.join(parts[:n])} has no {'.'.join(attrs)} ({type(e).__name__}: {e})"
    finally:
        ray = sys.modules.get("ray")
        started = ray is not None and ray.is_initialized() and not ray_was_up
        assert not started, f"importing {dotted} started Ray"
    return None


# ---------------------------------------------------------------- doc sections

def _norm(title: str) -> str:
    return " ".join(title.replace("`", "").replace("*", "").split()).casefold()


@lru_cache(maxsize=None)
def headings(rel: str) -> tuple[str, ...]:
    """The headings of a markdown file, any level, outside code fences, and the
    bold run-in titles that open a paragraph ("**The fine bar on sprites: ...**
    (2026-12-07) ..."): the docs title their subsections so and cite them like
    headings."""
    out, fenced = [], False
    text = (ROOT / rel).read_text()
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"#{1,6}\s", line):
            out.append(_norm(line.lstrip("#")))
        elif not fenced and line.startswith("**") and (i == 0 or not lines[i - 1].strip()):
            bold = re.match(r"\*\*(.+?)\*\*", "\n".join(lines[i:i + 3]), re.S)
            if bold:
                out.append(_norm(bold.group(1)))
    return tuple(out)


def has_heading(rel: str, title: str) -> bool:
    """A heading starts with ``title``, its section number ("11. ") aside."""
    title = _norm(title)
    return any(h.startswith(title) or re.sub(r"^\d+\.\s*", "", h).startswith(title)
               for h in headings(rel))


def has_numbered(rel: str, number: str) -> bool:
    return any(re.match(rf"{number}\.\s", h) for h in headings(rel))


# ---------------------------------------------------------------- the check

DOTTED = re.compile(r"(?<![\w./\-])((?:%s)(?:\.[A-Za-z_]\w*)+)(?::([A-Za-z_]\w*))?" % "|".join(PACKAGES))
README = re.compile(r"(?<![\w./\-])README\b(?!\.md)")
# A backticked name cited right after a .py file or a module: "FILE's `name`" or
# "FILE`, `name`" (the file itself optionally backticked). Only these two
# shapes: a name further away in the sentence may belong to something else.
IDENT = r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*"
NAME_AFTER = re.compile(r"`{0,2}(?:'s|,)[ \t]*\n?[ \t]*(`{1,2})(%s)(?:\(\))?\1(?!`)" % IDENT)
# A doc section cited right after a doc file (backticked, or the target of a
# markdown link "[x](FILE)"): 'FILE, "Title"' (also 'FILE "Title"', 'FILE
# ("Title")' and 'FILE section 11, "Title"'), "FILE's Title section", "FILE
# section 7" / "sections 3, 5 and 9" / "sections 7-9". A title is matched only
# in quotes or before "section": unquoted prose after a file name is not a title.
NUMBERS = r"\d+(?:\s*(?:,|and|-|to)\s*\d+)*"
CLOSE = r"[`)]?"
SECTION_QUOTED = re.compile(r"%s(?:\s+sections?\s+%s)?,?\s+\(?\"([^\"]+)\"" % (CLOSE, NUMBERS))
SECTION_NAMED = re.compile(r"%s's\s+([A-Z][\w' -]*?)\s+section\b" % CLOSE)
SECTION_NUMBERED = re.compile(r"%s,?\s+sections?\s+(%s)" % (CLOSE, NUMBERS))

# A Sphinx cross-reference in a docstring (the func, class, meth, data, attr,
# exc and obj roles) names something of the file it is in: see resolve_in_file.
# A full dotted one (under dsu_models. or pipelines.) is checked as a dotted name.
SPHINX_ROLE = re.compile(r":(?:func|class|meth|data|attr|exc|obj):`~?(%s)(?:\(\))?`" % IDENT)


def _check_names_after(chunk: Chunk, end: int, rel: str, ref: str, errors: list[str]) -> None:
    m = NAME_AFTER.match(chunk.text, end)
    if m is None:
        return
    name = m.group(2)
    # a list of files ("`full.py`, `stage.py`") or of modules, not a name in the first
    if name.endswith(SOURCE_EXTS) or name.split(".")[0] in PACKAGES:
        return
    if rel.endswith(".py"):
        missing = [part for part in name.split(".") if part not in defined_anywhere(rel)]
        if missing:
            errors.append(f"{chunk.path}:{chunk.line_at(m.start(2))}: {ref} `{name}`: "
                          f"{rel} defines no {missing[0]}")
    elif rel.endswith("/"):
        why = resolve_dotted(ref + "." + name)
        if why:
            errors.append(f"{chunk.path}:{chunk.line_at(m.start(2))}: {ref} `{name}`: {why}")


def _check_sections(chunk: Chunk, end: int, rel: str, ref: str, errors: list[str]) -> None:
    where = f"{chunk.path}:{chunk.line_at(end)}: {ref}"
    m = SECTION_QUOTED.match(chunk.text, end)
    if m and not has_heading(rel, m.group(1)):
        errors.append(f'{where}, "{" ".join(m.group(1).split())}": no such heading in {rel}')
    m = SECTION_NAMED.match(chunk.text, end)
    if m and not has_heading(rel, m.group(1)):
        errors.append(f"{where}'s {m.group(1)} section: no such heading in {rel}")
    m = SECTION_NUMBERED.match(chunk.text, end)
    if m:
        numbers = [int(n) for n in re.findall(r"\d+", m.group(1))]
        if re.search(r"-|to", m.group(1)) and len(numbers) == 2:
            numbers = list(range(numbers[0], numbers[1] + 1))
        for n in numbers:
            if not has_numbered(rel, str(n)):
                errors.append(f"{where} section {n}: no heading numbered {n} in {rel}")


def broken_references(chunks: list[Chunk]) -> list[str]:
    errors: list[str] = []
    for chunk in chunks:
        text = chunk.text
        for m in PATH_TOKEN.finditer(text):
            rel, why = resolve_file(m.group(1), chunk, m.start())
            if why:
                errors.append(f"{chunk.path}:{chunk.line_at(m.start())}: {m.group(1)}: {why}")
            elif rel and rel.endswith(".py"):
                _check_names_after(chunk, m.end(), rel, m.group(1), errors)
            elif rel and rel.endswith(".md"):
                _check_sections(chunk, m.end(), rel, m.group(1), errors)
        for m in SPHINX_ROLE.finditer(text):
            name = m.group(1)
            if chunk.path.endswith(".py") and not name.startswith(tuple(p + "." for p in PACKAGES)):
                why = resolve_in_file(chunk.path, name)
                if why:
                    errors.append(f"{chunk.path}:{chunk.line_at(m.start())}: {m.group(0)}: {why}")
        for m in README.finditer(text):
            _check_sections(chunk, m.end(), "README.md", "README", errors)
        for m in DOTTED.finditer(text):
            dotted = m.group(1) + (f".{m.group(2)}" if m.group(2) else "")
            why = resolve_dotted(dotted)
            if why:
                errors.append(f"{chunk.path}:{chunk.line_at(m.start())}: {dotted}: {why}")
            elif not m.group(2):
                rel = module_file(m.group(1))
                if rel is not None:
                    _check_names_after(chunk, m.end(), rel, m.group(1), errors)
    return errors


def test_docs_and_docstrings_cite_what_exists():
    errors = broken_references(doc_chunks())
    assert not errors, f"{len(errors)} broken references:\n" + "\n".join(errors)


# The rules on the references the issue named (the text as it stood) and on ones
# that hold, so that a rule that stops firing shows.
BROKEN = [
    "defaults in cli.py's `local_ray`",
    "the stage-2 inputs (``upstream.py``)",
    "built by ``nowhere_at_all.py``",
    "(figures in the README's Benchmarks section)",
    "see docs/benchmarks.md, \"No such title\"",
    "docs/method.md section 42",
    "workers import ``pipelines.decode``",
    "``pipelines/no_such_module.py``",
]
HOLDS = [
    "in ``pipelines/cli.py``, ``full_main``",
    "a sweep trial (``trial.py``)",
    "| `pipelines/data/` | `decode.py`, `loading.py` (batches) |",
    "docs/benchmarks.md, \"Time to\nquality\"",
    "docs/method.md sections 7-9",
    "``dsu_models.evaluation.metrics.summary_score`` and pipelines.cli:full_main",
    "dsu_models/configs/datasets/X.yaml, tune_spaces/<stage>.yaml, docs/*.md, benchmarks/out/",
]


@pytest.mark.parametrize("text", BROKEN)
def test_a_broken_reference_is_reported(text):
    assert len(broken_references([Chunk("pipelines/sweeps/driver.py", 1, text)])) == 1


@pytest.mark.parametrize("text", HOLDS)
def test_a_reference_that_holds_is_not_reported(text):
    assert broken_references([Chunk("pipelines/sweeps/driver.py", 1, text)]) == []


def test_sphinx_roles_resolve_in_their_file_and_sibling_modules():
    # (pipelines/data/: its decode module is light to import, and the case that
    # fails imports it)
    ok = ":class:`decode.Decode`, :func:`iter_epochs`, :func:`torch.no_such_thing`"
    assert broken_references([Chunk("pipelines/data/loading.py", 1, ok)]) == []
    bad = ":class:`decode.Encode` and\n:func:`no_such_name`"
    assert broken_references([Chunk("pipelines/data/loading.py", 5, bad)]) == [
        "pipelines/data/loading.py:5: :class:`decode.Encode`: pipelines.data.decode has no Encode "
        "(AttributeError: module 'pipelines.data.decode' has no attribute 'Encode')",
        "pipelines/data/loading.py:6: :func:`no_such_name`: "
        "pipelines/data/loading.py defines no no_such_name"]
