"""The registered methods, read from their definition sites without importing them.

``dmlbench methods list`` must answer in well under a second, and importing a method module imports
torch (seconds). Methods register at their definition site with ``@METHODS.register("name")``
(STYLE rule 2); this module finds those decorators in the source of ``dmlbench.methods`` with
:mod:`ast` and takes the summary from the class docstring, so there is no second table to keep in
sync. ``tests/test_cli_fast.py`` checks the result against the real registry.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

METHODS_DIR = Path(__file__).resolve().parents[1] / "methods"
SPACES_DIR = Path(__file__).resolve().parents[1] / "search_spaces"
REGISTRY_NAME = "METHODS"


@dataclass(frozen=True)
class MethodCard:
    """What ``methods list`` shows of one method: name, one-line summary, where it is defined."""

    name: str
    summary: str
    module: str  # dotted module path, e.g. "dmlbench.methods.ccp.method"
    class_name: str


def _registered_name(node: ast.expr) -> str | None:
    """``"x"`` for a decorator ``@METHODS.register("x")``, else None."""
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
        return None
    func = node.func
    if func.attr != "register" or not (isinstance(func.value, ast.Name) and func.value.id == REGISTRY_NAME):
        return None
    if len(node.args) == 1 and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
        return node.args[0].value
    return None


def summary_line(docstring: str | None) -> str:
    """The first line of a docstring (its summary), stripped; empty when there is none.

    Example:
        >>> summary_line("Proxy Anchor (Kim et al., CVPR 2020).\\n\\nMore text.")
        'Proxy Anchor (Kim et al., CVPR 2020).'
    """
    return (docstring or "").strip().split("\n", 1)[0].strip()


def method_catalog(methods_dir: Path = METHODS_DIR) -> list[MethodCard]:
    """Every ``@METHODS.register("name")`` class under ``methods_dir``, sorted by name."""
    package = methods_dir.relative_to(methods_dir.parents[1]).as_posix().replace("/", ".")
    cards: list[MethodCard] = []
    for path in sorted(methods_dir.rglob("*.py")):
        rel = path.relative_to(methods_dir).with_suffix("")
        if any(part.startswith("_") for part in rel.parts):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.ClassDef):
                continue
            for deco in node.decorator_list:
                name = _registered_name(deco)
                if name is not None:
                    module = ".".join([package, *rel.parts])
                    cards.append(MethodCard(name, summary_line(ast.get_docstring(node)), module, node.name))
    return sorted(cards, key=lambda c: c.name)


def searched_params(method: str, spaces_dir: Path = SPACES_DIR) -> list[str]:
    """Names of the parameters ``search_spaces/<method>.yaml`` searches ([] without a file)."""
    import yaml

    path = spaces_dir / f"{method}.yaml"
    if not path.is_file():
        return []
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    return [str(p.get("name")) for p in data.get("params") or [] if isinstance(p, dict)]
