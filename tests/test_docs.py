"""The user-facing text holds up: links and paths resolve inside the repository, no development-log wording, and
the README's cheap commands run.

Scanned: README.md, docs/**/*.md, configs/*.yaml, device_tests/README.md, bench/README.md (when present), and the
comments and docstrings of pipeline/, quantize/, exporters/, device_tests/ and bench/. No builds: fast.
"""

from __future__ import annotations

import ast
import io
import os
import re
import shlex
import subprocess
import sys
import tokenize
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Files a user reads as documentation.
DOC_GLOBS = ("README.md", "docs/**/*.md", "configs/*.yaml", "device_tests/README.md", "bench/README.md")
# Packages whose comments and docstrings are scanned for development-log wording.
CODE_DIRS = ("pipeline", "quantize", "exporters", "device_tests", "bench")
TOP_LEVEL = ("pipeline", "quantize", "exporters", "device_tests", "bench", "configs", "docs", "tests", "scripts")

# Development-log wording: what a user of a clone cannot have or does not need.
DEV_LOG = [re.compile(p, re.IGNORECASE) for p in (
    r"\bstop[- ]\d+", r"\bissue \d+", r"\bthe issue's", r"\bclosing note", r"\bflock\b", r"/work/", r"/root/",
    r"shared/docs", r"\.\./shared", r"\bsee design\.md", r"\bmain's student", r"\bthis session\b",
    r"\bmachine is shared", r"\bshared (?:2-core )?(?:VM|machine)\b", r"\bother sessions\b",
)]

# A path that names a place outside the repository (a developer's checkout, a sibling folder).
OUTSIDE = re.compile(r"(?<![\w.~/-])(?:\.\./[\w./-]*|/(?:work|root|home|Users)/[\w./-]*)")
MD_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
BACKTICKED = re.compile(r"`([^`\s]+)`")
# FILE.md#anchor written as plain text (config comments).
MD_ANCHOR = re.compile(r"(?<![\w/.-])((?:[\w-]+/)*[\w-]+\.md)#([\w-]+)")
# A section named by title: README "Methods", docs/x.md ("Section"), README, "Section".
MD_SECTION = re.compile(r"\b((?:[\w-]+/)*[\w-]+\.md|README)\)?,?\s*\(?\"([^\"\n]{2,60})\"")
# Documented files that the change adding `--set` ships with it; drop an entry once the file is in the tree.
PLACEHOLDER = re.compile(r"[<>*{}$]|\.\.\.|…|KEY\b|PATH|NAME")


def doc_files() -> list[Path]:
    found = {p for pattern in DOC_GLOBS for p in REPO.glob(pattern) if p.is_file()}
    return sorted(found)


def rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def headings(path: Path) -> list[str]:
    lines, fenced = [], False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"#{1,6} ", line):
            lines.append(line.lstrip("#").strip())
    return lines


def anchors(path: Path) -> set[str]:
    return {slug(h) for h in headings(path)}


def prose(path: Path) -> str:
    """A markdown file without its code blocks (fenced or indented); other files whole."""
    text = path.read_text()
    if path.suffix != ".md":
        return text
    kept, fenced = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
            continue
        if not fenced and not line.startswith("    "):
            kept.append(line)
    return "\n".join(kept)


def is_repo_path(token: str) -> bool:
    head = token.split("/", 1)[0]
    return ("/" in token and head in TOP_LEVEL or token in ("README.md", "Makefile", "pyproject.toml",
                                                            "constraints.txt")) and not PLACEHOLDER.search(token)


def target_problems(source: Path, target: str, base: Path) -> list[str]:
    """Problems with a link or path `target` written in `source`, resolved against `base`."""
    path_part, _, anchor = target.partition("#")
    resolved = (base / path_part).resolve() if path_part else source.resolve()
    where = f"{rel(source)}: {target!r}"
    if REPO not in resolved.parents and resolved != REPO:
        return [f"{where} points outside the repository"]
    if not resolved.exists():
        return [f"{where} does not exist"]
    if anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
        return [f"{where}: no section with anchor #{anchor} in {rel(resolved)}"]
    return []


