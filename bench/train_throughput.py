"""Training and evaluation throughput of the benchmark backbones (images per second), for the
sweep planner's GPU-hour estimate (``dmlbench.orchestrator.planning.TRAIN_IMAGES_PER_S``).

For each (backbone, image size, batch) it builds dmlbench's own backbone (random weights: the
throughput does not depend on them), and times, after warm-up steps:

* train: forward + backward + Adam step under the engine's autocast (bf16 on CUDA), frozen BN
  statistics as the recipes use;
* eval: forward only, in eval mode, batches of 256.

Not a comparison, so no ratio: it measures the constants the planner divides by. Prints one JSON
line per setting.

Usage::

    python bench/train_throughput.py                 # resnet50@224 b64/b112, bninception@227 b32
    python bench/train_throughput.py --steps 10      # quicker
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from dmlbench.config import TrialConfig
from dmlbench.engine.backbones import build_backbone
from dmlbench.engine.trainer import autocast_for

SETTINGS = (("resnet50", 224, 64, "frozen_stats"), ("resnet50", 224, 112, "frozen_stats"),
            ("bninception", 227, 32, "frozen_all"))  # fmt: skip


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(backbone: str, size: int, batch: int, bn: str, steps: int, device: torch.device) -> dict[str, object]:
    cfg = TrialConfig(method="proxyanchor", dataset="digits", backbone=backbone, pretrained=False,
                      image_size=size, embedding_dim=128, bn_policy=bn, device=str(device))  # fmt: skip
    model = build_backbone(cfg).to(device)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    x = torch.rand(batch, 3, size, size, device=device)
    model.train()
    for i in range(steps + 5):
        if i == 5:
            _sync(device)
            t0 = time.perf_counter()
        with autocast_for(cfg, device):
            loss = model(x).float().pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    _sync(device)
    train_ips = steps * batch / (time.perf_counter() - t0)
    xe = torch.rand(256, 3, size, size, device=device)
    model.eval()
    with torch.no_grad():
        for i in range(steps + 3):
            if i == 3:
                _sync(device)
                t0 = time.perf_counter()
            with autocast_for(cfg, device):
                model(xe)
    _sync(device)
    eval_ips = steps * 256 / (time.perf_counter() - t0)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"backbone": backbone, "image_size": size, "batch": batch, "bn_policy": bn, "device": name,
            "train_images_per_s": round(train_ips, 1), "eval_images_per_s": round(eval_ips, 1)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for backbone, size, batch, bn in SETTINGS:
        print(json.dumps(measure(backbone, size, batch, bn, args.steps, device)), flush=True)


if __name__ == "__main__":
    main()
