"""Leaderboards: pure functions from the rows DataFrame to tables (DESIGN §4, §8).

Two kinds of table per dataset, never mixed:

* **final** (test scores): phase ``final`` rows with status ``complete`` of our sweeps, grouped by
  (method, backbone, embedding_dim, protocol); each metric as mean ± 95 % CI over seeds (Student t
  half-width, n − 1 degrees of freedom; a single seed has no CI). Ranked by the sort metric.
  ``source=paper`` rows can be shown beside them, one per published number, never ranked.
* **search** (validation scores): phase ``search`` rows grouped by (method, backbone); the best
  complete trial by the sort metric and the trial counts per status.

The column names of these tables are the constants below; ``docs/results.md`` documents them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd
from scipy import stats

from dmlbench.errors import ConfigError, close_matches
from dmlbench.results import schema
from dmlbench.results.paper import paper_meta

Phase = Literal["all", "final", "search"]
PHASES: tuple[str, ...] = ("all", "final", "search")

# ---- leaderboard columns (final table) ------------------------------------------------------
TABLE = "table"  # "final" | "search" (in the CSV / JSON outputs)
RANK = "rank"
N_SEEDS = "n_seeds"
N_TRIALS = "n_trials"
LABEL = "label"  # method as shown: the paper's own label for paper rows
VERIFIED = "verified"  # paper rows: yes | secondary | unverified
ROW_IDS = "row_ids"  # the rows an entry aggregates (space separated)
MEAN_SUFFIX = "_mean"
CI_SUFFIX = "_ci95"  # half-width of the 95 % CI; empty when n_seeds < 2
# ---- leaderboard columns (search table) -----------------------------------------------------
N_COMPLETE = "n_complete"
N_PRUNED = "n_pruned"
N_DIVERGED = "n_diverged"
N_FAILED = "n_failed"
BEST_ROW_ID = "best_row_id"
VAL_PREFIX = "val_"  # best trial's validation metrics: val_map_at_r, val_recall_at_1, ...

CONFIDENCE = 0.95
DEFAULT_SORT = schema.MAP_AT_R
DEFAULT_RECALL_KS: tuple[int, ...] = (1, 2, 4, 8)
#: conventional R@k lists of the benchmarks, used when the dataset is not registered here
CONVENTIONAL_RECALL_KS: dict[str, tuple[int, ...]] = {
    "cub200": (1, 2, 4, 8),
    "cars196": (1, 2, 4, 8),
    "sop": (1, 10, 100, 1000),
    "inshop": (1, 10, 20, 30, 40, 50),
}
SEARCH_METRICS: tuple[str, ...] = (schema.MAP_AT_R, "recall_at_1", schema.PRECISION_AT_1)
SORTABLE: tuple[str, ...] = schema.METRIC_COLUMNS
_DISPLAY_NAMES = {
    schema.MAP_AT_R: "MAP@R",
    schema.R_PRECISION: "R-Prec",
    schema.PRECISION_AT_1: "P@1",
    schema.NMI: "NMI",
    schema.F1: "F1",
    **{f"recall_at_{k}": f"R@{k}" for k in schema.RECALL_KS},
}


def display_name(metric: str) -> str:
    """Short human name of a metric column (``recall_at_1`` → ``R@1``)."""
    return _DISPLAY_NAMES.get(metric, metric)


def mean_ci(values: Iterable[float], confidence: float = CONFIDENCE) -> tuple[float, float | None, int]:
    """Mean and Student-t confidence half-width of the finite values.

    half-width = t_{(1+confidence)/2, n−1} · s / √n with s the sample standard deviation (ddof 1).

    Args:
        values: one value per seed; NaN / None are ignored.
        confidence: two-sided level of the interval.

    Returns:
        ``(mean, half_width, n)``; ``half_width`` is None when fewer than two values remain, and
        ``mean`` is NaN when none remain.

    Example:
        >>> m, h, n = mean_ci([0.5, 0.6, 0.7])
        >>> round(m, 6), round(h, 6), n          # t(0.975, 2) = 4.302653, s = 0.1
        (0.6, 0.248414, 3)
        >>> mean_ci([0.4, float("nan")])
        (0.4, None, 1)
    """
    arr = np.asarray([v for v in values if v is not None], dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    n = int(arr.size)
    if n == 0:
        return math.nan, None, 0
    mean = float(arr.mean())
    if n < 2:
        return mean, None, n
    sem = float(arr.std(ddof=1)) / math.sqrt(n)
    half = float(stats.t.ppf(0.5 + confidence / 2.0, n - 1)) * sem
    return mean, half, n


def recall_ks_for(dataset: str) -> tuple[int, ...]:
    """The conventional R@k list of a dataset.

    The registered dataset's ``recall_ks`` when it is registered, else the benchmark convention
    (:data:`CONVENTIONAL_RECALL_KS`), else :data:`DEFAULT_RECALL_KS`. Only k with a schema column
    are kept.
    """
    import dmlbench.datasets  # noqa: F401  (fills the registry)
    from dmlbench.datasets.base import DATASETS

    if dataset in DATASETS:
        ks = tuple(DATASETS.get(dataset).recall_ks)
    else:
        ks = CONVENTIONAL_RECALL_KS.get(dataset, DEFAULT_RECALL_KS)
    return tuple(k for k in ks if k in schema.RECALL_KS)


def metrics_for(dataset: str, sort: str = DEFAULT_SORT) -> list[str]:
    """Metric columns of a dataset's final table: MAP@R, its R@k list, P@1, R-Precision, NMI (+ sort)."""
    cols = [schema.MAP_AT_R, *(f"recall_at_{k}" for k in recall_ks_for(dataset))]
    cols += [schema.PRECISION_AT_1, schema.R_PRECISION, schema.NMI]
    if sort not in cols:
        cols.append(sort)
    return cols


