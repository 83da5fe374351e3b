"""The README and the documentation hold together: the README is short, keeps the
two set-up commands and links only to files that exist; every page's relative
links lead to a page or image of the site (and an anchor on it), as
``mkdocs build --strict`` requires; the navigation lists existing pages; and the
API reference names every public name of ``flwr_fedgkt`` and of its legacy API."""

from __future__ import annotations

import importlib
import importlib.util
import re
from pathlib import Path

import pytest
from flower_processes import REPO

DOCS = REPO / "docs"
README = REPO / "README.md"
SETUP_COMMANDS = (
    "pip install -e . && FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 "
    'flwr run . --stream --federation-config "num-supernodes=3" '
    "--run-config \"output-dir='$PWD/outputs'\"",
    'pip install -e ".[test]" && pytest -q',
)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
EXTERNAL = ("http://", "https://", "mailto:")


def _docs_hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", DOCS / "hooks.py")
    assert spec is not None and spec.loader is not None
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    return hooks


def _without_code(markdown: str) -> str:
    """Markdown without fenced code blocks and code spans (no links there)."""
    markdown = re.sub(r"```.*?```", "", markdown, flags=re.S)
    return re.sub(r"`[^`\n]*`", "", markdown)


def _slug(heading: str) -> str:
    """A heading's anchor, as MkDocs' toc extension and GitHub make it."""
    text = re.sub(r"[^\w\s-]", "", heading.replace("`", "")).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def _anchors(path: Path) -> set[str]:
    headings = re.findall(r"^#{1,6} (.+?)\s*$", _without_code_blocks(path), re.M)
    return {_slug(heading) for heading in headings}


def _without_code_blocks(path: Path) -> str:
    return re.sub(r"```.*?```", "", path.read_text(), flags=re.S)


def _relative_links(markdown: str) -> list[str]:
    return [
        target
        for target in LINK.findall(_without_code(markdown))
        if not target.startswith(EXTERNAL)
    ]


def _broken(page: Path, markdown: str, root: Path, folders: bool = False) -> list[str]:
    """The relative links of ``page`` that lead to no file under ``root`` (nor to
    a folder, when ``folders``: GitHub shows them, MkDocs does not), or to a
    Markdown file without the anchor named."""
    broken = []
    for target in _relative_links(markdown):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        found = file.is_file() or (folders and file.is_dir())
        if not file.is_relative_to(root.resolve()) or not found:
            broken.append(target)
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
            broken.append(target)
    return broken


def test_the_readme_is_short() -> None:
    assert len(README.read_text().splitlines()) <= 250


def test_the_readme_keeps_the_two_setup_commands_verbatim() -> None:
    # Prepare
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), re.S)
    lines = {line for block in blocks for line in block.splitlines()}
    # Assert: each is one line of a bash block, as written
    for command in SETUP_COMMANDS:
        assert command in lines, command


def test_every_relative_link_of_the_readme_exists() -> None:
    # Execute
    broken = _broken(README, README.read_text(), REPO, folders=True)
    # Assert
    assert broken == []
    assert "docs/index.md" in _relative_links(README.read_text())


@pytest.mark.parametrize(
    "page", ["CHANGELOG.md", "baselines/README.md", "baselines/fedgkt/README.md"]
)
def test_every_relative_link_of_a_repository_page_exists(page: str) -> None:
    path = REPO / page
    assert _broken(path, path.read_text(), REPO, folders=True) == []


@pytest.mark.parametrize("page", sorted(p.name for p in DOCS.glob("*.md")))
def test_every_relative_link_of_a_page_leads_into_the_site(page: str) -> None:
    # Prepare: the page as MkDocs renders it (the hooks fill in generated parts)
    path = DOCS / page
    markdown = _docs_hooks().render(path.read_text())
    # Execute
    broken = _broken(path, markdown, DOCS)
    # Assert: files outside docs/ are not served: they are named, not linked
    assert broken == []


def test_the_navigation_lists_every_page() -> None:
    # Prepare
    config = (REPO / "mkdocs.yml").read_text()
    entry = r'^\s+- (?:"[^"\n]*"|[^:\n]+): (\S+\.md)\s*$'
    nav = re.findall(entry, config.split("\nnav:", 1)[1], re.M)
    # Assert: every entry exists, every page is in the navigation once
    assert sorted(nav) == sorted(p.name for p in DOCS.glob("*.md"))


def test_the_hooks_fill_in_the_changelog() -> None:
    # Prepare
    page = (DOCS / "changelog.md").read_text()
    hooks = _docs_hooks()
    # Execute
    rendered = hooks.render(page)
    # Assert
    assert hooks.CHANGELOG in page
    assert rendered.strip() == (REPO / "CHANGELOG.md").read_text().strip()


def _documented(reference: str, package: str) -> dict[str, object]:
    """Every object the reference page documents under ``package``, by its name."""
    found = {}
    for path in re.findall(rf"^::: ({re.escape(package)}\.[\w.]+)\s*$", reference, re.M):
        module, _, name = path.rpartition(".")
        found[name] = getattr(importlib.import_module(module), name)
    return found


@pytest.mark.parametrize("package", ["flwr_fedgkt", "flwr_fedgkt.legacy"])
def test_the_reference_documents_every_public_name(package: str) -> None:
    # Prepare: the public API and the legacy API
    module = importlib.import_module(package)
    reference = (DOCS / "reference.md").read_text()
    # Execute
    documented = _documented(reference, package)
    # Assert: each name of __all__, from the module that defines the object
    for name in module.__all__:
        assert name in documented, name
        assert documented[name] is getattr(module, name), name
