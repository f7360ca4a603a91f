"""Leaderboards: pure functions from the rows DataFrame to tables (DESIGN §4, §8).

**Groups.** A line of a final table is one group of ``phase=final``, ``status=complete`` rows with
the same sweep, cell, protocol, split hash and config digest (:data:`GROUP_KEYS`): two sweeps are
never pooled, and neither are two configurations of one sweep. Rows of one seed inside a group
(the fold models of that seed) are averaged first; the line then summarises the seeds:

* n ≥ 3 seeds: mean ± half-width of the 95 % Student-t CI (``spread = ci95``);
* n = 2: mean ± sample standard deviation (``spread = std``; a 2-seed CI is too wide to mean much);
* n = 1: the value alone (``spread = none``).

**Tables.** One final table per (dataset, sweep, protocol), ranked by the sort metric inside it
(two protocols are never ranked together); a line whose CI overlaps the leader's CI is marked as
not significantly different (``vs_leader = overlaps``), one whose CI lies below it ``below``, and
lines without a CI (fewer than 3 seeds, on either side) ``untested``. ``source=paper`` rows can be
shown beside ours, unranked. One search table (validation scores) per (dataset, sweep): per cell,
the best complete trial and the trial counts. :func:`compare` puts two sweeps side by side.

The column names of these tables are the constants below; ``docs/results.md`` documents them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd
from scipy import stats

from dmlbench.errors import ConfigError, close_matches
from dmlbench.results import schema
from dmlbench.results.fields import config_digest
from dmlbench.results.paper import paper_meta

Phase = Literal["all", "final", "search"]
PHASES: tuple[str, ...] = ("all", "final", "search")
#: what makes two final rows the same line: never pooled across any of these
GROUP_KEYS: tuple[str, ...] = (
    schema.SWEEP_ID,
    schema.CELL,
    schema.PROTOCOL,
    schema.SPLIT_HASH,
    schema.CONFIG_DIGEST,
)

# ---- leaderboard columns (final table) ------------------------------------------------------
TABLE = "table"  # "final" | "search" (in the CSV / JSON outputs)
RANK = "rank"
N_SEEDS = "n_seeds"
N_TRIALS = "n_trials"
LABEL = "label"  # method as shown: the paper's own label for paper rows
VERIFIED = "verified"  # paper rows: yes | secondary | unverified
ROW_IDS = "row_ids"  # the rows an entry aggregates (space separated)
TRIAL_HOURS = "trial_hours"  # wall-clock hours of the rows (any device)
SPREAD = "spread"  # what "±" means on this line: ci95 | std | none
VS_LEADER = "vs_leader"  # leader | overlaps | below | untested (ours); empty for paper rows
MEAN_SUFFIX = "_mean"
STD_SUFFIX = "_std"  # sample standard deviation over seeds; empty for one seed
CI_SUFFIX = "_ci95"  # half-width of the 95 % CI; empty when n_seeds < MIN_SEEDS_FOR_CI
# ---- leaderboard columns (search table) -----------------------------------------------------
N_COMPLETE = "n_complete"
N_PRUNED = "n_pruned"
N_DIVERGED = "n_diverged"
N_FAILED = "n_failed"
BEST_ROW_ID = "best_row_id"
VAL_PREFIX = "val_"  # best trial's validation metrics: val_map_at_r, val_recall_at_1, ...
# ---- comparison columns ---------------------------------------------------------------------
DELTA = "delta"  # mean of sweep B − mean of sweep A (sort metric)
CIS = "cis"  # overlaps | differ | untested: do the two CIs overlap?
SAME_SPLIT = "same_split"  # yes | no | unknown
SIDE_A, SIDE_B = "_a", "_b"

CONFIDENCE = 0.95
MIN_SEEDS_FOR_CI = 3
SPREADS = ("ci95", "std", "none")
VS_LEADER_VALUES = ("leader", "overlaps", "below", "untested")
#: columns that hold counts or ids: integers in every output (never 32.0)
INT_COLUMNS: tuple[str, ...] = (
    RANK, N_SEEDS, N_TRIALS, schema.EMBEDDING_DIM, N_COMPLETE, N_PRUNED, N_DIVERGED, N_FAILED,
    N_SEEDS + SIDE_A, N_SEEDS + SIDE_B,
)  # fmt: skip
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
#: one line that says what the numbers of a final table mean (every output format prints it)
SPREAD_LEGEND = (
    "% on the test split. ± = 95% CI over seeds (n ≥ 3 seeds) or std marked 'sd' (n = 2). vs #1: ≈ CI "
    "overlaps the leader's (not significantly different), < CI below it, ? fewer than 3 seeds (not tested)."
)
VS_LEADER_MARKS = {"leader": "", "overlaps": "≈", "below": "<", "untested": "?"}


def display_name(metric: str) -> str:
    """Short human name of a metric column (``recall_at_1`` → ``R@1``)."""
    return _DISPLAY_NAMES.get(metric, metric)


def _finite(values: Iterable[float | None]) -> np.ndarray:
    arr = np.asarray([v for v in values if v is not None], dtype=np.float64)
    return arr[np.isfinite(arr)]


def mean_ci(values: Iterable[float], confidence: float = CONFIDENCE) -> tuple[float, float | None, int]:
    """Mean and Student-t confidence half-width of the finite values.

    half-width = t_{(1+confidence)/2, n−1} · s / √n with s the sample standard deviation (ddof 1).

    Args:
        values: one value per seed; NaN / None are ignored.
        confidence: two-sided level of the interval.

    Returns:
        ``(mean, half_width, n)``; ``half_width`` is None when fewer than two values remain, and
        ``mean`` is NaN when none remain. (The tables show it only from :data:`MIN_SEEDS_FOR_CI`
        seeds on: see :func:`seed_summary`.)

    Example:
        >>> m, h, n = mean_ci([0.5, 0.6, 0.7])
        >>> round(m, 6), round(h, 6), n          # t(0.975, 2) = 4.302653, s = 0.1
        (0.6, 0.248414, 3)
        >>> mean_ci([0.4, float("nan")])
        (0.4, None, 1)
    """
    arr = _finite(values)
    n = int(arr.size)
    if n == 0:
        return math.nan, None, 0
    mean = float(arr.mean())
    if n < 2:
        return mean, None, n
    sem = float(arr.std(ddof=1)) / math.sqrt(n)
    half = float(stats.t.ppf(0.5 + confidence / 2.0, n - 1)) * sem
    return mean, half, n


@dataclass(frozen=True)
class SeedSummary:
    """Mean over seeds with the spread the tables show: CI from 3 seeds on, std with 2, none with 1."""

    mean: float
    std: float | None
    ci95: float | None
    n: int

    @property
    def spread(self) -> str:
        """``ci95``, ``std`` or ``none``: what "±" means for this summary."""
        return "ci95" if self.ci95 is not None else ("std" if self.std is not None else "none")

    @property
    def half(self) -> float | None:
        """The ± value shown: the CI half-width, else the std, else None."""
        return self.ci95 if self.ci95 is not None else self.std


def seed_summary(values: Iterable[float | None], min_seeds_for_ci: int = MIN_SEEDS_FOR_CI) -> SeedSummary:
    """Summarise one value per seed (NaN / None ignored).

    Example:
        >>> s = seed_summary([0.5, 0.6, 0.7]); (round(s.ci95, 6), s.spread, s.n)
        (0.248414, 'ci95', 3)
        >>> s = seed_summary([0.5, 0.7]); (s.ci95, round(s.std, 6), s.spread)
        (None, 0.141421, 'std')
        >>> seed_summary([0.5]).spread
        'none'
    """
    arr = _finite(values)
    mean, half, n = mean_ci(arr.tolist())
    std = float(arr.std(ddof=1)) if n >= 2 else None
    return SeedSummary(mean, std, half if n >= min_seeds_for_ci else None, n)


def format_mean_spread(values: Iterable[float | None], percent: bool = True) -> str:
    """One value per seed → ``"27.00 ± 2.48 (95% CI, n=3)"`` / ``"± 1.41 (sd, n=2)"`` / ``"(n=1)"``.

    For plain-text summaries (the sweep's end-of-run table) that must say which spread they show.

    Example:
        >>> format_mean_spread([0.26, 0.28, 0.27])
        '27.00 ± 2.48 (95% CI, n=3)'
        >>> format_mean_spread([0.24, 0.22]), format_mean_spread([0.25]), format_mean_spread([])
        ('23.00 ± 1.41 (sd, n=2)', '25.00 (n=1)', '–')
    """
    s = seed_summary(values)
    if s.n == 0:
        return "–"
    k = 100.0 if percent else 1.0
    if s.half is None:
        return f"{k * s.mean:.2f} (n={s.n})"
    kind = "95% CI" if s.spread == "ci95" else "sd"
    return f"{k * s.mean:.2f} ± {k * s.half:.2f} ({kind}, n={s.n})"


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
    df: pd.DataFrame,
    *,
    datasets: Sequence[str] = (),
    methods: Sequence[str] = (),
    sweeps: Sequence[str] = (),
) -> pd.DataFrame:
    """Rows whose dataset / method / sweep is in the given lists (an empty list keeps everything)."""
    mask = pd.Series(True, index=df.index)
    if datasets:
        mask &= df[schema.DATASET].isin(list(datasets))
    if methods:
        mask &= df[schema.METHOD].isin(list(methods))
    if sweeps:
        mask &= df[schema.SWEEP_ID].isin(list(sweeps))
    return df[mask]


def _check_names(kind: str, wanted: Sequence[str], available: Iterable[Any], *, each: bool = False) -> None:
    """A :class:`ConfigError` when none of ``wanted`` (or, with ``each``, any of them) has rows."""
    have = sorted({str(a) for a in available if a is not None and not pd.isna(a)})
    missing = [w for w in wanted if w not in have]
    if missing and (each or len(missing) == len(wanted)):
        hint = close_matches(missing[0], have)
        did = f" (did you mean {', '.join(hint)}?)" if hint else ""
        raise ConfigError(
            f"no rows for {kind} {', '.join(repr(m) for m in missing)}{did}; {kind}s with rows: {', '.join(have) or 'none'}."
        )


def _ours(df: pd.DataFrame) -> pd.DataFrame:
    return df[df[schema.SOURCE] == "dmlbench"]


def with_digests(rows: pd.DataFrame) -> pd.DataFrame:
    """``rows`` with ``config_digest`` filled from ``config_json`` where it is NULL (rows before schema 2)."""
    digest = rows[schema.CONFIG_DIGEST]
    missing = digest.isna()
    if not missing.any():
        return rows
    out = rows.copy()
    out[schema.CONFIG_DIGEST] = out[schema.CONFIG_DIGEST].astype(object)
    out.loc[missing, schema.CONFIG_DIGEST] = [config_digest(c) for c in out.loc[missing, schema.CONFIG_JSON]]
    return out


def _sum_or_nan(values: pd.Series) -> float:
    v = pd.to_numeric(values, errors="coerce")
    return float(v.sum()) if v.notna().any() else math.nan


def _hours(wall_s: pd.Series) -> float:
    total = _sum_or_nan(wall_s)
    return total / 3600.0 if not math.isnan(total) else math.nan


def _none_if_na(v: Any) -> Any:
    return None if v is None or (not isinstance(v, str) and pd.isna(v)) else v


def _seed_keys(group: pd.DataFrame) -> list[tuple[str, Any]]:
    return [
        ("seed", s) if s is not None and not pd.isna(s) else ("row", r)
        for s, r in zip(group[schema.SEED], group[schema.ROW_ID], strict=True)
    ]


def per_seed(group: pd.DataFrame, metric: str) -> list[float]:
    """One value per seed of a group: rows of the same seed (fold models) are averaged first.

    Rows without a seed count as seeds of their own.

    Example:
        >>> g = pd.DataFrame({"seed": [0, 0, 1, None], "map_at_r": [0.2, 0.4, 0.5, 0.1], "row_id": list("abcd")})
        >>> per_seed(g, "map_at_r")
        [0.30000000000000004, 0.5, 0.1]
    """
    values: dict[tuple[str, Any], list[float]] = {}
    for key, v in zip(_seed_keys(group), pd.to_numeric(group[metric], errors="coerce"), strict=True):
        values.setdefault(key, [])
        if not pd.isna(v):
            values[key].append(float(v))
    return [float(np.mean(v)) if v else math.nan for v in values.values()]


def _vs_leader(table: pd.DataFrame, sort: str) -> list[str]:
    """``vs_leader`` of each ranked line of one (sweep, protocol) partition, by the sort metric's CI."""
    mean, ci = table[sort + MEAN_SUFFIX], table[sort + CI_SUFFIX]
    lead = table.index[table[RANK] == 1]
    if len(lead) == 0:
        return ["untested"] * len(table)
    lo_lead = float(mean[lead[0]] - ci[lead[0]]) if not pd.isna(ci[lead[0]]) else math.nan
    out = []
    for i in table.index:
        if table.at[i, RANK] == 1:
            out.append("leader")
        elif pd.isna(ci[i]) or math.isnan(lo_lead) or pd.isna(mean[i]):
            out.append("untested")
        else:
            out.append("overlaps" if float(mean[i] + ci[i]) >= lo_lead else "below")
    return out


def _final_columns(metrics: Sequence[str]) -> list[str]:
    return [
        schema.DATASET, schema.SOURCE, schema.SWEEP_ID, schema.METHOD, LABEL, schema.BACKBONE,
        schema.EMBEDDING_DIM, schema.PROTOCOL, schema.SPLIT_HASH, schema.CONFIG_DIGEST, N_SEEDS, N_TRIALS,
        schema.GPU_HOURS, TRIAL_HOURS, SPREAD,
        *[m + s for m in metrics for s in (MEAN_SUFFIX, STD_SUFFIX, CI_SUFFIX)],
        RANK, VS_LEADER, VERIFIED, schema.CITATION, ROW_IDS,
    ]  # fmt: skip


def _paper_entries(paper: pd.DataFrame, dataset: str, metrics: Sequence[str]) -> list[dict[str, Any]]:
    out = []
    for _, prow in paper[paper[schema.DATASET] == dataset].iterrows():
        meta = paper_meta(prow[schema.PARAMS_JSON])
        entry: dict[str, Any] = {
            schema.DATASET: dataset,
            schema.SOURCE: "paper",
            schema.SWEEP_ID: None,
            schema.METHOD: prow[schema.METHOD],
            LABEL: meta["paper_label"] or prow[schema.METHOD],
            schema.BACKBONE: prow[schema.BACKBONE],
            schema.EMBEDDING_DIM: _none_if_na(prow[schema.EMBEDDING_DIM]),
            schema.PROTOCOL: prow[schema.PROTOCOL],
            schema.SPLIT_HASH: None,
            schema.CONFIG_DIGEST: None,
            N_SEEDS: None,
            N_TRIALS: None,
            schema.GPU_HOURS: math.nan,
            TRIAL_HOURS: math.nan,
            SPREAD: "",
            VS_LEADER: "",
            VERIFIED: meta["verified"],
            schema.CITATION: prow[schema.CITATION],
            ROW_IDS: prow[schema.ROW_ID],
        }
        for m in metrics:
            v = prow[m]
            entry[m + MEAN_SUFFIX] = math.nan if v is None or pd.isna(v) else float(v)
            entry[m + STD_SUFFIX] = math.nan
            entry[m + CI_SUFFIX] = math.nan
        out.append(entry)
    return out


def _rank_partitions(table: pd.DataFrame, sort: str) -> pd.DataFrame:
    """Ranks and ``vs_leader`` of our lines, per (sweep, protocol); paper lines stay unranked."""
    key_col = sort + MEAN_SUFFIX
    table[RANK] = pd.Series([pd.NA] * len(table), dtype="Int64", index=table.index)
    ours = table[table[schema.SOURCE] == "dmlbench"]
    for _key, part in ours.groupby([schema.SWEEP_ID, schema.PROTOCOL], dropna=False, sort=False):
        ranks = part[key_col].rank(method="min", ascending=False, na_option="keep")
        table.loc[part.index, RANK] = ranks.astype("Int64")
        table.loc[part.index, VS_LEADER] = _vs_leader(table.loc[part.index], sort)
    return table


def final_table(
    rows: pd.DataFrame,
    dataset: str,
    *,
    sort: str = DEFAULT_SORT,
    paper: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Final-phase lines of one dataset, every sweep and protocol (split them with :func:`build`).

    Args:
        rows: all rows (any phase, any dataset); only this dataset's are used.
        dataset: dataset name.
        sort: metric to rank by (higher is better).
        paper: ``source=paper`` rows to show beside ours (unranked), or None.

    Returns:
        One line per :data:`GROUP_KEYS` group of our complete final rows, plus one per paper row;
        columns ``dataset, source, sweep_id, method, label, backbone, embedding_dim, protocol,
        split_hash, config_digest, n_seeds, n_trials, gpu_hours, trial_hours, spread,
        <metric>_mean, <metric>_std, <metric>_ci95 ..., rank, vs_leader, verified, citation,
        row_ids``; ranked within (sweep, protocol) and sorted by sweep, protocol and
        ``<sort>_mean`` (NaN last), paper lines last.
    """
    check_sort(sort)
    metrics = metrics_for(dataset, sort)
    ours = with_digests(_ours(rows[rows[schema.DATASET] == dataset]))
    final = ours[(ours[schema.PHASE] == "final") & (ours[schema.STATUS] == "complete")]
    search = ours[ours[schema.PHASE] == "search"]
    out: list[dict[str, Any]] = []
    for key, grp in final.groupby(list(GROUP_KEYS), dropna=False, sort=True):
        sweep_id, cell, protocol, split_hash, digest = key
        cell_search = search[(search[schema.SWEEP_ID] == sweep_id) & (search[schema.CELL] == cell)]
        first = grp.iloc[0]
        n_seeds = len(set(_seed_keys(grp)))
        entry: dict[str, Any] = {
            schema.DATASET: dataset,
            schema.SOURCE: "dmlbench",
            schema.SWEEP_ID: _none_if_na(sweep_id),
            schema.METHOD: first[schema.METHOD],
            LABEL: first[schema.METHOD],
            schema.BACKBONE: first[schema.BACKBONE],
            schema.EMBEDDING_DIM: _none_if_na(first[schema.EMBEDDING_DIM]),
            schema.PROTOCOL: _none_if_na(protocol),
            schema.SPLIT_HASH: _none_if_na(split_hash),
            schema.CONFIG_DIGEST: _none_if_na(digest),
            N_SEEDS: n_seeds,
            N_TRIALS: len(cell_search),
            schema.GPU_HOURS: _sum_or_nan(pd.concat([cell_search[schema.GPU_HOURS], grp[schema.GPU_HOURS]])),
            TRIAL_HOURS: _hours(pd.concat([cell_search[schema.WALL_TIME_S], grp[schema.WALL_TIME_S]])),
            SPREAD: "none" if n_seeds < 2 else ("std" if n_seeds < MIN_SEEDS_FOR_CI else "ci95"),
            VS_LEADER: "",
            VERIFIED: "",
            schema.CITATION: "",
            ROW_IDS: " ".join(sorted(grp[schema.ROW_ID])),
        }
        for m in metrics:
            s = seed_summary(per_seed(grp, m))
            entry[m + MEAN_SUFFIX] = s.mean
            entry[m + STD_SUFFIX] = math.nan if s.std is None else s.std
            entry[m + CI_SUFFIX] = math.nan if s.ci95 is None else s.ci95
        out.append(entry)
    if paper is not None:
        out += _paper_entries(paper, dataset, metrics)
    columns = _final_columns(metrics)
    table = pd.DataFrame(out, columns=[c for c in columns if c != RANK])
    table[schema.EMBEDDING_DIM] = table[schema.EMBEDDING_DIM].astype("Int64")
    table[N_SEEDS] = table[N_SEEDS].astype("Int64")
    table[N_TRIALS] = table[N_TRIALS].astype("Int64")
    table = _rank_partitions(table, sort)
    table["_paper"] = table[schema.SOURCE] != "dmlbench"
    table = table.sort_values(
        ["_paper", schema.SWEEP_ID, schema.PROTOCOL, sort + MEAN_SUFFIX],
        ascending=[True, True, True, False],
        na_position="last",
        kind="mergesort",
    ).reset_index(drop=True)
    return table[columns]


def search_table(rows: pd.DataFrame, dataset: str, *, sort: str = DEFAULT_SORT) -> pd.DataFrame:
    """Search-phase (validation) summary of one dataset: one line per (sweep, cell, protocol).

    The best trial is the complete search row with the highest ``sort`` value; its validation
    metrics are the ``val_*`` columns. Trial counts are per status; ``gpu_hours`` and
    ``trial_hours`` sum all trials. Sorted by sweep, then by ``val_<sort>`` (best first).
    """
    check_sort(sort)
    metrics = list(SEARCH_METRICS) + ([sort] if sort not in SEARCH_METRICS else [])
    ours = _ours(rows[rows[schema.DATASET] == dataset])
    search = ours[ours[schema.PHASE] == "search"]
    out: list[dict[str, Any]] = []
    keys = [schema.SWEEP_ID, schema.CELL, schema.PROTOCOL]
    for (sweep_id, _cell, protocol), grp in search.groupby(keys, dropna=False, sort=True):
        status = grp[schema.STATUS]
        complete = grp[(status == "complete") & grp[sort].notna()]
        best = complete.loc[complete[sort].idxmax()] if len(complete) else None
        first = grp.iloc[0]
        entry: dict[str, Any] = {
            schema.DATASET: dataset,
            schema.SWEEP_ID: _none_if_na(sweep_id),
            schema.METHOD: first[schema.METHOD],
            schema.BACKBONE: first[schema.BACKBONE],
            schema.PROTOCOL: _none_if_na(protocol),
            N_TRIALS: len(grp),
            N_COMPLETE: int((status == "complete").sum()),
            N_PRUNED: int((status == "pruned").sum()),
            N_DIVERGED: int((status == "diverged").sum()),
            N_FAILED: int((status == "failed").sum()),
            schema.GPU_HOURS: _sum_or_nan(grp[schema.GPU_HOURS]),
            TRIAL_HOURS: _hours(grp[schema.WALL_TIME_S]),
            BEST_ROW_ID: None if best is None else best[schema.ROW_ID],
        }
        for m in metrics:
            entry[VAL_PREFIX + m] = math.nan if best is None or pd.isna(best[m]) else float(best[m])
        out.append(entry)
    columns = [
        schema.DATASET, schema.SWEEP_ID, schema.METHOD, schema.BACKBONE, schema.PROTOCOL, N_TRIALS,
        N_COMPLETE, N_PRUNED, N_DIVERGED, N_FAILED, schema.GPU_HOURS, TRIAL_HOURS,
        *[VAL_PREFIX + m for m in metrics], BEST_ROW_ID,
    ]  # fmt: skip
    table = pd.DataFrame(out, columns=columns)
    return table.sort_values(
        [schema.SWEEP_ID, VAL_PREFIX + sort], ascending=[True, False], na_position="last", kind="mergesort"
    ).reset_index(drop=True)


@dataclass(frozen=True, order=True)
class TableKey:
    """Which table: a dataset, one sweep (None: published numbers only) and, for final tables, a protocol."""

    dataset: str
    sweep: str = ""
    protocol: str = ""


@dataclass
class Leaderboards:
    """The tables ``dmlbench leaderboard`` shows: final tables per (dataset, sweep, protocol), search per (dataset, sweep)."""

    sort: str
    final: dict[TableKey, pd.DataFrame] = field(default_factory=dict)
    search: dict[TableKey, pd.DataFrame] = field(default_factory=dict)

    def is_empty(self) -> bool:
        return not any(len(t) for t in [*self.final.values(), *self.search.values()])

    def keys(self) -> list[TableKey]:
        """Every table key in display order: per dataset and sweep, its final tables, then its search table."""
        return sorted(set(self.final) | set(self.search), key=lambda k: (k.dataset, k.sweep, k not in self.final, k))


def _text(v: Any) -> str:
    return "" if v is None or (not isinstance(v, str) and pd.isna(v)) else str(v)


def build(
    rows: pd.DataFrame,
    *,
    datasets: str | Sequence[str] | None = None,
    methods: str | Sequence[str] | None = None,
    sweeps: str | Sequence[str] | None = None,
    phase: str = "all",
    sort: str = DEFAULT_SORT,
    paper: pd.DataFrame | None = None,
) -> Leaderboards:
    """All leaderboard tables for the selected datasets / methods / sweeps / phase.

    Args:
        rows: the rows DataFrame (``store.read_rows``); paper rows in it are ignored here.
        datasets / methods / sweeps: names (list or comma-separated); None keeps all.
        phase: ``all``, ``final`` (test tables) or ``search`` (validation tables).
        sort: metric to rank and sort by.
        paper: published rows to show beside ours in the final tables (``--with-paper``).

    Raises:
        ConfigError: unknown phase or sort metric, a sweep without rows, or a filter that matches
            no rows.
    """
    if phase not in PHASES:
        raise ConfigError(f"unknown phase {phase!r}; valid phases: {', '.join(PHASES)}.")
    check_sort(sort)
    ds_list, m_list, sw_list = _split_names(datasets), _split_names(methods), _split_names(sweeps)
    ours = _ours(rows)
    pool = ours if paper is None else pd.concat([ours, paper], ignore_index=True)
    if ds_list:
        _check_names("dataset", ds_list, pool[schema.DATASET])
    if m_list:
        _check_names("method", m_list, pool[schema.METHOD])
    if sw_list:
        _check_names("sweep", sw_list, ours[schema.SWEEP_ID], each=True)
    ours = filter_rows(ours, datasets=ds_list, methods=m_list, sweeps=sw_list)
    paper_sel = None if paper is None else filter_rows(paper, datasets=ds_list, methods=m_list)
    names = set(ours[schema.DATASET])
    if paper_sel is not None and ds_list:
        names |= set(paper_sel[schema.DATASET])
    lb = Leaderboards(sort=sort)
    for ds in sorted(names):
        if phase in ("all", "final"):
            t = final_table(ours, ds, sort=sort)
            extra = None if paper_sel is None else final_table(ours.iloc[0:0], ds, sort=sort, paper=paper_sel)
            parts = list(t.groupby([schema.SWEEP_ID, schema.PROTOCOL], dropna=False, sort=True))
            for (sweep_id, protocol), part in parts:
                key = TableKey(ds, _text(sweep_id), _text(protocol))
                lb.final[key] = _with_paper(part, _paper_for(extra, _text(protocol)), sort)
            if not parts and extra is not None and len(extra):
                lb.final[TableKey(ds)] = extra.reset_index(drop=True)
        if phase in ("all", "search"):
            t = search_table(ours, ds, sort=sort)
            for sweep_id, part in t.groupby(schema.SWEEP_ID, dropna=False, sort=True):
                lb.search[TableKey(ds, _text(sweep_id))] = part.reset_index(drop=True)
    return lb


def _concat_models(protocol: str) -> int | None:
    """``k`` of a protocol label of concatenated fold-model embeddings (``...-concat<k>``), else None."""
    m = re.search(r"-concat(\d+)$", protocol)
    return int(m.group(1)) if m else None


def _paper_for(paper: pd.DataFrame | None, protocol: str) -> pd.DataFrame | None:
    """The published lines that belong beside our lines of ``protocol``: concatenated fold-model
    embeddings (``...-concat<k>``, same k) beside ours of that kind, every other published line
    (single models, fold means) beside our single-model tables."""
    if paper is None or not len(paper):
        return paper
    k = _concat_models(protocol)
    theirs = paper[schema.PROTOCOL].astype(str).map(_concat_models)
    keep = theirs == k if k is not None else theirs.isna()
    return paper[keep.to_numpy(dtype=bool)]


def _with_paper(ours: pd.DataFrame, paper: pd.DataFrame | None, sort: str) -> pd.DataFrame:
    """Our lines of one partition with the paper lines interleaved by the sort metric (unranked)."""
    if paper is None or not len(paper):
        return ours.reset_index(drop=True)
    both = pd.concat([ours, paper], ignore_index=True)
    both[RANK] = both[RANK].astype("Int64")
    return both.sort_values(
        sort + MEAN_SUFFIX, ascending=False, na_position="last", kind="mergesort"
    ).reset_index(drop=True)


# ---- two sweeps side by side ----------------------------------------------------------------
MATCH_KEYS: tuple[str, ...] = (schema.METHOD, schema.BACKBONE, schema.EMBEDDING_DIM, schema.PROTOCOL)


@dataclass
class Comparison:
    """``leaderboard --compare A B``: per dataset, the final lines of both sweeps matched by method, backbone, dim, protocol."""

    sweep_a: str
    sweep_b: str
    sort: str
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)


def _cis_overlap(ma: Any, ca: Any, mb: Any, cb: Any) -> str:
    if any(pd.isna(v) for v in (ma, ca, mb, cb)):
        return "untested"
    return "overlaps" if max(ma - ca, mb - cb) <= min(ma + ca, mb + cb) else "differ"


def compare(
    rows: pd.DataFrame,
    sweep_a: str,
    sweep_b: str,
    *,
    sort: str = DEFAULT_SORT,
    datasets: str | Sequence[str] | None = None,
    methods: str | Sequence[str] | None = None,
) -> Comparison:
    """Final lines of two sweeps side by side, per dataset.

    Lines are matched on (method, backbone, embedding_dim, protocol); a line only one sweep has
    appears with the other side empty. Columns: the match keys, then per side (suffix ``_a`` /
    ``_b``) ``n_seeds``, ``spread``, ``split_hash``, ``config_digest`` and ``<metric>_mean`` /
    ``_std`` / ``_ci95`` of every metric of the dataset; ``delta`` = B − A of the sort metric's
    mean; ``cis`` = ``overlaps`` / ``differ`` / ``untested`` (fewer than 3 seeds on a side);
    ``same_split`` = ``yes`` / ``no`` / ``unknown``.

    Raises:
        ConfigError: a sweep without rows, the same sweep twice, or nothing to compare.
    """
    check_sort(sort)
    if sweep_a == sweep_b:
        raise ConfigError(f"--compare needs two different sweeps, got {sweep_a!r} twice.")
    ours = _ours(rows)
    _check_names("sweep", [sweep_a, sweep_b], ours[schema.SWEEP_ID], each=True)
    ds_list, m_list = _split_names(datasets), _split_names(methods)
    ours = filter_rows(ours, datasets=ds_list, methods=m_list, sweeps=[sweep_a, sweep_b])
    cmp = Comparison(sweep_a, sweep_b, sort)
    for ds in sorted(set(ours[schema.DATASET])):
        t = final_table(ours, ds, sort=sort)
        metrics = metrics_for(ds, sort)
        keep = [*MATCH_KEYS, N_SEEDS, SPREAD, schema.SPLIT_HASH, schema.CONFIG_DIGEST]
        keep += [m + s for m in metrics for s in (MEAN_SUFFIX, STD_SUFFIX, CI_SUFFIX)]
        a = t[t[schema.SWEEP_ID] == sweep_a][keep]
        b = t[t[schema.SWEEP_ID] == sweep_b][keep]
        if not len(a) and not len(b):
            continue
        m = a.merge(b, on=list(MATCH_KEYS), how="outer", suffixes=(SIDE_A, SIDE_B), sort=True)
        mean_a, mean_b = m[sort + MEAN_SUFFIX + SIDE_A], m[sort + MEAN_SUFFIX + SIDE_B]
        m[DELTA] = mean_b - mean_a
        m[CIS] = [
            _cis_overlap(*v)
            for v in zip(
                mean_a, m[sort + CI_SUFFIX + SIDE_A], mean_b, m[sort + CI_SUFFIX + SIDE_B], strict=True
            )
        ]
        m[SAME_SPLIT] = [
            "unknown" if pd.isna(x) or pd.isna(y) else ("yes" if x == y else "no")
            for x, y in zip(m[schema.SPLIT_HASH + SIDE_A], m[schema.SPLIT_HASH + SIDE_B], strict=True)
        ]
        for col in (N_SEEDS + SIDE_A, N_SEEDS + SIDE_B, schema.EMBEDDING_DIM):
            m[col] = m[col].astype("Int64")
        m.insert(0, schema.DATASET, ds)
        cmp.tables[ds] = m.reset_index(drop=True)
    if not cmp.tables:
        raise ConfigError(
            f"sweeps {sweep_a!r} and {sweep_b!r} have no complete final rows to compare for these filters; "
            "run their final phase first."
        )
    return cmp


# ---- rendering ------------------------------------------------------------------------------
def _pct(v: Any) -> str:
    return "–" if v is None or pd.isna(v) else f"{100.0 * float(v):.2f}"


def format_cell(mean: Any, std: Any, ci: Any, n: Any) -> str:
    """A metric cell in percent that says which spread it shows.

    ``"65.43 ± 1.20"`` (95 % CI, n ≥ 3), ``"65.43 ± 0.80 sd"`` (std, n = 2), ``"65.43 (n=1)"``,
    and a paper number (no n) as is.

    Example:
        >>> format_cell(0.6543, 0.01, 0.012, 3), format_cell(0.6543, 0.008, None, 2)
        ('65.43 ± 1.20', '65.43 ± 0.80 sd')
        >>> format_cell(0.6543, None, None, 1), format_cell(0.7, None, None, None)
        ('65.43 (n=1)', '70.00')
    """
    if mean is None or pd.isna(mean):
        return "–"
    if ci is not None and not pd.isna(ci):
        return f"{_pct(mean)} ± {_pct(ci)}"
    if std is not None and not pd.isna(std):
        return f"{_pct(mean)} ± {_pct(std)} sd"
    if n is not None and not pd.isna(n):
        return f"{_pct(mean)} (n={int(n)})"
    return _pct(mean)


def _int_or_dash(v: Any) -> str:
    return "–" if v is None or pd.isna(v) else str(int(v))


def format_cost(gpu_hours: Any, trial_hours: Any) -> str:
    """``"1.20 GPU-h"`` when GPU time was charged, else ``"0.05 CPU h"`` (wall-clock hours of CPU-only trials), else ``–``.

    Example:
        >>> format_cost(1.2, 2.0), format_cost(0.0, 0.05), format_cost(float("nan"), float("nan"))
        ('1.20 GPU-h', '0.05 CPU h', '–')
    """
    if gpu_hours is not None and not pd.isna(gpu_hours) and float(gpu_hours) > 0:
        return f"{float(gpu_hours):.2f} GPU-h"
    if trial_hours is not None and not pd.isna(trial_hours) and float(trial_hours) > 0:
        return f"{float(trial_hours):.2f} CPU h"
    return "–"


def _short(v: Any, n: int = 8) -> str:
    return "–" if v is None or (not isinstance(v, str) and pd.isna(v)) or v == "" else str(v)[:n]


def display_final(table: pd.DataFrame, sort: str = DEFAULT_SORT) -> pd.DataFrame:
    """The final table as strings for people (percent, spread marked, paper rows labelled)."""
    metrics = [c[: -len(MEAN_SUFFIX)] for c in table.columns if c.endswith(MEAN_SUFFIX)]
    metrics = [sort] + [m for m in metrics if m != sort]
    out = pd.DataFrame(
        {
            "rank": [_int_or_dash(v) for v in table[RANK]],
            "vs #1": [VS_LEADER_MARKS.get(str(v), "") for v in table[VS_LEADER]],
            "method": [
                lbl if src == "dmlbench" else f"{lbl} [paper{'' if ver == 'yes' else ', ' + ver}; {proto}]"
                for lbl, src, ver, proto in zip(
                    table[LABEL], table[schema.SOURCE], table[VERIFIED], table[schema.PROTOCOL], strict=True
                )
            ],
            "backbone": table[schema.BACKBONE].fillna("–"),
            "dim": [_int_or_dash(v) for v in table[schema.EMBEDDING_DIM]],
            "seeds": [_int_or_dash(v) for v in table[N_SEEDS]],
        }
    )
    for m in metrics:
        name = display_name(m) + (" ▼" if m == sort else "")
        out[name] = [
            format_cell(a, s, c, n)
            for a, s, c, n in zip(
                table[m + MEAN_SUFFIX],
                table[m + STD_SUFFIX],
                table[m + CI_SUFFIX],
                table[N_SEEDS],
                strict=True,
            )
        ]
    out["trials"] = [_int_or_dash(v) for v in table[N_TRIALS]]
    out["cost"] = [
        format_cost(g, h) for g, h in zip(table[schema.GPU_HOURS], table[TRIAL_HOURS], strict=True)
    ]
    out["config"] = [_short(v) for v in table[schema.CONFIG_DIGEST]]
    out["split"] = [_short(v) for v in table[schema.SPLIT_HASH]]
    return out


def display_search(table: pd.DataFrame, sort: str = DEFAULT_SORT) -> pd.DataFrame:
    """The search table as strings for people (validation scores in percent)."""
    metrics = [c[len(VAL_PREFIX) :] for c in table.columns if c.startswith(VAL_PREFIX)]
    metrics = [sort] + [m for m in metrics if m != sort]
    out = pd.DataFrame(
        {
            "method": table[schema.METHOD],
            "backbone": table[schema.BACKBONE].fillna("–"),
            "trials": table[N_TRIALS].astype(int).astype(str),
        }
    )
    for m in metrics:
        out["best val " + display_name(m) + (" ▼" if m == sort else "")] = [
            _pct(v) for v in table[VAL_PREFIX + m]
        ]
    out["complete/pruned/diverged/failed"] = [
        f"{a}/{b}/{c}/{d}"
        for a, b, c, d in zip(
            table[N_COMPLETE], table[N_PRUNED], table[N_DIVERGED], table[N_FAILED], strict=True
        )
    ]
    out["cost"] = [
        format_cost(g, h) for g, h in zip(table[schema.GPU_HOURS], table[TRIAL_HOURS], strict=True)
    ]
    out["best trial"] = table[BEST_ROW_ID].fillna("–")
    return out


def display_compare(table: pd.DataFrame, cmp: Comparison) -> pd.DataFrame:
    """A comparison table as strings: per side seeds and the sort metric, then B − A and the CI test."""
    s = cmp.sort
    name = display_name(s)

    def side(suffix: str) -> list[str]:
        return [
            format_cell(a, sd, c, n)
            for a, sd, c, n in zip(
                table[s + MEAN_SUFFIX + suffix],
                table[s + STD_SUFFIX + suffix],
                table[s + CI_SUFFIX + suffix],
                table[N_SEEDS + suffix],
                strict=True,
            )
        ]

    marks = {"overlaps": "≈ overlap", "differ": "differ", "untested": "? n<3"}
    return pd.DataFrame(
        {
            "method": table[schema.METHOD],
            "backbone": table[schema.BACKBONE].fillna("–"),
            "dim": [_int_or_dash(v) for v in table[schema.EMBEDDING_DIM]],
            "protocol": table[schema.PROTOCOL].fillna("–"),
            f"A {name}": side(SIDE_A),
            f"B {name}": side(SIDE_B),
            "B − A": ["–" if pd.isna(v) else f"{100.0 * float(v):+.2f}" for v in table[DELTA]],
            "CIs": [marks[str(v)] for v in table[CIS]],
            "A seeds": [_int_or_dash(v) for v in table[N_SEEDS + SIDE_A]],
            "B seeds": [_int_or_dash(v) for v in table[N_SEEDS + SIDE_B]],
            "same split": table[SAME_SPLIT],
        }
    )


def final_title(key: TableKey) -> str:
    where = f"sweep {key.sweep}, protocol {key.protocol or '–'}" if key.sweep else "published numbers"
    return f"{key.dataset} — final phase, test split ({where})"


def search_title(key: TableKey) -> str:
    return (
        f"{key.dataset} — search phase, best validation scores (%; not test scores; sweep {key.sweep or '–'})"
    )


def compare_title(dataset: str, cmp: Comparison) -> str:
    return f"{dataset} — final phase, test split: A = {cmp.sweep_a} vs B = {cmp.sweep_b} ({display_name(cmp.sort)}, %)"


COMPARE_LEGEND = (
    "mean ± 95% CI over seeds when n ≥ 3, ± std marked 'sd' when n = 2; CIs: ≈ overlap (not significantly "
    "different), differ (disjoint), ? fewer than 3 seeds on a side (not tested)."
)


def _markdown_table(df: pd.DataFrame) -> str:
    def esc(v: Any) -> str:
        return str(v).replace("|", "\\|")

    head = "| " + " | ".join(esc(c) for c in df.columns) + " |"
    sep = "|" + "|".join("---" for _ in df.columns) + "|"
    body = ["| " + " | ".join(esc(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, sep, *body])


def _paper_citations(table: pd.DataFrame) -> list[str]:
    return sorted(set(table.loc[table[schema.SOURCE] == "paper", schema.CITATION]))


def to_markdown(lb: Leaderboards) -> str:
    """Markdown: one heading, one legend line and one pipe table per table."""
    parts: list[str] = []
    for key in lb.keys():
        if key in lb.final:
            t = lb.final[key]
            parts += [
                f"## {final_title(key)}",
                "",
                SPREAD_LEGEND,
                "",
                _markdown_table(display_final(t, lb.sort)),
                "",
            ]
            cites = _paper_citations(t)
            if cites:
                parts += ["Paper rows (not ranked; their protocol differs from ours where shown):", ""]
                parts += [f"- {c}" for c in cites] + [""]
        if key in lb.search:
            parts += [
                f"## {search_title(key)}",
                "",
                _markdown_table(display_search(lb.search[key], lb.sort)),
                "",
            ]
    return "\n".join(parts).rstrip() + "\n"


def compare_markdown(cmp: Comparison) -> str:
    """Markdown of a comparison: per dataset a heading, the legend and one pipe table."""
    parts: list[str] = []
    for ds, t in cmp.tables.items():
        parts += [
            f"## {compare_title(ds, cmp)}",
            "",
            COMPARE_LEGEND,
            "",
            _markdown_table(display_compare(t, cmp)),
            "",
        ]
    return "\n".join(parts).rstrip() + "\n"


# ---- LaTeX (booktabs) -----------------------------------------------------------------------
_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
    "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
}  # fmt: skip


def latex_escape(text: str) -> str:
    r"""Escape LaTeX's special characters.

    Example:
        >>> latex_escape("R@1 & 50% of x_1")
        'R@1 \\& 50\\% of x\\_1'
    """
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in str(text))


def _latex_cell(text: str) -> str:
    """A display cell in LaTeX: ``±`` as ``$\\pm$``, ``≈``/``▼`` as math, the rest escaped."""
    out = latex_escape(text)
    for a, b in (("±", r"$\pm$"), ("≈", r"$\approx$"), ("▼", r"$\downarrow$"), ("−", "--"), ("–", "--")):
        out = out.replace(a, b)
    return out


def _latex_tabular(df: pd.DataFrame, caption: str, bold: dict[str, int] | None = None) -> str:
    """One ``table`` with a booktabs ``tabular``; ``bold`` = {column: row index} to set in bold."""
    align = "".join("l" if i < 2 or not any(ch.isdigit() for ch in str(df.iloc[0, i])) else "r"
                    for i in range(df.shape[1])) if len(df) else "l" * df.shape[1]  # fmt: skip
    lines = [
        r"\begin{table}[t]",
        r"\centering",
        r"\caption{" + _latex_cell(caption) + "}",
        r"\begin{tabular}{" + align + "}",
        r"\toprule",
        " & ".join(_latex_cell(str(c)) for c in df.columns) + r" \\",
        r"\midrule",
    ]
    for i, row in enumerate(df.itertuples(index=False)):
        cells = []
        for col, v in zip(df.columns, row, strict=True):
            cell = _latex_cell(str(v))
            cells.append(r"\textbf{" + cell + "}" if bold and bold.get(col) == i else cell)
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines)


def _best_rows(table: pd.DataFrame, shown: pd.DataFrame, sort: str) -> dict[str, int]:
    """Column of ``shown`` → index of our line with the best mean of that metric (for bold)."""
    ours = table[table[schema.SOURCE] == "dmlbench"]
    out: dict[str, int] = {}
    for col in shown.columns:
        for m in [c[: -len(MEAN_SUFFIX)] for c in table.columns if c.endswith(MEAN_SUFFIX)]:
            if (
                col in (display_name(m), display_name(m) + " ▼")
                and len(ours)
                and ours[m + MEAN_SUFFIX].notna().any()
            ):
                out[col] = int(ours[m + MEAN_SUFFIX].idxmax())
    return out


def to_latex(lb: Leaderboards) -> str:
    """LaTeX (booktabs): one ``table`` per leaderboard table; the best of our means per metric in bold."""
    parts = [r"% dmlbench leaderboard; needs \usepackage{booktabs} and \usepackage{amssymb}"]
    for key in lb.keys():
        if key in lb.final:
            t = lb.final[key]
            shown = display_final(t, lb.sort).drop(columns=["config", "split", "cost", "trials"])
            caption = f"{final_title(key)}. {SPREAD_LEGEND} Bold: best of our means."
            parts.append(_latex_tabular(shown, caption, _best_rows(t, shown, lb.sort)))
        if key in lb.search:
            shown = display_search(lb.search[key], lb.sort).drop(columns=["best trial"])
            parts.append(_latex_tabular(shown, search_title(key)))
    return "\n\n".join(parts) + "\n"


def compare_latex(cmp: Comparison) -> str:
    """LaTeX (booktabs) of a comparison: one ``table`` per dataset."""
    parts = [r"% dmlbench sweep comparison; needs \usepackage{booktabs} and \usepackage{amssymb}"]
    for ds, t in cmp.tables.items():
        parts.append(_latex_tabular(display_compare(t, cmp), f"{compare_title(ds, cmp)}. {COMPARE_LEGEND}"))
    return "\n\n".join(parts) + "\n"


# ---- machine-readable -----------------------------------------------------------------------
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
        {k: _nan_to_none(v) for k, v in rec.items()}
        for rec in _ints(df).astype(object).to_dict(orient="records")
    ]


def _ints(df: pd.DataFrame) -> pd.DataFrame:
    """Integer columns (:data:`INT_COLUMNS`) as nullable integers, so no output writes ``32.0``."""
    out = df.copy()
    for col in INT_COLUMNS:
        if col in out.columns:
            out[col] = pd.to_numeric(out[col], errors="coerce").round().astype("Int64")
    return out


def _by_dataset(tables: dict[TableKey, pd.DataFrame]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for key in sorted(tables):
        out.setdefault(key.dataset, []).extend(_records(tables[key]))
    return out


def to_json_obj(lb: Leaderboards, warnings: Sequence[str] = ()) -> dict[str, Any]:
    """JSON-ready dict: ``{"sort", "final": {dataset: [line...]}, "search": {...}, "legend", "warnings"}``.

    Lines of every sweep and protocol of a dataset are in one list (each says its ``sweep_id``,
    ``protocol`` and ``rank`` inside them); metrics are fractions, NaN → null, counts are integers.
    """
    return {
        "sort": lb.sort,
        "final": _by_dataset(lb.final),
        "search": _by_dataset(lb.search),
        "legend": SPREAD_LEGEND,
        "warnings": list(warnings),
    }


def compare_json_obj(cmp: Comparison, warnings: Sequence[str] = ()) -> dict[str, Any]:
    """JSON-ready dict of a comparison: ``{"sweep_a", "sweep_b", "sort", "tables": {dataset: [...]}, ...}``."""
    return {
        "sweep_a": cmp.sweep_a,
        "sweep_b": cmp.sweep_b,
        "sort": cmp.sort,
        "tables": {ds: _records(t) for ds, t in cmp.tables.items()},
        "legend": COMPARE_LEGEND,
        "warnings": list(warnings),
    }


def to_frame(lb: Leaderboards) -> pd.DataFrame:
    """One long DataFrame of every table (for CSV): column ``table`` says ``final`` or ``search``.

    Final-table metrics are ``<metric>_mean`` / ``_std`` / ``_ci95``; search-table metrics are
    ``val_<metric>``, so test and validation scores never share a column. Counts stay integers.
    """
    frames = [t.assign(**{TABLE: "final"}) for _, t in sorted(lb.final.items())]
    frames += [t.assign(**{TABLE: "search"}) for _, t in sorted(lb.search.items())]
    if not frames:
        return pd.DataFrame({TABLE: []})
    df = pd.concat(frames, ignore_index=True, sort=False)
    return _ints(df[[TABLE, *[c for c in df.columns if c != TABLE]]])


def compare_frame(cmp: Comparison) -> pd.DataFrame:
    """Every comparison table in one DataFrame (for CSV); counts stay integers."""
    if not cmp.tables:
        return pd.DataFrame({schema.DATASET: []})
    return _ints(pd.concat(list(cmp.tables.values()), ignore_index=True, sort=False))


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
