"""End to end: ``dmlbench train --method diva --dataset digits`` learns, and every part moves.

Runs the real CLI (tiny backbone, CPU, 2 epochs), then reloads the checkpoint and compares it
with the freshly built (same seed) model: every head, every β and every decorrelation MLP changed
(they received gradients), the key encoder moved by EMA, and the queue holds unit-norm keys.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from typer.testing import CliRunner

from dmlbench.cli import app
from dmlbench.config import TrialConfig
from dmlbench.engine.backbones import build_backbone
from dmlbench.engine.trainer import seed_everything
from dmlbench.methods.diva import DiVA


def test_train_digits_beats_untrained_and_updates_every_part(tmp_path: Path) -> None:
    out = tmp_path / "run"
    res = CliRunner().invoke(
        app,
        ["train", "--method", "diva", "--dataset", "digits", "--epochs", "2", "--output", str(out),
         "--format", "json", "--set", "progress=false", "--set", "eval_heads=true",
         "--set", "eval_disc_weights=[0.5]"],
    )
    assert res.exit_code == 0, res.output
    payload = json.loads(res.stdout.strip().splitlines()[-1])
    untrained, trained = payload["untrained"]["map_at_r"], payload["metrics"]["map_at_r"]
    assert trained > untrained + 0.05, (untrained, trained)
    for key in ("head/discriminative/map_at_r", "head/intra/map_at_r", "w0.5-1-1-1/map_at_r"):
        assert key in payload["metrics"]

    cfg = TrialConfig.from_yaml((out / "config.yaml").read_text())
    ckpt = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    seed_everything(cfg.seed)
    init = DiVA.build(cfg, build_backbone(cfg), num_classes=len(ckpt["model"]["betas.discriminative"]))
    before = {k: v.clone() for k, v in init.state_dict().items()}
    trained_sd = ckpt["model"]

    def changed(prefix: str) -> bool:
        keys = [k for k in before if k.startswith(prefix)]
        assert keys, prefix
        return all(not torch.equal(before[k], trained_sd[k]) for k in keys)

    for h in ("discriminative", "selfsimilarity", "shared", "intra"):
        assert changed(f"heads.{h}."), h
    for h in ("discriminative", "shared", "intra"):
        assert changed(f"betas.{h}"), h
    for d in init.decorr:
        assert changed(f"decorr.{d}."), d
    assert changed("key_head.")
    # the key encoder moved, but it is not the online network (EMA, m = 0.9)
    key_w = [trained_sd[k] for k in trained_sd if k.startswith("key_backbone.") and k.endswith("weight")]
    online_w = [trained_sd["backbone." + k[len("key_backbone."):]] for k in trained_sd
                if k.startswith("key_backbone.") and k.endswith("weight")]
    init_w = [before[k] for k in before if k.startswith("key_backbone.") and k.endswith("weight")]
    assert any(not torch.equal(a, b) for a, b in zip(key_w, init_w))
    assert any(not torch.equal(a, b) for a, b in zip(key_w, online_w))
    # queue: filled (its FIFO rolling is checked step by step in test_diva_method.py)
    assert bool(trained_sd["queue.filled"]) and not bool(before["queue.filled"])
    q = trained_sd["queue.keys"]
    assert q.shape == (init.queue.size, init.head_dim)
    assert torch.allclose(q.norm(dim=1), torch.ones(len(q)), atol=1e-4)
    assert "miner_generator" in ckpt["extra"]
