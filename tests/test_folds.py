"""Fold-model groups (issue 17): a search trial's score is the fold mean of its models' best
validation metrics (ASHA chunks resume each model exactly), and a final seed's fold models give
"separate" test metrics and the metrics of their concatenated, normalised embedding."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from dmlbench.config import TrialConfig
from dmlbench.datasets import DATASETS
from dmlbench.engine import train
from dmlbench.evaluation import evaluate_embeddings
from dmlbench.orchestrator.folds import (
    FoldModel,
    best_so_far,
    concatenated_metrics,
    fold_configs,
    fold_mean_at,
    train_folds,
)

TINY: dict[str, Any] = {"method": "proxyanchor", "dataset": "digits", "backbone": "tiny", "pretrained": False,
                        "image_size": 16, "embedding_dim": 16, "bn_policy": "train", "epochs": 3,
                        "iters_per_epoch": 3, "classes_per_batch": 3, "samples_per_class": 4, "lr": 1e-3,
                        "num_folds": 3, "device": "cpu", "progress": False, "val_clustering": False,
                        "early_stop_metric": "map_at_r"}  # fmt: skip


def test_fold_mean_of_best_so_far() -> None:
    a = FoldModel(TrialConfig.from_dict({**TINY, "fold": 0}), {0: {"m": 0.1, "x": 1.0}, 1: {"m": 0.5, "x": 2.0},
                                                               2: {"m": 0.3, "x": 3.0}})  # fmt: skip
    b = FoldModel(TrialConfig.from_dict({**TINY, "fold": 1}), {0: {"m": 0.2, "x": 5.0}, 1: {"m": 0.1, "x": 6.0}})
    # epoch 1: a's best is epoch 1 (0.5, x 2), b's best is epoch 0 (0.2, x 5)
    assert fold_mean_at([a, b], "m", 1) == pytest.approx({"m": 0.35, "x": 3.5, "fold0/m": 0.5, "fold1/m": 0.2})
    # epoch 2: b stopped at 1, its best stays; a's best stays epoch 1: the score never drops
    assert fold_mean_at([a, b], "m", 2)["m"] == pytest.approx(0.35)
    assert fold_mean_at([a, FoldModel(a.cfg)], "m", 2) is None  # a model without an evaluation yet
    assert best_so_far(a.evals, "m", 0.5) == {"m": 0.1, "x": 1.0, "epoch": 0.0}


def test_search_group_chunks_resume_exactly_and_score_is_the_fold_mean(tmp_path: Path) -> None:
    base = TrialConfig.from_dict({**TINY, "output_dir": str(tmp_path / "chunked")})
    cfgs = fold_configs(base, [0, 1, 2])
    assert [c.fold for c in cfgs] == [0, 1, 2] and len({c.output_dir for c in cfgs}) == 3
    calls: list[int | None] = []

    def counting_train(cfg: TrialConfig, report: Any) -> Any:
        calls.append(cfg.fold)
        return train(cfg, report)

    reports: list[tuple[int, dict[str, float], str | None]] = []
    models = train_folds(cfgs, counting_train, "map_at_r", report=lambda e, m, c: reports.append((e, m, c)),
                         stops=[1, 2], checkpoint_dir=str(tmp_path / "chunked"))  # fmt: skip
    assert calls == [0, 1, 2] * 3  # three chunks: up to epoch 1, up to 2, to the end
    assert [e for e, _, _ in reports] == [0, 1, 2, 3]
    assert [c is not None for _, _, c in reports] == [False, True, True, True]  # a checkpoint per chunk end
    # each model resumed exactly: its results equal an uninterrupted run of the same config
    for f, m in enumerate(models):
        plain = train(TrialConfig.from_dict({**TINY, "fold": f, "output_dir": str(tmp_path / f"plain{f}")}))
        assert m.result.metrics == pytest.approx(plain.metrics) and m.result.epochs_run == 3
        assert [h["epoch"] for h in m.result.history] == [0, 1, 2, 3]
        assert len(m.result.history) == len(plain.history)
        for h, ph in zip(m.result.history, plain.history, strict=True):
            assert h == pytest.approx(ph)
    # the score at every epoch is the mean over folds of each model's best validation MAP@R so far
    for e, score, _ in reports:
        per = [max(h["map_at_r"] for h in m.result.history if h["epoch"] <= e) for m in models]
        assert score["map_at_r"] == pytest.approx(float(np.mean(per)))
        assert [score[f"fold{f}/map_at_r"] for f in range(3)] == pytest.approx(per)
    # the last score is MLRC's: the mean of the models' selected (best) validation scores
    assert reports[-1][1]["map_at_r"] == pytest.approx(np.mean([m.result.metrics["map_at_r"] for m in models]))


def digits_test_labels() -> np.ndarray:
    table = DATASETS.get("digits")().table()
    return table.labels[table.split == "test"]


def test_final_fold_models_and_concatenation(tmp_path: Path) -> None:
    base = TrialConfig.from_dict({**TINY, "phase": "final", "epochs": 2, "output_dir": str(tmp_path / "f")})
    models = train_folds(fold_configs(base, [0, 1, 2]), train, "map_at_r")
    labels = digits_test_labels()
    embs = [m.result.test_embedding for m in models]
    for m, e in zip(models, embs, strict=True):
        assert m.result.eval_split == "test" and e.shape == (len(labels), 16)
        # the kept embedding is the one the fold model's test metrics were computed on
        own = evaluate_embeddings(e, labels, distance="cosine", recall_ks=(1, 2, 4, 8), seed=base.seed)
        assert own["map_at_r"] == pytest.approx(m.result.test_metrics["map_at_r"])
    concat = concatenated_metrics(base, embs)
    manual = evaluate_embeddings(torch.nn.functional.normalize(torch.cat(embs, 1), dim=1), labels,
                                 distance="cosine", recall_ks=(1, 2, 4, 8), seed=base.seed)  # fmt: skip
    assert concat["map_at_r"] == pytest.approx(manual["map_at_r"])
    assert concat["precision_at_1"] == pytest.approx(manual["precision_at_1"])


def test_concatenation_uses_the_unit_ball_for_ccp() -> None:
    cfg = TrialConfig.from_dict({**TINY, "method": "ccp", "phase": "final", "params": {"proxies_per_class": 2,
                                                                                       "pool_size": 3}})  # fmt: skip
    labels = digits_test_labels()
    g = torch.Generator().manual_seed(0)
    # CCP's fold embeddings live in the unit ball (norms ≤ 1); their concatenation can leave it
    embs = [torch.nn.functional.normalize(torch.randn(len(labels), 8, generator=g), dim=1) * 0.9 for _ in range(3)]
    cat = torch.cat(embs, 1)
    proj = cat / cat.norm(dim=1, keepdim=True).clamp(min=1.0)
    want = evaluate_embeddings(proj, labels, distance="euclidean", recall_ks=(1, 2, 4, 8), seed=cfg.seed)
    got = concatenated_metrics(cfg, embs)
    assert got["map_at_r"] == pytest.approx(want["map_at_r"])
    l2 = evaluate_embeddings(torch.nn.functional.normalize(cat, dim=1), labels, distance="euclidean",
                             recall_ks=(1, 2, 4, 8), seed=cfg.seed)  # fmt: skip
    assert float(proj.norm(dim=1).max()) <= 1.0 + 1e-6 and float(cat.norm(dim=1).min()) > 1.0
    assert l2 is not None  # (L2 normalisation is another embedding; the projection is what CCP specifies)
    with pytest.raises(ValueError, match="test images"):
        concatenated_metrics(cfg, [e[:-1] for e in embs])


@pytest.mark.slow
def test_mlrc_sweep_rows_fold_mean_search_and_concatenated_final(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Through Ray Tune: search trials of 3 fold models (chunked at ASHA's rung), then one seed of
    3 fold models + their concatenation, with the real engine on digits."""
    pytest.importorskip("ray")
    import json

    from dmlbench.orchestrator.spec import SweepSpec
    from dmlbench.results import schema, store

    base = {k: v for k, v in TINY.items() if k not in ("method", "dataset", "backbone", "epochs", "num_folds")}
    spec = SweepSpec(methods=("proxyanchor",), datasets=("digits",), trials=2, epochs=2, grace_period=1,
                     final_seeds=1, folds=3, output=str(tmp_path / "out"), trial_base=base)  # fmt: skip
    assert [c.backbone for c in spec.cells()] == ["tiny"]
    run_on_local_ray(spec)
    df, warnings = store.read_rows(tmp_path / "out")
    assert warnings == []
    search = df[df[schema.PHASE] == "search"]
    final = df[df[schema.PHASE] == "final"]
    assert len(search) == 2 and set(search[schema.PROTOCOL]) == {"mlrc"} and search[schema.FOLD].isna().all()
    for _, r in search[search[schema.STATUS] == "complete"].iterrows():
        m = json.loads(r[schema.METRICS_JSON])
        per = [m[f"fold{f}/map_at_r"] for f in range(3)]
        assert r[schema.MAP_AT_R] == pytest.approx(float(np.mean(per)))  # the fold mean is the score
    fold_rows = final[final[schema.PROTOCOL] == "mlrc"]
    concat = final[final[schema.PROTOCOL] == "mlrc-concat3"]
    assert sorted(fold_rows[schema.FOLD].astype(int)) == [0, 1, 2] and len(concat) == 1
    assert set(final[schema.STATUS]) == {"complete"} and set(final[schema.EVAL_SPLIT]) == {"test"}
    assert int(concat.iloc[0][schema.EMBEDDING_DIM]) == 3 * 16 and concat.iloc[0][schema.MAP_AT_R] > 0
    assert (final[schema.BUDGET_CAPPED] == True).all()  # noqa: E712  (the preset's 8 epochs capped to 2)


