"""How a trial uses the hardware it was given: loader workers, CPU threads, pinned memory,
``channels_last``, cuDNN autotuning. Pure functions and scoped switches; no Ray import.

The orchestrator turns ``--cpus-per-trial`` into trial keys with :func:`loader_settings`; the
trainer turns the trial keys into settings with :func:`pin_memory_for` and
:func:`use_channels_last`, and applies the global ones inside :func:`trial_runtime`, which restores
the previous values afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported by the functions that need it: loader_settings works without it
    import torch
    from torch import nn


def loader_settings(cpus: float, cuda: bool) -> dict[str, Any]:
    """Trial keys ``num_workers``, ``torch_threads`` and ``pin_memory`` for a trial with ``cpus`` CPUs.

    * GPU trial (``cuda``): the main process only feeds the GPU, so every CPU but one runs a
      data-loader worker (decode, crop, flip) and the main process keeps one intra-op thread;
      batches go through pinned memory so host→device copies are asynchronous. 4–8 CPUs per GPU
      trial (3–7 workers) keep a ResNet-50 at 224 px fed on the papers' augmentation.
    * CPU trial: the model runs in the main process, so the CPUs are its threads; below 4 CPUs
      the data loads in the main process too (workers would take cores from the model), from 4
      CPUs on one worker per 4 CPUs. No pinned memory.

    Fractions of a CPU count as the whole CPUs below them (at least one thread).

    Example:
        >>> loader_settings(8, cuda=True)
        {'num_workers': 7, 'torch_threads': 1, 'pin_memory': True}
        >>> loader_settings(1, cuda=True)
        {'num_workers': 0, 'torch_threads': 1, 'pin_memory': True}
        >>> loader_settings(8, cuda=False)
        {'num_workers': 2, 'torch_threads': 6, 'pin_memory': False}
        >>> loader_settings(2, cuda=False)
        {'num_workers': 0, 'torch_threads': 2, 'pin_memory': False}
    """
    if not cpus > 0:
        raise ValueError(f"cpus must be positive, got {cpus}")
    whole = max(1, math.floor(cpus))
    workers = whole - 1 if cuda else (0 if whole < 4 else whole // 4)
    return {"num_workers": workers, "torch_threads": max(1, whole - workers), "pin_memory": bool(cuda)}


def pin_memory_for(setting: bool | None, device: torch.device) -> bool:
    """The trial key ``pin_memory`` resolved: ``None`` pins exactly when training on CUDA.

    Example:
        >>> import torch
        >>> pin_memory_for(None, torch.device("cpu")), pin_memory_for(True, torch.device("cpu"))
        (False, True)
    """
    return device.type == "cuda" if setting is None else bool(setting)


def has_conv(model: nn.Module) -> bool:
    """Whether ``model`` holds a 2-D convolution (where ``channels_last`` can pay off)."""
    from torch import nn

    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def use_channels_last(setting: bool | None, device: torch.device, model: nn.Module) -> bool:
    """The trial key ``channels_last`` resolved: ``None`` means on for a convolutional model on
    CUDA (tensor cores want NHWC; bf16 ResNets gain 10–30 %), off on CPU and for transformers.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> conv = nn.Sequential(nn.Conv2d(3, 4, 3))
        >>> use_channels_last(None, torch.device("cuda"), conv), use_channels_last(None, torch.device("cpu"), conv)
        (True, False)
        >>> use_channels_last(None, torch.device("cuda"), nn.Linear(3, 4))
        False
    """
    if setting is not None:
        return bool(setting)
    return device.type == "cuda" and has_conv(model)


def model_memory_format(model: nn.Module) -> torch.memory_format:
    """``torch.channels_last`` when ``model`` was put in that format (a 2-D convolution whose
    weight is NHWC and not also NCHW-contiguous), else ``torch.preserve_format``: the format its
    input batches should be sent in.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> conv = nn.Sequential(nn.Conv2d(3, 4, 3))
        >>> model_memory_format(conv) == torch.preserve_format
        True
        >>> model_memory_format(conv.to(memory_format=torch.channels_last)) == torch.channels_last
        True
    """
    import torch
    from torch import nn

    for m in model.modules():
        if isinstance(m, nn.Conv2d) and m.weight.dim() == 4:
            w = m.weight
            if w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous():
                return torch.channels_last
    return torch.preserve_format


@contextmanager
def trial_runtime(threads: int | None, device: torch.device, deterministic: bool) -> Iterator[None]:
    """Scoped process-wide settings of a trial: ``torch.set_num_threads(threads)`` (``None``: left
    as it is) and, on CUDA without deterministic mode, cuDNN autotuning (``cudnn.benchmark``: the
    fastest convolution algorithm for the fixed batch shape). Previous values are restored."""
    import torch

    prev_threads = torch.get_num_threads()
    prev_bench = torch.backends.cudnn.benchmark
    if threads is not None:
        torch.set_num_threads(threads)
    if device.type == "cuda" and not deterministic:
        torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.set_num_threads(prev_threads)
        torch.backends.cudnn.benchmark = prev_bench
