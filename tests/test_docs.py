"""The README and docs/ say only what is true of this checkout: commands that parse, paths that exist, links that
resolve, and a README that stays a front page. Fast: no model is loaded, nothing is run."""

from __future__ import annotations

import ast
import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "care_mla"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 250

FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"(`+)(.+?)\1", re.S)
#: A command line in a code block: `care-mla ...`, optionally after a shell prompt or a venv's bin/.
BLOCK_COMMAND = re.compile(r"^\s*(?:\$\s+)?(?:[\w.~/-]*/)?care-mla(?:\s|$)")
#: Repository paths the docs name, relative to the repository root.
REPO_PATH = re.compile(r"(?<![\w./~-])((?:scripts|benchmarks|src/care_mla|docs|tests)/(?:[\w.-]+/?)*)")
#: Module files named by sub-package alone (`pipeline/convert.py`), relative to src/care_mla/.
PACKAGE_FILE = re.compile(r"(?<![\w./~-])((?:method|formats|pipeline|evaluation|healing|io)/\w+\.py)\b")
#: Dotted names in the package: `care_mla.method.compensation.refit_output_weight`.
DOTTED = re.compile(r"(?<![\w.])care_mla(?:\.\w+)+")
#: `from care_mla.x import a, b` in code blocks: each imported name is checked as `care_mla.x.a`.
FROM_IMPORT = re.compile(r"^\s*from\s+(care_mla(?:\.\w+)*)\s+import\s+([\w, ]+)")
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _lines(path: Path) -> list[tuple[int, str, bool]]:
    """(line number, text, inside a fenced code block) for every line of `path`, fences excluded."""
    out, fenced = [], False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        out.append((number, line, fenced))
    return out


def _prose(path: Path) -> list[tuple[int, str]]:
    """Lines outside code blocks, with inline code removed (what renders as text and links)."""
    return [(n, INLINE_CODE.sub("", line)) for n, line, fenced in _lines(path) if not fenced]


