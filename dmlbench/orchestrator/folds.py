"""What one trial trains: a group of class-disjoint fold models (docs/protocol.md).

* **search** (``mlrc``): a trial trains one model per search fold (train minus fold i, validated on
  fold i). Its score at epoch e is the mean over the fold models of each model's best validation
  metrics up to e (:func:`fold_mean_at`): non-decreasing, so a trial ASHA stops hands the searcher
  its best-so-far value, and at the end it equals the mean of the models' selected (early-stopped)
  validation scores, MLRC's score of a configuration. The models train in lockstep chunks that end
  at ASHA's rungs and at periodic checkpoints (``stops``, :func:`planning.group_stops`): each fold
  model trains up to the stop (the engine saved its ``last`` checkpoint before it reported), then
  the next; after the chunk the trial reports the fold mean of every epoch in it, with a checkpoint
  of all its models, so ASHA decides at its rungs on the fold mean and a restarted trial resumes
  from the last chunk. The next chunk resumes each model from its checkpoint.
* **final**: per seed, every fold model trains to its end (in the same periodic chunks) and is scored once on the test split;
  the rows are one per fold model (their mean is the "separate" number) and one for the
  concatenated, normalised embedding of the seed's fold models (:func:`concatenated_metrics`).

Pure of Ray: ``train_fn(cfg, report)`` is :func:`dmlbench.engine.train` or a test double.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dmlbench.config import TrialConfig

#: ``report(epoch, fold-mean metrics, checkpoint folder or None)``; the folder is given with the
#: last report of a chunk (all fold models' ``last`` checkpoints are then on disk)
GroupReport = Callable[[int, dict[str, float], "str | None"], None]


class _Pause(Exception):
    """Raised from a fold model's report at the end of a chunk (its ``last`` checkpoint is saved)."""


@dataclass
class FoldModel:
    """One fold model of a group: its config, its validation reports and its result once done."""

    cfg: TrialConfig
    evals: dict[int, dict[str, float]] = field(default_factory=dict)
    result: Any = None

    @property
    def done(self) -> bool:
        return self.result is not None


def fold_configs(cfg: TrialConfig, folds: Sequence[int | None]) -> list[TrialConfig]:
    """One config per fold (each in its own ``fold<i>`` output folder when there are several)."""
    if len(folds) == 1:
        return [cfg.replace(fold=folds[0])]
    out = []
    for f in folds:
        sub = str(Path(cfg.output_dir) / f"fold{f}") if cfg.output_dir else None
        out.append(cfg.replace(fold=f, output_dir=sub))
    return out


