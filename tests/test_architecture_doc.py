"""docs/architecture.md cannot drift from the code: its table of NATS conversations is the
one `kernel.endpoints` generates, the files it names exist, and the README points at it
rather than at anything outside the repository."""

from __future__ import annotations

import re
from pathlib import Path

from kernel.endpoints import markdown_table

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "architecture.md"


def test_the_conversations_table_is_generated_from_the_endpoint_declarations() -> None:
    text = DOC.read_text()

    assert markdown_table() in text, (
        "docs/architecture.md's table differs from kernel/endpoints.py; regenerate it with "
        "python -c 'from kernel.endpoints import markdown_table; print(markdown_table())'"
    )


def test_every_file_the_document_names_exists() -> None:
    named = set(re.findall(r"`((?:activator|controlplane|functions|kernel|partitions|tests)"
                           r"/[\w/]+\.py)`", DOC.read_text()))

    assert named, "the document names no files"
    assert sorted(p for p in named if not (REPO / p).exists()) == []


def test_the_readme_links_the_architecture_and_nothing_outside_the_repository() -> None:
    readme = (REPO / "README.md").read_text()
    links = re.findall(r"\]\(([^)]+)\)", readme)

    assert "docs/architecture.md" in links
    assert [link for link in links if link.startswith("..")] == []
