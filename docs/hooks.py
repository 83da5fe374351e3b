"""MkDocs hooks of this site (``hooks: [docs/hooks.py]`` in ``mkdocs.yml``).

Two pages are filled in when the site is built, so that they cannot drift from
their source:

- the run-configuration page's ``<!-- option-table -->`` becomes
  :func:`flwr_fedgkt.settings.option_table`, the table of every run-config key
  generated from the settings type. Its links to sections of the README's former
  layout (``#performance``, ...) point to this site's pages instead;
- the changelog page's ``<!-- changelog -->`` becomes ``CHANGELOG.md``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
OPTION_TABLE = "<!-- option-table -->"
CHANGELOG = "<!-- changelog -->"

# where the option documentation's section links lead on this site
SECTION_PAGES = {
    "#asynchronous-training": "asynchronous.md#asynchronous-training",
    "#performance": "performance.md",
    "#pipelined-rounds-gpus-more-than-one-machine": "asynchronous.md#pipelined-rounds",
    "#security-what-leaves-a-client": "security.md",
    "#what-one-node-can-and-cannot-do": "one-node.md",
}


def option_table() -> str:
    """The settings type's option table, its section links pointing to pages."""
    from flwr_fedgkt.settings import option_table as table

    return re.sub(
        r"\]\((#[^)]*)\)",
        lambda link: f"]({SECTION_PAGES.get(link.group(1), link.group(1))})",
        table(),
    )


def changelog() -> str:
    """``CHANGELOG.md`` as it is."""
    return (REPO / "CHANGELOG.md").read_text(encoding="utf-8")


def render(markdown: str) -> str:
    """``markdown`` with its markers replaced by what they stand for."""
    if OPTION_TABLE in markdown:
        markdown = markdown.replace(OPTION_TABLE, option_table())
    if CHANGELOG in markdown:
        markdown = markdown.replace(CHANGELOG, changelog())
    return markdown


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """MkDocs' hook: called with every page's Markdown before it is rendered."""
    return render(markdown)
