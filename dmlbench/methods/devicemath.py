"""Small pieces of loss maths that keep a count on the device instead of reading it back.

A loss normalised by a data-dependent count (active triplets, classes present in the batch) was
written ``total / int(count)``: the ``int`` waits for the device (a host sync on CUDA) on every
step. :func:`divide_by_count` gives the same number, rounding included, with the count left as a
0-d device tensor.
"""

from __future__ import annotations

from torch import Tensor


def divide_by_count(total: Tensor, count: Tensor) -> Tensor:
    """``total / n`` for a count ``n`` held as a 0-d tensor on ``total``'s device, rounded exactly
    as ``total / int(n)`` (a host number) would be, without reading ``n`` back.

    PyTorch divides a float32/float64 CUDA tensor by a host number as a product with the
    number's reciprocal (which may differ from a true division in the last bit) and a CPU tensor
    by a true division; this does the same on each, gradients included.
    Clamp ``count`` first where the old code divided by ``max(n, 1)``.

    Example:
        >>> import torch
        >>> t = torch.tensor(1.0)
        >>> float(divide_by_count(t, torch.tensor(3))) == float(t / 3)
        True
    """
    n = count.to(total.dtype)
    if total.device.type == "cuda":
        return total * (1.0 / n)  # 1.0 / n: reciprocal(n) on the device, as PyTorch's scalar path
    return total / n
