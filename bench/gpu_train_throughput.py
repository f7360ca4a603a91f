"""Training throughput on a GPU: dmlbench's trainer vs a bare bf16 PyTorch loop, side by side.

The comparison of ``bench/trainer_overhead.py`` with GPU-sized defaults: ResNet-50 from random
weights (``pretrained=False``), synthetic 224 px uint8 batches of 112 (28 classes × 4) held in
pinned memory, ProxyAnchor (PML) with Adam, bf16 autocast, ``channels_last`` and cuDNN autotuning
on both sides. Prints images/s of each, their ratio (target: dmlbench ≥ 90 % of the bare loop)
and the host synchronisations per step that CUDA's sync debug mode sees on each side.

    python bench/gpu_train_throughput.py                  # the GPU figure (bench/gpu_check.sh runs it)
    python bench/gpu_train_throughput.py --compile        # both sides with torch.compile
    python bench/gpu_train_throughput.py --quick          # CPU smoke run: tiny backbone, 32 px
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from trainer_overhead import main

GPU_DEFAULTS = dict(device="cuda", backbone="resnet50", image_size=224, embedding_dim=512, classes=28, samples=4,
                    batches=8, rounds=3, steps=40, warmup=15, amp="auto", threads=None)


if __name__ == "__main__":
    sys.exit(main(GPU_DEFAULTS, __doc__))