def finite_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The entries of ``metrics`` that are finite numbers, as floats.

    Example:
        >>> finite_metrics({"a": 1, "b": float("nan"), "c": "x"})
        {'a': 1.0}
    """
    out: dict[str, float] = {}
    for k, v in metrics.items():
        try:
            f = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(f):
            out[k] = f
    return out


def best_so_far(evals: dict[int, dict[str, float]], metric: str, upto: float) -> dict[str, float] | None:
    """The metrics of the best evaluation (by ``metric``, first on ties) among epochs ≤ ``upto``.

    Example:
        >>> best_so_far({0: {"m": 0.1}, 1: {"m": 0.3}, 2: {"m": 0.2}}, "m", 2)
        {'m': 0.3, 'epoch': 1.0}
    """
    best: dict[str, float] | None = None
    for e in sorted(evals):
        if e > upto or metric not in evals[e]:
            continue
        if best is None or evals[e][metric] > best[metric]:
            best = {**evals[e], "epoch": float(e)}
    return best


def fold_mean(per_fold: Sequence[dict[str, float]]) -> dict[str, float]:
    """Mean of every metric all fold models have.

    Example:
        >>> fold_mean([{"m": 0.2, "x": 1.0}, {"m": 0.4}])
        {'m': 0.30000000000000004}
    """
    keys = set(per_fold[0]).intersection(*per_fold[1:]) if per_fold else set()
    return {k: sum(d[k] for d in per_fold) / len(per_fold) for k in sorted(keys)}


def fold_mean_at(models: Sequence[FoldModel], metric: str, epoch: float) -> dict[str, float] | None:
    """A group's score at ``epoch``: the fold mean of each model's best validation metrics so far,
    plus ``fold<i>/<metric>`` per model; None while some model has no evaluation yet."""
    per = [best_so_far(m.evals, metric, epoch) for m in models]
    if any(p is None for p in per):
        return None
    got = [p for p in per if p is not None]
    out = fold_mean([{k: v for k, v in p.items() if k != "epoch"} for p in got])
    for m, p in zip(models, got, strict=True):
        out[f"fold{m.cfg.fold}/{metric}"] = p[metric]
    return out


def train_folds(
    cfgs: Sequence[TrialConfig],
    train_fn: Callable[..., Any],
    metric: str,
    report: GroupReport | None = None,
    stops: Sequence[int] = (),
    checkpoint_dir: str | None = None,
) -> list[FoldModel]:
    """Train every fold model of a group; see the module docstring.

    Args:
        cfgs: one config per fold model (:func:`fold_configs`).
        train_fn: ``train(cfg, report)``; called again after a pause, and then resumes from the
            model's ``last`` checkpoint (a test double without checkpoints may start over: reports
            of epochs it already made are taken again).
        metric: the validation metric of the group score.
        report: gets the fold mean of every evaluated epoch, in order, after each chunk.
        stops: epochs where a chunk ends (ASHA's rungs); empty: each model trains to its end in turn.
        checkpoint_dir: handed to ``report`` with the last report of a chunk (the folder holding
            every fold model's checkpoints).

    Exceptions of ``train_fn`` (divergence, errors) propagate: one failed fold model fails the trial.
    """
    models = [FoldModel(c) for c in cfgs]
    reported = -math.inf
    for stop in [*sorted(set(stops)), math.inf]:
        for m in models:
            if m.done:
                continue

            def rep(epoch: int, metrics: dict[str, float], ckpt: str | None, m: FoldModel = m,
                    stop: float = stop) -> None:  # fmt: skip
                clean = finite_metrics(metrics)
                if metric in clean:
                    m.evals[int(epoch)] = clean
                if epoch >= stop:
                    raise _Pause

            try:
                m.result = train_fn(m.cfg, rep)
            except _Pause:
                pass
        epochs = sorted({e for m in models for e in m.evals if reported < e <= stop})
        if report is not None:
            for i, e in enumerate(epochs):
                score = fold_mean_at(models, metric, e)
                if score is not None:
                    report(e, score, checkpoint_dir if i == len(epochs) - 1 else None)
        if epochs:
            reported = epochs[-1]
        if all(m.done for m in models):
            break
    return models


def concatenated_metrics(cfg: TrialConfig, embeddings: Sequence[Any]) -> dict[str, float]:
    """Test metrics of the concatenated fold-model embedding of one seed.

    Each fold model's primary test embedding is concatenated and normalised the way the method
    compares embeddings: L2 (cosine methods: ``normalize(cat_k e_k)``, each ``e_k`` already unit
    norm) or the unit-ball projection (CCP: ``proj(cat_k proj(e_k))``, spec ccp.md §4.1), then
    scored like a single model's test embedding (query/gallery on In-Shop).
    """
    import torch

    from dmlbench.datasets import trial_source
    from dmlbench.evaluation import evaluate_embeddings
    from dmlbench.methods import METHODS

    method = METHODS.get(cfg.method)
    source = trial_source(cfg)
    table = source.table()
    test = (table.split == "test").nonzero()[0]
    cat = torch.cat([torch.as_tensor(e).float() for e in embeddings], dim=1)
    if cat.shape[0] != len(test):
        raise ValueError(f"fold-model test embeddings have {cat.shape[0]} rows but {cfg.dataset} has {len(test)} test images")
    if method.eval_distance == "euclidean":
        cat = cat / cat.norm(dim=1, keepdim=True).clamp(min=1.0)
    else:
        cat = torch.nn.functional.normalize(cat, dim=1)
    kwargs: dict[str, Any] = dict(recall_ks=source.recall_ks, chunk_size=cfg.eval_chunk, backend=cfg.knn_backend,
                                  seed=cfg.seed)  # fmt: skip
    if source.query_gallery and table.is_query is not None and table.is_gallery is not None:
        kwargs["query_mask"] = table.is_query[test]
        kwargs["gallery_mask"] = table.is_gallery[test]
    res = evaluate_embeddings(cat, table.labels[test], distance=method.eval_distance, **kwargs)
    return {k: float(v) for k, v in res.items()}
