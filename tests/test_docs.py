"""The repository documents itself: nothing points outside it, and every docs/ page cited exists.

Comments, docstrings, help texts and the README cite `docs/<page>.md` (often
with a section: `docs/model.md, 'ArmoRM head'`). These tests read every file
git tracks and fail when one
  - refers to a behavioural document that is not in the repository (a
    "spec section N", "the spec", a path into `../shared`, the spec file's
    name) instead of a docs/ page;
  - cites a `docs/<page>.md` that does not exist, or a section of it that is
    not one of its headings.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Dict, List, Tuple

import pytest

ROOT = Path(__file__).resolve().parent.parent
THIS = Path(__file__).resolve().relative_to(ROOT).as_posix()

# Wording that cites an outside document; docs/ may use "spec" in other senses,
# so these apply to files outside docs/ (this file states them, so it is exempt).
_CITES_SPEC = re.compile(r"\bspec(?:'s)?\s+sections?\b|\bthe\s+spec\b(?!\w)|\bspec's\b", re.IGNORECASE)
# Paths to the outside document: nowhere, docs/ included.
_SPEC_PATH = re.compile(r"\.\./shared\b|\bshared/spec\b|(?<![\w-])armorm\.md\b")
# A docs page cited from anywhere (not a docs/ folder nested elsewhere).
_DOCS_PAGE = re.compile(r"(?<![\w./-])docs/([a-z0-9_]+)\.md\b")
# ... with a quoted section: docs/model.md, 'ArmoRM head' (may wrap across comment lines).
_DOCS_SECTION = re.compile(r"(?<![\w./-])docs/([a-z0-9_]+)\.md,\s*(?:#|//|\*)?\s*'([^'\n]+(?:\n[^'\n]*)?)'")


def _tracked_files() -> Dict[str, str]:
    """{path relative to the repository root: text} of every file git tracks."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed: cannot list the tracked files")
    try:
        top = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--show-toplevel"], capture_output=True,
                             text=True, check=True).stdout.strip()
    except subprocess.CalledProcessError:
        pytest.skip(f"{ROOT} is not a git checkout")
    if Path(top).resolve() != ROOT:
        pytest.skip(f"{ROOT} is not the root of its git checkout ({top})")
    out = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z"], capture_output=True, check=True).stdout
    files: Dict[str, str] = {}
    for raw in out.split(b"\0"):
        if not raw:
            continue
        rel = raw.decode("utf-8", "replace")
        p = ROOT / rel
        if not p.is_file():  # deleted in the work tree, or a submodule
            continue
        data = p.read_bytes()
        if b"\0" in data[:8192]:  # binary
            continue
        files[rel] = data.decode("utf-8", "replace")
    if not files:
        pytest.skip("git lists no tracked files")
    return files


def _line(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _headings(path: Path) -> List[str]:
    return [ln.lstrip("#").strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.startswith("#")]


def _squash(text: str) -> str:
    """A quoted section name as written, with comment continuation markers and line breaks removed."""
    return " ".join(re.sub(r"\n\s*(?:#|//|\*)?", " ", text).split())


def test_no_reference_to_the_outside_spec():
    bad: List[Tuple[str, int, str]] = []
    for rel, text in _tracked_files().items():
        if rel == THIS:
            continue
        patterns = [_SPEC_PATH] if rel.startswith("docs/") else [_SPEC_PATH, _CITES_SPEC]
        for pat in patterns:
            for m in pat.finditer(text):
                bad.append((rel, _line(text, m.start()), m.group(0)))
    assert not bad, ("these lines cite a document outside the repository; point them to the docs/ page "
                     "that describes the behaviour instead:\n" +
                     "\n".join(f"  {f}:{n}: {s!r}" for f, n, s in sorted(bad)))


def test_cited_docs_pages_and_sections_exist():
    files = _tracked_files()
    missing: List[str] = []
    cited = set()
    for rel, text in files.items():
        for m in _DOCS_PAGE.finditer(text):
            page = f"docs/{m.group(1)}.md"
            cited.add(page)
            if not (ROOT / page).is_file():
                missing.append(f"{rel}:{_line(text, m.start())}: {page} does not exist")
        for m in _DOCS_SECTION.finditer(text):
            page = ROOT / f"docs/{m.group(1)}.md"
            name = _squash(m.group(2))
            if page.is_file() and not any(h.startswith(name) for h in _headings(page)):
                missing.append(f"{rel}:{_line(text, m.start())}: docs/{m.group(1)}.md has no section "
                               f"{name!r} (its headings: {', '.join(_headings(page))})")
    assert not missing, "\n".join(missing)
    assert cited, "no file cites a docs/ page: the comments should point to the documentation"


def test_docs_index_lists_every_page():
    files = _tracked_files()
    pages = sorted(p for p in files if re.fullmatch(r"docs/[^/]+\.md", p) and p != "docs/README.md")
    if "docs/README.md" not in files:
        pytest.fail("docs/README.md (the index of the documentation) is missing")
    index = files["docs/README.md"]
    unlisted = [p for p in pages if f"]({Path(p).name})" not in index]
    assert not unlisted, f"docs/README.md does not link {', '.join(unlisted)}"