def check_sort(sort: str) -> str:
    """``sort`` if it is a metric column, else a :class:`ConfigError` listing the valid ones."""
    if sort not in SORTABLE:
        hint = close_matches(sort, list(SORTABLE))
        did = f" (did you mean {', '.join(hint)}?)" if hint else ""
        raise ConfigError(f"cannot sort by {sort!r}{did}; valid sort metrics: {', '.join(SORTABLE)}.")
    return sort


def _split_names(value: str | Sequence[str] | None) -> list[str]:
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    return [s.strip() for s in items if s and s.strip()]


def filter_rows(
    df: pd.DataFrame, *, datasets: Sequence[str] = (), methods: Sequence[str] = ()
) -> pd.DataFrame:
    """Rows whose dataset / method is in the given lists (an empty list keeps everything)."""
    mask = pd.Series(True, index=df.index)
    if datasets:
        mask &= df[schema.DATASET].isin(list(datasets))
    if methods:
        mask &= df[schema.METHOD].isin(list(methods))
    return df[mask]


def _check_names(kind: str, wanted: Sequence[str], available: Iterable[str]) -> None:
    have = sorted({str(a) for a in available})
    missing = [w for w in wanted if w not in have]
    if missing and len(missing) == len(wanted):
        hint = close_matches(missing[0], have)
        did = f" (did you mean {', '.join(hint)}?)" if hint else ""
        raise ConfigError(
            f"no rows for {kind} {', '.join(repr(m) for m in missing)}{did}; {kind}s with rows: {', '.join(have) or 'none'}."
        )


def _ours(df: pd.DataFrame) -> pd.DataFrame:
    return df[df[schema.SOURCE] == "dmlbench"]


def _sum_or_nan(values: pd.Series) -> float:
    v = pd.to_numeric(values, errors="coerce")
    return float(v.sum()) if v.notna().any() else math.nan