def _inline_spans(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of every inline code span outside code blocks; a span may run over a line break."""
    spans: list[tuple[int, str]] = []
    paragraph: list[tuple[int, str]] = []
    for number, line, fenced in [*_lines(path), (0, "", False)]:
        if not fenced and line.strip():
            paragraph.append((number, line))
            continue
        text = "\n".join(line for _, line in paragraph)
        for match in INLINE_CODE.finditer(text):
            first = paragraph[text.count("\n", 0, match.start())][0]
            spans.append((first, " ".join(match.group(2).split())))
        paragraph = []
    return spans


def _commands(path: Path) -> list[tuple[int, str]]:
    """Every `care-mla ...` command line: code-block lines (with `\\` continuations joined) and inline code spans
    that start with `care-mla ` and a command name."""
    found: list[tuple[int, str]] = []
    pending: tuple[int, str] | None = None
    for number, line, fenced in _lines(path):
        if not fenced:
            pending = None
            continue
        if pending is not None:
            start, text = pending
            text = text + " " + line.strip()
        elif BLOCK_COMMAND.match(line):
            start, text = number, line.strip()
        else:
            continue
        if text.endswith("\\"):
            pending = (start, text[:-1].rstrip())
        else:
            pending = None
            found.append((start, text))
    found += [(number, span) for number, span in _inline_spans(path) if re.match(r"care-mla\s+\S", span)]
    return sorted(found)


def _argv(command: str) -> list[str]:
    argv = shlex.split(command, comments=True)
    if argv and argv[0] == "$":
        argv = argv[1:]
    assert argv and argv[0].endswith("care-mla"), command
    return argv[1:]


COMMANDS = [pytest.param(path, number, command, id=f"{_rel(path)}:{number}: {command}")
            for path in DOCS for number, command in _commands(path)]


def test_docs_have_commands():
    assert COMMANDS, "no care-mla command found in README.md or docs/*.md"


@pytest.mark.parametrize(("path", "number", "command"), COMMANDS)
def test_command_parses(path: Path, number: int, command: str):
    from care_mla.cli import build_parser

    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            build_parser().parse_args(_argv(command))
    except SystemExit as err:
        message = (stderr.getvalue().strip().splitlines() or [""])[-1]
        pytest.fail(f"{_rel(path)}:{number}: `{command}` does not parse with the current CLI (exit {err.code}): "
                    f"{message}")


def _mentions(pattern: re.Pattern, root: Path) -> list:
    params = []
    for path in DOCS:
        seen = set()
        for number, line, _ in _lines(path):
            for match in pattern.finditer(line):
                name = match.group(1) if pattern.groups else match.group(0)
                name = name.rstrip(".")
                if name not in seen:
                    seen.add(name)
                    params.append(pytest.param(path, number, name, root, id=f"{_rel(path)}:{number}: {name}"))
    return params


@pytest.mark.parametrize(("path", "number", "name", "root"),
                         _mentions(REPO_PATH, ROOT) + _mentions(PACKAGE_FILE, PACKAGE))
def test_path_exists(path: Path, number: int, name: str, root: Path):
    if not (root / name).exists():
        pytest.fail(f"{_rel(path)}:{number}: names {name}, which is not at {_rel(root / name)}")


def _top_level_names(module: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.parse(module.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


def _imports() -> list:
    params = []
    for path in DOCS:
        for number, line, fenced in _lines(path):
            match = FROM_IMPORT.match(line) if fenced else None
            for imported in (match.group(2).split(",") if match else ()):
                name = f"{match.group(1)}.{imported.strip()}"
                params.append(pytest.param(path, number, name, PACKAGE, id=f"{_rel(path)}:{number}: {name}"))
    return params


@pytest.mark.parametrize(("path", "number", "name", "root"), _mentions(DOTTED, PACKAGE) + _imports())
def test_module_exists(path: Path, number: int, name: str, root: Path):
    """`care_mla.a.b.name`: a chain of sub-packages, then a module, then a name defined at its top level."""
    where = root
    parts = name.split(".")[1:]
    for i, part in enumerate(parts):
        if (where / part).is_dir():
            where = where / part
            continue
        module = where / f"{part}.py"
        if not module.is_file():
            pytest.fail(f"{_rel(path)}:{number}: names {name}, but {_rel(where)} has no module or package {part!r}")
        rest = parts[i + 1:]
        if rest and rest[0] not in _top_level_names(module):
            pytest.fail(f"{_rel(path)}:{number}: names {name}, but {_rel(module)} defines no {rest[0]!r}")
        return


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    text = re.sub(r"`|\*\*|__", "", heading.strip()).lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    anchors: set[str] = set()
    counts: dict[str, int] = {}
    for _, line, fenced in _lines(path):
        heading = re.match(r"#{1,6}\s+(.*)", line)
        if fenced or not heading:
            continue
        slug = _slug(heading.group(1))
        n = counts.get(slug, 0)
        counts[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


LINKS = [pytest.param(path, number, target, id=f"{_rel(path)}:{number}: {target}")
         for path in DOCS for number, line in _prose(path) for target in LINK.findall(line)
         if not re.match(r"[a-z][a-z0-9+.-]*:", target)]  # http:, https:, mailto: are not checked here


@pytest.mark.parametrize(("path", "number", "target"), LINKS)
def test_relative_link_resolves(path: Path, number: int, target: str):
    file_part, _, anchor = target.partition("#")
    linked = (path.parent / file_part).resolve() if file_part else path
    if not linked.exists():
        pytest.fail(f"{_rel(path)}:{number}: link {target} points to {file_part}, which does not exist")
    if anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
        pytest.fail(f"{_rel(path)}:{number}: link {target}: {linked.name} has no heading with anchor #{anchor}")


def test_readme_is_a_front_page():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines; keep it at most {README_MAX_LINES} and move the detail to docs/")


def test_readme_keeps_the_two_commands():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for command in ("bash scripts/demo.sh", "bash scripts/test.sh"):
        assert command in readme, f"README.md lost `{command}`"
