"""The user documentation (README.md, client/README.md, docs/*.md) stands on its own: every relative
link resolves to a file of the repository, and to a heading of it when it names an anchor; no link
leaves the repository; no text points at a document users of the project do not have.

Offline and fast: files are read from the checkout, nothing is fetched.

External links: none are allowed in prose (``ALLOWED_HOSTS`` is empty on purpose): the repository
says what it needs itself, and names tools (``az``, ``azd``, ``func``) instead of linking to their
sites. Loopback addresses (the user's own machine) are fine. URLs inside code (commands, endpoints
such as ``https://<app>.azurewebsites.net``, token scopes) are example values, not links.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlsplit

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted([ROOT / "README.md", ROOT / "client" / "README.md", *(ROOT / "docs").glob("*.md")])
ALLOWED_HOSTS: frozenset[str] = frozenset()
# The user's own machine (the local host, a local collector's UI) is not outside the repository.
LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1"})
# Spelled in two halves so this file does not match itself.
OUTSIDE = re.compile(r"\.\./shared|\b" + "SP" + r"EC\b")
SOURCE_DIRS = ("routines", "tests", "bench", "infra", "client", "examples", "docs", ".ci")

_FENCE = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1[^\n]*$", re.M | re.S)
_INLINE_CODE = re.compile(r"(`+)(.+?)\1", re.S)
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REF_LINK = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s.*)?$", re.M)
_AUTOLINK = re.compile(r"<(https?://[^>\s]+)>")
_BARE_URL = re.compile(r"https?://[^\s)>\]`'\"]+")
_HEADING = re.compile(r"^ {0,3}#{1,6}\s+(.+?)\s*#*\s*$", re.M)
_REPO_PATH = re.compile(r"^(?:" + "|".join(re.escape(d) for d in SOURCE_DIRS) + r")/[\w./-]*$")


def _prose(text: str) -> str:
    """The text without fenced code blocks and inline code (where URLs are example values)."""
    return _INLINE_CODE.sub(" ", _FENCE.sub(" ", text))


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation removed, spaces to ``-``."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = text.replace("`", "").replace("*", "").lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor GitHub makes for the headings of ``path`` (repeats get ``-1``, ``-2``, ...)."""
    seen: dict[str, int] = {}
    out: set[str] = set()
    for match in _HEADING.finditer(_FENCE.sub(" ", path.read_text(encoding="utf-8"))):
        slug = _slug(match.group(1))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        out.add(slug if count == 0 else f"{slug}-{count}")
    return out


def links(path: Path) -> list[str]:
    prose = _prose(path.read_text(encoding="utf-8"))
    found = [m.group(1) for m in _LINK.finditer(prose)]
    found += [m.group(1) for m in _REF_LINK.finditer(prose)]
    found += [m.group(1) for m in _AUTOLINK.finditer(prose)]
    return found


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_slugs_follow_githubs_rules() -> None:
    assert _slug("5. Scale: a tick's work grows with due fires, not routines") == (
        "5-scale-a-ticks-work-grows-with-due-fires-not-routines"
    )
    assert _slug("Option B: Azure CLI + Core Tools") == "option-b-azure-cli--core-tools"
    assert _slug("Routines as code: `routines apply`") == "routines-as-code-routines-apply"
    assert _slug("Versions, ETag and If-Match") == "versions-etag-and-if-match"


def test_the_checks_catch_what_they_are_for(tmp_path: Path) -> None:
    """The extractors on a sample page: a broken link, an external one, a URL in code (allowed)."""
    page = tmp_path / "page.md"
    page.write_text(
        "# Title\n\nSee [a](other.md#x), [b](https://example.org/a) and <https://example.net>.\n\n"
        "```bash\ncurl https://$HOST/api\n```\n\nRun `curl https://inline.example`.\n",
        encoding="utf-8",
    )
    assert links(page) == ["other.md#x", "https://example.org/a", "https://example.net"]
    assert _BARE_URL.findall(_prose(page.read_text(encoding="utf-8"))) == [
        "https://example.org/a",
        "https://example.net",
    ]
    assert anchors(page) == {"title"}


@pytest.mark.parametrize("doc", DOCS, ids=_rel)
def test_every_relative_link_resolves_in_the_repository(doc: Path) -> None:
    broken = []
    for target in links(doc):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, mailto:, ...: the next test
            continue
        file_part, _, anchor = target.partition("#")
        resolved = (doc.parent / file_part).resolve() if file_part else doc
        if not resolved.is_relative_to(ROOT):
            broken.append(f"{target}: outside the repository")
        elif not resolved.exists():
            broken.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target}: no heading #{anchor} in {_rel(resolved)}")
    assert not broken, f"{_rel(doc)}: {broken}"


@pytest.mark.parametrize("doc", DOCS, ids=_rel)
def test_no_link_leaves_the_repository(doc: Path) -> None:
    prose = _prose(doc.read_text(encoding="utf-8"))
    external = [t for t in links(doc) if re.match(r"^[a-z][a-z0-9+.-]*:", t, re.I)]
    external += _BARE_URL.findall(prose)
    outside = sorted({url for url in external if urlsplit(url).hostname not in ALLOWED_HOSTS | LOOPBACK})
    assert not outside, f"{_rel(doc)} links outside the repository: {outside}"


@pytest.mark.parametrize("doc", DOCS, ids=_rel)
def test_paths_named_in_the_docs_exist(doc: Path) -> None:
    """A path of the repository written as code (`routines/decide.py`, `tests/test_soak.py`) exists,
    so a moved file cannot leave its description behind."""
    text = doc.read_text(encoding="utf-8")
    ignored = [line.strip().lstrip("/") for line in (ROOT / ".gitignore").read_text().splitlines()]
    ignored = [entry for entry in ignored if entry and not entry.startswith("#")]
    missing = sorted(
        {
            name
            for match in _INLINE_CODE.finditer(text)
            if _REPO_PATH.match(name := match.group(2).strip().split("::")[0])
            and not (ROOT / name).exists()
            and not any(name.startswith(entry) for entry in ignored)  # made by a run (bench/out/)
        }
    )
    assert not missing, f"{_rel(doc)} names files that do not exist: {missing}"


def test_no_file_points_outside_the_repository() -> None:
    """Neither the docs nor the code, tests, benchmarks or templates cite a document outside the
    repository; they cite docs/api.md, docs/guarantees.md #N, docs/architecture.md or the README."""
    files = [*DOCS, ROOT / "function_app.py", ROOT / "Makefile"]
    for folder in ("routines", "tests", "bench", "infra", "client"):
        files += [p for p in (ROOT / folder).rglob("*") if p.suffix in {".py", ".bicep", ".md", ".json"}]
    offending = []
    for path in files:
        if path == Path(__file__).resolve() or "node_modules" in path.parts:
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if OUTSIDE.search(line):
                offending.append(f"{_rel(path)}:{number}: {line.strip()}")
    assert not offending, "\n".join(offending)


def test_the_test_index_names_every_test_module_and_only_those() -> None:
    """tests/README.md has a line for each module of tests/ (a new one needs its line)."""
    index = (ROOT / "tests" / "README.md").read_text(encoding="utf-8")
    named = set(re.findall(r"^- `([\w.]+\.py)`", index, re.M))
    present = {p.name for p in (ROOT / "tests").glob("*.py") if p.name != "__init__.py"}
    assert sorted(present - named) == [], "modules tests/README.md does not list"
    assert sorted(named - present) == [], "modules tests/README.md lists that do not exist"
