"""Integration: nivmf trains on the embedded digits set (tiny CPU backbone) and beats the untrained
network's validation MAP@R (the epoch-0 report)."""

from __future__ import annotations

import math

from dmlbench.engine import train
from dmlbench.engine.resolve import layered_config


def test_nivmf_digits_beats_untrained_map_at_r() -> None:
    # the settings `dmlbench train --method nivmf --dataset digits` resolves (embedded preset +
    # nivmf's recommended smoke params), shortened to 4 epochs of 12 steps
    cfg = layered_config("nivmf", "digits", explicit={"epochs": 4, "iters_per_epoch": 12, "progress": False,
                                                      "seed": 0})
    assert cfg.backbone == "tiny" and cfg.params["log_cp"] == "exact"
    reports: list[tuple[int, dict[str, float]]] = []
    result = train(cfg, report=lambda epoch, metrics, ckpt: reports.append((epoch, dict(metrics))))
    assert reports[0][0] == 0 and reports[-1][0] == 4
    untrained = reports[0][1]["map_at_r"]
    final = reports[-1][1]
    assert final["map_at_r"] > untrained + 0.02, (untrained, final["map_at_r"])
    assert math.isfinite(final["loss"]) and final["temp"] > 0
    assert final["img_kappa_mean"] > 0  # the image concentration (embedding norm) is logged
    # the raw embedding is also scored by euclidean distance (spec §3), with its own values
    assert 0 < final["euclidean_raw/map_at_r"] <= 1 and 0 < final["euclidean_raw/recall_at_1"] <= 1
    assert final["euclidean_raw/map_at_r"] != final["map_at_r"]
    assert result.epochs_run == 4 and result.steps == 48