def run_on_local_ray(spec: Any) -> None:
    """``sweep.run(spec)`` on a private local Ray (2 CPUs, a short temp dir: Ray's socket paths
    have a length limit), shut down and removed afterwards."""
    import shutil
    import tempfile

    import ray

    from dmlbench.orchestrator import sweep

    ray_tmp = tempfile.mkdtemp(prefix="rf")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=ray_tmp)
    try:
        sweep.run(spec, echo=lambda s: None)
    finally:
        ray.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.slow
def test_paper_sweep_runs_recipes_without_search(tmp_path: Path) -> None:
    """``--protocol paper`` on digits: nivMF trains once on all training classes (scored on test at
    the last epoch); CCP, whose paper used val-selected fold models, trains them and their
    concatenation; no search rows."""
    pytest.importorskip("ray")
    from dmlbench.orchestrator import sweep
    from dmlbench.results import schema, store

    spec = sweep.build_spec(methods="nivmf,ccp", datasets="digits", preset="smoke", final_seeds=1,
                            output=str(tmp_path / "out"), protocol="paper")  # fmt: skip
    run_on_local_ray(spec)
    df, _ = store.read_rows(tmp_path / "out")
    assert set(df[schema.PHASE]) == {"final"} and set(df[schema.STATUS]) == {"complete"}
    nivmf, ccp = df[df[schema.METHOD] == "nivmf"], df[df[schema.METHOD] == "ccp"]
    assert len(nivmf) == 1 and nivmf[schema.FOLD].isna().all() and set(nivmf[schema.PROTOCOL]) == {"paper"}
    assert nivmf.iloc[0][schema.PAPER_SELECTION] and nivmf.iloc[0][schema.EXTRAPOLATED]  # embedded stand-in
    assert sorted(ccp[schema.PROTOCOL]) == ["paper"] * 3 + ["paper-concat3"]
