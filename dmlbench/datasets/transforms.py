"""Image transforms (uint8 HWC arrays → uint8 CHW tensors).

Transforms stop at uint8: the conversion to float in [0, 1] happens on the training device
(:meth:`dmlbench.methods.base.Batch.to`), which keeps data-loader workers cheap and host→device
copies four times smaller.

Normalisation (ImageNet mean/std, or BN-Inception's BGR 0–255 convention) is done by the backbone
itself (:class:`dmlbench.engine.backbones.InputNorm`), so the same data serves every backbone.

* train: RandomResizedCrop(size, scale) + horizontal flip (the papers' protocol; scale (0.08, 1));
* eval: Resize(size · 256/224) + CenterCrop(size).

Embedded datasets (already small and centred) use a milder crop scale (0.6, 1) and resize to the
target size directly.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torchvision.transforms import v2

Transform = Callable[[np.ndarray], torch.Tensor]


def _to_tensor(img: np.ndarray) -> torch.Tensor:
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)  # uint8 CHW


def build_transform(size: int, train: bool, embedded: bool = False, crop_scale: tuple[float, float] | None = None) -> Transform:
    if train:
        scale = crop_scale or ((0.6, 1.0) if embedded else (0.08, 1.0))
        ops: list[torch.nn.Module] = [
            v2.RandomResizedCrop(size, scale=scale, antialias=True),
            v2.RandomHorizontalFlip(0.5),
        ]
    elif embedded:
        ops = [v2.Resize(size, antialias=True), v2.CenterCrop(size)]
    else:
        ops = [v2.Resize(int(round(size * 256 / 224)), antialias=True), v2.CenterCrop(size)]
    pipeline = v2.Compose(ops)

    def apply(img: np.ndarray) -> torch.Tensor:
        return pipeline(_to_tensor(img))  # type: ignore[no-any-return]

    return apply
