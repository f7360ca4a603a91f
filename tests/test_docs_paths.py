"""The docs cite only files that are in the repository (reference repositories by name or URL)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
#: backticked paths under these folders must exist in the repository
REPO_FOLDERS = ("dmlbench/", "tests/", "bench/", "docs/", "search_spaces/")


def _exists(token: str, doc: Path) -> bool:
    path = token.split("::")[0].rstrip(".,:;")
    candidates = [ROOT / path, ROOT / "dmlbench" / path, doc.parent / path]
    return any(c.exists() for c in candidates)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_doc_cites_only_files_in_the_repository(doc: Path) -> None:
    text = doc.read_text(encoding="utf-8")
    assert "shared/specs" not in text and "../shared" not in text, "cites the project's private notes"
    missing = []
    for token in re.findall(r"`([^`\s]+)`", text):
        if token.startswith(REPO_FOLDERS) and not re.search(r"[{}<>*]", token) and not _exists(token, doc):
            missing.append(token)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if not re.match(r"[a-z]+:", target) and not target.startswith("#"):
            if not (doc.parent / target.split("#")[0]).exists():
                missing.append(target)
    assert not missing, f"{doc.name} cites paths that are not in the repository: {missing}"