def final_table(
    rows: pd.DataFrame,
    dataset: str,
    *,
    sort: str = DEFAULT_SORT,
    paper: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Final-phase leaderboard of one dataset.

    Args:
        rows: all rows (any phase, any dataset); only this dataset's are used.
        dataset: dataset name.
        sort: metric to rank by (higher is better).
        paper: ``source=paper`` rows to show beside ours (unranked), or None.

    Returns:
        One row per (method, backbone, embedding_dim, protocol) of our complete final rows, plus
        one per paper row; columns ``dataset, source, method, label, backbone, embedding_dim,
        protocol, n_seeds, n_trials, gpu_hours, <metric>_mean, <metric>_ci95 ..., rank, verified,
        citation, row_ids``; sorted by ``<sort>_mean`` (NaN last), ranks 1.. for ours only.
    """
    check_sort(sort)
    metrics = metrics_for(dataset, sort)
    ours = _ours(rows[rows[schema.DATASET] == dataset])
    final = ours[(ours[schema.PHASE] == "final") & (ours[schema.STATUS] == "complete")]
    search = ours[ours[schema.PHASE] == "search"]
    keys = [schema.METHOD, schema.BACKBONE, schema.EMBEDDING_DIM, schema.PROTOCOL]
    out: list[dict[str, Any]] = []
    for key, grp in final.groupby(keys, dropna=False, sort=True):
        method, backbone, dim, protocol = key
        cell_search = search[(search[schema.METHOD] == method) & (search[schema.BACKBONE] == backbone)]
        entry: dict[str, Any] = {
            schema.DATASET: dataset,
            schema.SOURCE: "dmlbench",
            schema.METHOD: method,
            LABEL: method,
            schema.BACKBONE: backbone,
            schema.EMBEDDING_DIM: None if pd.isna(dim) else int(dim),
            schema.PROTOCOL: protocol,
            N_SEEDS: len(grp),
            N_TRIALS: len(cell_search),
            schema.GPU_HOURS: _sum_or_nan(pd.concat([cell_search[schema.GPU_HOURS], grp[schema.GPU_HOURS]])),
        }
        for m in metrics:
            mean, half, _n = mean_ci(grp[m].tolist())
            entry[m + MEAN_SUFFIX] = mean
            entry[m + CI_SUFFIX] = math.nan if half is None else half
        entry.update({VERIFIED: "", schema.CITATION: "", ROW_IDS: " ".join(sorted(grp[schema.ROW_ID]))})
        out.append(entry)
    if paper is not None:
        for _, prow in paper[paper[schema.DATASET] == dataset].iterrows():
            meta = paper_meta(prow[schema.PARAMS_JSON])
            entry = {
                schema.DATASET: dataset,
                schema.SOURCE: "paper",
                schema.METHOD: prow[schema.METHOD],
                LABEL: meta["paper_label"] or prow[schema.METHOD],
                schema.BACKBONE: prow[schema.BACKBONE],
                schema.EMBEDDING_DIM: None
                if pd.isna(prow[schema.EMBEDDING_DIM])
                else int(prow[schema.EMBEDDING_DIM]),
                schema.PROTOCOL: prow[schema.PROTOCOL],
                N_SEEDS: None,
                N_TRIALS: None,
                schema.GPU_HOURS: math.nan,
            }
            for m in metrics:
                v = prow[m]
                entry[m + MEAN_SUFFIX] = math.nan if v is None or pd.isna(v) else float(v)
                entry[m + CI_SUFFIX] = math.nan
            entry.update(
                {
                    VERIFIED: meta["verified"],
                    schema.CITATION: prow[schema.CITATION],
                    ROW_IDS: prow[schema.ROW_ID],
                }
            )
            out.append(entry)
    columns = [
        schema.DATASET, schema.SOURCE, schema.METHOD, LABEL, schema.BACKBONE, schema.EMBEDDING_DIM,
        schema.PROTOCOL, N_SEEDS, N_TRIALS, schema.GPU_HOURS,
        *[m + s for m in metrics for s in (MEAN_SUFFIX, CI_SUFFIX)],
        RANK, VERIFIED, schema.CITATION, ROW_IDS,
    ]  # fmt: skip
    table = pd.DataFrame(out, columns=[c for c in columns if c != RANK])
    key_col = sort + MEAN_SUFFIX
    table = table.sort_values(key_col, ascending=False, na_position="last", kind="mergesort").reset_index(
        drop=True
    )
    is_ours = table[schema.SOURCE] == "dmlbench"
    ranks = table.loc[is_ours, key_col].rank(method="min", ascending=False, na_option="keep")
    table[RANK] = pd.Series([pd.NA] * len(table), dtype="Int64")
    table.loc[is_ours, RANK] = ranks.astype("Int64")
    return table[columns]


def search_table(rows: pd.DataFrame, dataset: str, *, sort: str = DEFAULT_SORT) -> pd.DataFrame:
    """Search-phase (validation) summary of one dataset: one row per (method, backbone).

    The best trial is the complete search row with the highest ``sort`` value; its validation
    metrics are the ``val_*`` columns. Trial counts are per status; ``gpu_hours`` sums all trials.
    """
    check_sort(sort)
    metrics = list(SEARCH_METRICS) + ([sort] if sort not in SEARCH_METRICS else [])
    ours = _ours(rows[rows[schema.DATASET] == dataset])
    search = ours[ours[schema.PHASE] == "search"]
    out: list[dict[str, Any]] = []
    for (method, backbone), grp in search.groupby([schema.METHOD, schema.BACKBONE], dropna=False, sort=True):
        status = grp[schema.STATUS]
        complete = grp[(status == "complete") & grp[sort].notna()]
        best = complete.loc[complete[sort].idxmax()] if len(complete) else None
        entry: dict[str, Any] = {
            schema.DATASET: dataset,
            schema.METHOD: method,
            schema.BACKBONE: backbone,
            N_TRIALS: len(grp),
            N_COMPLETE: int((status == "complete").sum()),
            N_PRUNED: int((status == "pruned").sum()),
            N_DIVERGED: int((status == "diverged").sum()),
            N_FAILED: int((status == "failed").sum()),
            schema.GPU_HOURS: _sum_or_nan(grp[schema.GPU_HOURS]),
            BEST_ROW_ID: None if best is None else best[schema.ROW_ID],
        }
        for m in metrics:
            entry[VAL_PREFIX + m] = math.nan if best is None or pd.isna(best[m]) else float(best[m])
        out.append(entry)
    columns = [
        schema.DATASET, schema.METHOD, schema.BACKBONE, N_TRIALS, N_COMPLETE, N_PRUNED, N_DIVERGED,
        N_FAILED, schema.GPU_HOURS, *[VAL_PREFIX + m for m in metrics], BEST_ROW_ID,
    ]  # fmt: skip
    table = pd.DataFrame(out, columns=columns)
    return table.sort_values(
        VAL_PREFIX + sort, ascending=False, na_position="last", kind="mergesort"
    ).reset_index(drop=True)


@dataclass
class Leaderboards:
    """The tables ``dmlbench leaderboard`` shows: per dataset, final and search separately."""

    sort: str
    final: dict[str, pd.DataFrame] = field(default_factory=dict)
    search: dict[str, pd.DataFrame] = field(default_factory=dict)

    def is_empty(self) -> bool:
        return not any(len(t) for t in [*self.final.values(), *self.search.values()])


def build(
    rows: pd.DataFrame,
    *,
    datasets: str | Sequence[str] | None = None,
    methods: str | Sequence[str] | None = None,
    phase: str = "all",
    sort: str = DEFAULT_SORT,
    paper: pd.DataFrame | None = None,
) -> Leaderboards:
    """All leaderboard tables for the selected datasets / methods / phase.

    Args:
        rows: the rows DataFrame (``store.read_rows``); paper rows in it are ignored here.
        datasets / methods: names (list or comma-separated); None keeps all.
        phase: ``all``, ``final`` (test tables) or ``search`` (validation tables).
        sort: metric to rank and sort by.
        paper: published rows to show beside ours in the final tables (``--with-paper``).

    Raises:
        ConfigError: unknown phase or sort metric, or a filter that matches no rows.
    """
    if phase not in PHASES:
        raise ConfigError(f"unknown phase {phase!r}; valid phases: {', '.join(PHASES)}.")
    check_sort(sort)
    ds_list, m_list = _split_names(datasets), _split_names(methods)
    ours = _ours(rows)
    pool = ours if paper is None else pd.concat([ours, paper], ignore_index=True)
    if ds_list:
        _check_names("dataset", ds_list, pool[schema.DATASET])
    if m_list:
        _check_names("method", m_list, pool[schema.METHOD])
    ours = filter_rows(ours, datasets=ds_list, methods=m_list)
    paper_sel = None if paper is None else filter_rows(paper, datasets=ds_list, methods=m_list)
    names = set(ours[schema.DATASET])
    if paper_sel is not None and ds_list:
        names |= set(paper_sel[schema.DATASET])
    lb = Leaderboards(sort=sort)
    for ds in sorted(names):
        if phase in ("all", "final"):
            t = final_table(ours, ds, sort=sort, paper=paper_sel)
            if len(t):
                lb.final[ds] = t
        if phase in ("all", "search"):
            t = search_table(ours, ds, sort=sort)
            if len(t):
                lb.search[ds] = t
    return lb


# ---- rendering ------------------------------------------------------------------------------
def _pct(v: Any) -> str:
    return "–" if v is None or pd.isna(v) else f"{100.0 * float(v):.2f}"


def format_mean_ci(mean: Any, half: Any, n: Any) -> str:
    """A metric cell in percent: ``"65.43 ± 1.20"``; one seed ``"65.43 (n=1)"``; a paper number as is.

    Example:
        >>> format_mean_ci(0.6543, 0.012, 3), format_mean_ci(0.6543, None, 1), format_mean_ci(0.7, None, None)
        ('65.43 ± 1.20', '65.43 (n=1)', '70.00')
    """
    if mean is None or pd.isna(mean):
        return "–"
    if half is not None and not pd.isna(half):
        return f"{_pct(mean)} ± {_pct(half)}"
    if n is not None and not pd.isna(n):
        return f"{_pct(mean)} (n={int(n)})"
    return _pct(mean)


def _int_or_dash(v: Any) -> str:
    return "–" if v is None or pd.isna(v) else str(int(v))


def _hours(v: Any) -> str:
    return "–" if v is None or pd.isna(v) else f"{float(v):.2f}"


def display_final(table: pd.DataFrame, sort: str = DEFAULT_SORT) -> pd.DataFrame:
    """The final table as strings for people (percent, mean ± CI, paper rows marked)."""
    metrics = [c[: -len(MEAN_SUFFIX)] for c in table.columns if c.endswith(MEAN_SUFFIX)]
    out = pd.DataFrame(
        {
            "rank": [_int_or_dash(v) for v in table[RANK]],
            "method": [
                lbl if src == "dmlbench" else f"{lbl} [paper{'' if ver == 'yes' else ', ' + ver}]"
                for lbl, src, ver in zip(table[LABEL], table[schema.SOURCE], table[VERIFIED], strict=True)
            ],
            "backbone": table[schema.BACKBONE].fillna("–"),
            "dim": [_int_or_dash(v) for v in table[schema.EMBEDDING_DIM]],
            "protocol": table[schema.PROTOCOL].fillna("–"),
            "seeds": [_int_or_dash(v) for v in table[N_SEEDS]],
            "trials": [_int_or_dash(v) for v in table[N_TRIALS]],
            "GPU-h": [_hours(v) for v in table[schema.GPU_HOURS]],
        }
    )
    for m in metrics:
        name = display_name(m) + (" ▼" if m == sort else "")
        out[name] = [
            format_mean_ci(a, b, n)
            for a, b, n in zip(table[m + MEAN_SUFFIX], table[m + CI_SUFFIX], table[N_SEEDS], strict=True)
        ]
    return out


def display_search(table: pd.DataFrame, sort: str = DEFAULT_SORT) -> pd.DataFrame:
    """The search table as strings for people (validation scores in percent)."""
    metrics = [c[len(VAL_PREFIX) :] for c in table.columns if c.startswith(VAL_PREFIX)]
    out = pd.DataFrame(
        {
            "method": table[schema.METHOD],
            "backbone": table[schema.BACKBONE].fillna("–"),
            "trials": table[N_TRIALS].astype(int).astype(str),
            "complete/pruned/diverged/failed": [
                f"{a}/{b}/{c}/{d}"
                for a, b, c, d in zip(
                    table[N_COMPLETE], table[N_PRUNED], table[N_DIVERGED], table[N_FAILED], strict=True
                )
            ],
            "GPU-h": [_hours(v) for v in table[schema.GPU_HOURS]],
        }
    )
    for m in metrics:
        out["best val " + display_name(m) + (" ▼" if m == sort else "")] = [
            _pct(v) for v in table[VAL_PREFIX + m]
        ]
    out["best trial"] = table[BEST_ROW_ID].fillna("–")
    return out


def final_title(dataset: str) -> str:
    return f"{dataset} — final phase, test split (mean ± 95% CI over seeds, %)"


def search_title(dataset: str) -> str:
    return f"{dataset} — search phase, best validation scores (%; not test scores)"


def _markdown_table(df: pd.DataFrame) -> str:
    def esc(v: Any) -> str:
        return str(v).replace("|", "\\|")

    head = "| " + " | ".join(esc(c) for c in df.columns) + " |"
    sep = "|" + "|".join("---" for _ in df.columns) + "|"
    body = ["| " + " | ".join(esc(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, sep, *body])


def to_markdown(lb: Leaderboards) -> str:
    """Markdown: one heading and one pipe table per (dataset, table)."""
    parts: list[str] = []
    for ds in sorted(set(lb.final) | set(lb.search)):
        if ds in lb.final:
            parts += [f"## {final_title(ds)}", "", _markdown_table(display_final(lb.final[ds], lb.sort)), ""]
            cites = lb.final[ds][lb.final[ds][schema.SOURCE] == "paper"]
            if len(cites):
                parts += ["Paper rows (not ranked; their protocol differs from ours where shown):", ""]
                parts += sorted({f"- {c}" for c in cites[schema.CITATION]}) + [""]
        if ds in lb.search:
            parts += [
                f"## {search_title(ds)}",
                "",
                _markdown_table(display_search(lb.search[ds], lb.sort)),
                "",
            ]
    return "\n".join(parts).rstrip() + "\n"


def _nan_to_none(v: Any) -> Any:
    if v is None or v is pd.NA:
        return None
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, np.floating):
        return None if math.isnan(float(v)) else float(v)
    return v


def _records(df: pd.DataFrame) -> list[dict[str, Any]]:
    return [
        {k: _nan_to_none(v) for k, v in rec.items()} for rec in df.astype(object).to_dict(orient="records")
    ]


def to_json_obj(lb: Leaderboards, warnings: Sequence[str] = ()) -> dict[str, Any]:
    """JSON-ready dict: ``{"sort", "final": {dataset: [row...]}, "search": {...}, "warnings"}``; fractions, NaN → null."""
    return {
        "sort": lb.sort,
        "final": {ds: _records(t) for ds, t in lb.final.items()},
        "search": {ds: _records(t) for ds, t in lb.search.items()},
        "warnings": list(warnings),
    }


def to_frame(lb: Leaderboards) -> pd.DataFrame:
    """One long DataFrame of every table (for CSV): column ``table`` says ``final`` or ``search``.

    Final-table metrics are ``<metric>_mean`` / ``<metric>_ci95``; search-table metrics are
    ``val_<metric>``, so test and validation scores never share a column.
    """
    frames = [t.assign(**{TABLE: "final"}) for t in lb.final.values()]
    frames += [t.assign(**{TABLE: "search"}) for t in lb.search.values()]
    if not frames:
        return pd.DataFrame({TABLE: []})
    df = pd.concat(frames, ignore_index=True, sort=False)
    return df[[TABLE, *[c for c in df.columns if c != TABLE]]]


# ---- reproduce helpers ----------------------------------------------------------------------
def find_row(rows: pd.DataFrame, row_id: str, where: str = "the results folder") -> pd.Series:
    """The row with ``row_id``; an unknown id is a :class:`ConfigError` naming close ids.

    Close ids are ``difflib`` matches plus ids that contain the given text.
    """
    hit = rows[rows[schema.ROW_ID] == row_id]
    if len(hit):
        return hit.iloc[0]
    ids = [str(i) for i in rows[schema.ROW_ID]]
    near = close_matches(row_id, ids) + sorted(i for i in ids if row_id and row_id in i)
    near = sorted(dict.fromkeys(near))[:5]
    did = (
        f"did you mean {', '.join(near)}?" if near else "list them with `dmlbench leaderboard --format csv`."
    )
    raise ConfigError(f"no row with id {row_id!r} in {where} ({len(ids)} rows); {did}")


COMPARED_EXTRA = (schema.EPOCHS, schema.BEST_EPOCH, schema.STEPS)


def compare_metrics(
    stored: pd.Series, new: dict[str, float], extra: dict[str, Any] | None = None
) -> pd.DataFrame:
    """Stored vs re-run values side by side: columns ``metric, stored, new, diff`` (diff = new − stored).

    Metrics are the schema's metric columns set in either the stored row or the new run, then
    ``epochs, best_epoch, steps`` from ``extra``.

    Example:
        >>> s = pd.Series({"map_at_r": 0.25, "nmi": None, "epochs": 3, "best_epoch": 2, "steps": 30})
        >>> compare_metrics(s, {"map_at_r": 0.26}, {"epochs": 3}).round(6).values.tolist()
        [['map_at_r', 0.25, 0.26, 0.01], ['epochs', 3.0, 3.0, 0.0]]
    """

    def num(v: Any) -> float:
        return math.nan if v is None or pd.isna(v) else float(v)

    out = []
    for m in schema.METRIC_COLUMNS:
        s, n = num(stored.get(m)), num(new.get(m))
        if not (math.isnan(s) and math.isnan(n)):
            out.append((m, s, n, n - s))
    for k, v in (extra or {}).items():
        s, n = num(stored.get(k)), num(v)
        out.append((k, s, n, n - s))
    return pd.DataFrame(out, columns=["metric", "stored", "new", "diff"])