def link_problems(path: Path) -> list[str]:
    text, problems = prose(path), []
    for match in OUTSIDE.finditer(path.read_text()):
        found = match.group(0).rstrip(".,:;")
        if found.startswith("..") and REPO in (path.parent / found).resolve().parents:
            problems += target_problems(path, found, path.parent)
        else:
            problems.append(f"{rel(path)}: {found!r} points outside the repository")
    for target in MD_LINK.findall(text):
        if not re.match(r"[a-z]+:", target):            # http:, https:, mailto:, ssh:
            problems += target_problems(path, target, path.parent)
    for token in BACKTICKED.findall(text):
        token = token.rstrip(".,:;)")
        if is_repo_path(token):
            problems += target_problems(path, token, REPO)
    for file, anchor in MD_ANCHOR.findall(text):
        base = path.parent if (path.parent / file).exists() else REPO
        problems += target_problems(path, f"{file}#{anchor}", base)
    for file, title in MD_SECTION.findall(text):
        file = "README.md" if file == "README" else file
        target = (path.parent / file) if (path.parent / file).exists() else REPO / file
        if not target.exists():
            problems.append(f"{rel(path)}: names {file}, which does not exist")
        elif target.suffix == ".md" and slug(title) not in anchors(target) and \
                not any(h.lower().startswith(title.lower()) for h in headings(target)):
            problems.append(f"{rel(path)}: names a section {title!r} of {file} that does not exist")
    return list(dict.fromkeys(problems))


def comments_and_docstrings(path: Path) -> list[tuple[int, str]]:
    source = path.read_text()
    found = []
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.COMMENT:
                found.append((tok.start[0], tok.string))
    except (tokenize.TokenError, SyntaxError):
        pass
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                found.append((getattr(node, "lineno", 1), doc))
    return found


def wording_problems(name: str, texts: list[tuple[int, str]]) -> list[str]:
    return [f"{name}:{line}: {pattern.pattern!r} in {match.group(0)!r}"
            for line, text in texts for pattern in DEV_LOG for match in [pattern.search(text)] if match]


def numbered(text: str) -> list[tuple[int, str]]:
    return list(enumerate(text.splitlines(), 1))


# --- (a) links and paths -------------------------------------------------------------------------------------

def test_doc_links_and_paths_resolve_inside_the_repository():
    problems = [p for path in doc_files() for p in link_problems(path)]
    assert not problems, "broken or outside references:\n" + "\n".join(problems)


def test_the_link_checker_catches_what_it_should(tmp_path):
    doc = REPO / "docs" / "_probe_for_test_docs.md"
    try:
        doc.write_text("# Probe\n\nSee [x](../../shared/docs/subdistill.md), `docs/nothing_here.md`,\n"
                       "[y](subdistill.md#no-such-section), configs: README \"No such heading\", /work/main/x.\n"
                       "Fine: [z](subdistill.md#choosing-a-method), `pipeline/cli.py`, `builds/<name>/x`.\n")
        problems = link_problems(doc)
    finally:
        doc.unlink()
    assert len(problems) == 5, problems


# --- (b) development-log wording ------------------------------------------------------------------------------

def test_docs_carry_no_development_log_wording():
    problems = [p for path in doc_files() for p in wording_problems(rel(path), numbered(path.read_text()))]
    assert not problems, "development-log wording in the docs:\n" + "\n".join(problems)


@pytest.mark.parametrize("folder", CODE_DIRS)
def test_code_comments_and_docstrings_carry_no_development_log_wording(folder):
    files = sorted(p for p in (REPO / folder).rglob("*.py") if "__pycache__" not in p.parts)
    problems = [p for path in files for p in wording_problems(rel(path), comments_and_docstrings(path))]
    assert not problems, "development-log wording in comments or docstrings:\n" + "\n".join(problems)


def test_the_wording_check_catches_what_it_should():
    samples = ["(docs/label_efficiency.md, stop 26)", "the issue's target", "issue 13, item 6",
               "flock /work/heavy.lock make", "main's student of this session", "../shared/docs/design.md"]
    assert all(wording_problems("x", [(1, s)]) for s in samples)
    assert not wording_problems("x", [(1, "stops after it; the stage's issue is a mismatch; fcntl lock")])


# --- (c) the README's cheap commands --------------------------------------------------------------------------

def readme_commands() -> list[list[str]]:
    """`edgesmith ...` lines of the README's code blocks that are cheap: --help, and check of a shipped config."""
    commands, fenced = [], False
    for line in (REPO / "README.md").read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        if not (fenced or line.startswith("    ")):
            continue
        text = line.strip().split("  #")[0].strip()
        if not text.startswith("edgesmith "):
            continue
        words = shlex.split(text)
        cheap_help = words[-1] == "--help" and len(words) <= 3
        cheap_check = words[1] == "check" and len(words) == 3 and (REPO / words[2]).is_file()
        if (cheap_help or cheap_check) and words not in commands:
            commands.append(words)
    return commands


def test_the_readme_shows_cheap_commands():
    commands = readme_commands()
    assert ["edgesmith", "--help"] in commands
    assert any(c[1] == "check" for c in commands), commands


@pytest.mark.parametrize("words", readme_commands(), ids=" ".join)
def test_readme_command_runs(words, tmp_path):
    args = [REPO / w if (REPO / w).is_file() and i > 1 else w for i, w in enumerate(words[1:], 1)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", *map(str, args)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(words)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
