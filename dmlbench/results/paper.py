"""Published numbers as data: ``paper_numbers.csv`` → schema rows with ``source=paper``.

The CSV (packaged next to this module) holds one published number per line, in percent, with its
citation, backbone, embedding dim, protocol and a ``verified`` flag (``yes``: read from the paper
or its supplement; ``secondary``: quoted by a later paper; ``unverified``: third-party notes not
checked against the paper). :func:`paper_rows` groups the lines into one schema row per
(citation, method label, dataset, backbone, dim, protocol), converting percent to fractions.
Paper rows carry ``phase=paper`` and are never ranked with ours.
"""

from __future__ import annotations

import csv
import json
import re
from functools import lru_cache
from importlib import resources
from typing import Any

import pandas as pd

from dmlbench.results import schema

PAPER_CSV = "paper_numbers.csv"
CSV_COLUMNS = (
    "key",
    "citation",
    "method",
    "label",
    "dataset",
    "backbone",
    "embedding_dim",
    "protocol",
    "metric",
    "value_pct",
    "verified",
    "note",
)
VERIFIED_VALUES = ("yes", "secondary", "unverified")
_SLUG = re.compile(r"[^a-z0-9]+")


def slug(text: str) -> str:
    """Lower-case ``text`` and join its alphanumeric runs with ``-``.

    Example:
        >>> slug("C2-CCP-L")
        'c2-ccp-l'
        >>> slug("ProxyNCA++")
        'proxynca'
    """
    return _SLUG.sub("-", text.lower()).strip("-")


def read_paper_csv(text: str | None = None) -> list[dict[str, str]]:
    """The lines of the published-numbers CSV (the packaged one unless ``text`` is given).

    Raises:
        ValueError: a header, metric name, verified flag or value is not as documented.
    """
    if text is None:
        text = resources.files("dmlbench.results").joinpath(PAPER_CSV).read_text(encoding="utf-8")
    reader = csv.DictReader(text.splitlines())
    if tuple(reader.fieldnames or ()) != CSV_COLUMNS:
        raise ValueError(
            f"{PAPER_CSV} must have the columns {', '.join(CSV_COLUMNS)}, got {reader.fieldnames}"
        )
    lines = list(reader)
    for i, line in enumerate(lines, start=2):
        if line["metric"] not in schema.METRIC_COLUMNS:
            raise ValueError(f"{PAPER_CSV} line {i}: unknown metric {line['metric']!r}")
        if line["verified"] not in VERIFIED_VALUES:
            raise ValueError(f"{PAPER_CSV} line {i}: verified must be one of {', '.join(VERIFIED_VALUES)}")
        value = float(line["value_pct"])
        if not 0.0 <= value <= 100.0:
            raise ValueError(f"{PAPER_CSV} line {i}: value {value} is not a percentage")
    return lines


def rows_from_lines(lines: list[dict[str, str]]) -> list[dict[str, Any]]:
    """Group CSV lines into validated schema rows (percent → fraction).

    Example:
        >>> line = dict(key="k", citation="A. B. Paper. 2020", method="m", label="M", dataset="cub200",
        ...             backbone="resnet50", embedding_dim="512", protocol="test-select",
        ...             metric="recall_at_1", value_pct="69.2", verified="yes", note="")
        >>> row = rows_from_lines([line])[0]
        >>> row["row_id"], row["recall_at_1"], row["phase"], row["source"]
        ('paper-k-m-cub200-resnet50-512', 0.692, 'paper', 'paper')
    """
    groups: dict[tuple[str, ...], dict[str, Any]] = {}
    for line in lines:
        ident = (
            line["key"],
            line["label"],
            line["dataset"],
            line["backbone"],
            line["embedding_dim"],
            line["protocol"],
        )
        if ident not in groups:
            row_id = "paper-" + "-".join(slug(p) for p in ident[:5])
            if line["protocol"] != "test-select":
                row_id += "-" + slug(line["protocol"])
            groups[ident] = {
                schema.ROW_ID: row_id,
                schema.SOURCE: "paper",
                schema.METHOD: line["method"],
                schema.DATASET: line["dataset"],
                schema.BACKBONE: line["backbone"],
                schema.EMBEDDING_DIM: int(line["embedding_dim"]),
                schema.PROTOCOL: line["protocol"],
                schema.PHASE: "paper",
                schema.EVAL_SPLIT: "test",
                schema.STATUS: "complete",
                schema.CITATION: line["citation"],
                schema.PARAMS_JSON: json.dumps(
                    {"paper_label": line["label"], "verified": line["verified"], "note": line["note"]}
                ),
                schema.SCHEMA_VERSION_COL: schema.SCHEMA_VERSION,
            }
        row = groups[ident]
        metric = line["metric"]
        if metric in row:
            raise ValueError(f"{PAPER_CSV}: {metric} given twice for {row[schema.ROW_ID]}")
        row[metric] = round(float(line["value_pct"]) / 100.0, 6)
    return [schema.validate_row(r) for r in groups.values()]


@lru_cache(maxsize=1)
def _packaged_rows() -> tuple[dict[str, Any], ...]:
    return tuple(rows_from_lines(read_paper_csv()))


def paper_rows() -> pd.DataFrame:
    """The packaged published numbers as a DataFrame with exactly the schema's columns."""
    table = schema.to_table([dict(r) for r in _packaged_rows()])
    return table.to_pandas()


def paper_meta(params_json: str | None) -> dict[str, str]:
    """``paper_label`` / ``verified`` / ``note`` of a paper row (empty strings when absent)."""
    data = json.loads(params_json) if params_json else {}
    return {k: str(data.get(k, "")) for k in ("paper_label", "verified", "note")}
