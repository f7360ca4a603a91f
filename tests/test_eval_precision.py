"""Evaluation embeddings are float32 under bf16 autocast, and validation clusters the primary key only."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import dmlbench.engine.trainer as trainer_mod
from dmlbench.config import TrialConfig
from dmlbench.engine import train
from dmlbench.engine.backbones import build_backbone
from dmlbench.engine.trainer import embed_indices, prepare_data
from dmlbench.methods import METHODS


def _method(cfg: TrialConfig, data: trainer_mod.TrialData) -> Any:
    torch.manual_seed(0)
    return METHODS.get(cfg.method).build(cfg, build_backbone(cfg), num_classes=len(data.label_map))


@pytest.mark.parametrize("method", ["proxyanchor", "nivmf"])
def test_eval_embeddings_are_float32_under_bf16_autocast(tiny_cfg: dict[str, Any], method: str) -> None:
    cfg16 = TrialConfig.from_dict({**tiny_cfg, "method": method, "amp": "bf16"})
    cfg32 = TrialConfig.from_dict({**tiny_cfg, "method": method, "amp": "off"})
    data = prepare_data(cfg32)
    m = _method(cfg32, data)
    idx = data.split.val[:64]
    cpu = torch.device("cpu")
    got = embed_indices(m, data.table, idx, cfg16, cpu, data.source.embedded)
    ref = embed_indices(m, data.table, idx, cfg32, cpu, data.source.embedded)
    assert got.keys() == ref.keys() and len(got) >= 1
    for key, emb in got.items():
        assert emb.dtype == torch.float32 and emb.device == cpu, key
        # close to the float32 path: only the trunk ran in bf16
        assert torch.allclose(emb, ref[key], atol=0.05, rtol=0.05), (key, (emb - ref[key]).abs().max())
    assert torch.allclose(got[""].norm(dim=1), torch.ones(len(idx)), atol=1e-6)
    if "euclidean_raw" in got:  # nivMF's raw head output: float32 values, not bf16 ones cast up
        raw = got["euclidean_raw"]
        assert (raw != raw.bfloat16().float()).float().mean() > 0.5


def test_head_runs_in_float32_on_bf16_trunk_features(tiny_cfg: dict[str, Any]) -> None:
    cfg = TrialConfig.from_dict({**tiny_cfg, "method": "proxyanchor", "amp": "bf16"})
    data = prepare_data(cfg)
    m = _method(cfg, data).eval()
    x = torch.rand(8, 3, cfg.image_size, cfg.image_size)
    with torch.no_grad(), trainer_mod.eval_precision(m, cfg, torch.device("cpu")):
        got = m.embed(x)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            feats = m.backbone.trunk(m.backbone.input_norm(x))
        want = torch.nn.functional.normalize(m.backbone.head(feats.float()), dim=-1)
    assert feats.dtype == torch.bfloat16  # the trunk does run under autocast
    assert got.dtype == torch.float32
    assert torch.equal(got, want)
    assert not torch.is_autocast_enabled("cpu")  # the hooks left nothing behind
    with torch.no_grad():
        m.embed(x)  # and are gone: a plain forward runs in float32 here
    assert not m.backbone.trunk._forward_hooks and not m.backbone.trunk._forward_pre_hooks


def test_validation_clusters_only_the_primary_embedding(tiny_cfg: dict[str, Any],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """nivMF adds ``euclidean_raw``: validation scores it without k-means, the test split with."""
    seen: list[tuple[str, str, bool]] = []
    real = trainer_mod.evaluate_indices

    def spy(*args: Any, **kwargs: Any) -> dict[str, float]:
        out = real(*args, **kwargs)
        split = "val" if "cluster_keys" in kwargs else "test"
        for k in ("nmi", "euclidean_raw/nmi", "euclidean_raw/map_at_r"):
            seen.append((split, k, k in out))
        return out

    monkeypatch.setattr(trainer_mod, "evaluate_indices", spy)
    res = train(TrialConfig.from_dict({**tiny_cfg, "method": "nivmf", "epochs": 1, "phase": "final"}))
    assert ("val", "nmi", True) in seen and ("val", "euclidean_raw/map_at_r", True) in seen
    assert ("val", "euclidean_raw/nmi", False) in seen and ("val", "euclidean_raw/nmi", True) not in seen
    assert res.test_metrics is not None
    assert "euclidean_raw/nmi" in res.test_metrics and "euclidean_raw/f1" in res.test_metrics
    assert all("euclidean_raw/nmi" not in h for h in res.history)


def test_early_stop_on_an_extra_keys_nmi_still_clusters_that_key(tiny_cfg: dict[str, Any]) -> None:
    res = train(TrialConfig.from_dict({**tiny_cfg, "method": "nivmf", "epochs": 1,
                                       "early_stop_metric": "euclidean_raw/nmi"}))
    assert all("euclidean_raw/nmi" in h for h in res.history)
