"""The baselines' PML subclasses without per-step host reads give PML's numbers and gradients
bit for bit (on CPU; see dmlbench.methods.devicemath for the CUDA rounding they reproduce)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from pytorch_metric_learning import losses, miners

from dmlbench.methods import Batch
from dmlbench.methods.baselines import (
    DeviceDivisorReducer,
    DeviceMarginLoss,
    DeviceMultiSimilarityLoss,
)
from dmlbench.methods.devicemath import divide_by_count


def _grads(loss_fn: Any, emb: torch.Tensor, labels: torch.Tensor, tuples: Any = None) -> tuple[torch.Tensor, ...]:
    x = emb.clone().requires_grad_(True)
    loss = loss_fn(x, labels, tuples) if tuples is not None else loss_fn(x, labels)
    params = [x, *loss_fn.parameters()]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return (loss.detach(), *(g if g is not None else torch.full((1,), float("nan")) for g in grads))


def _same(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) or (x.isnan().all() and y.isnan().all()) for x, y in zip(a, b))


@pytest.mark.parametrize("labels", [[0, 0, 1, 1, 3, 3, 5, 5], [2] * 8, [0, 1, 2, 3, 4, 5, 0, 1]])
def test_proxy_anchor_with_the_device_reducer_matches_pml(labels: list[int]) -> None:
    y = torch.tensor(labels)
    emb = torch.randn(len(y), 16, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    ref = losses.ProxyAnchorLoss(6, 16, margin=0.1, alpha=32)
    torch.manual_seed(0)
    ours = losses.ProxyAnchorLoss(6, 16, margin=0.1, alpha=32, reducer=DeviceDivisorReducer())
    assert torch.equal(ref.proxies, ours.proxies)
    assert _same(_grads(ref, emb, y), _grads(ours, emb, y))


def test_margin_matches_pml_also_with_no_active_triplet() -> None:
    g = torch.Generator().manual_seed(2)
    y = torch.arange(4).repeat_interleave(4)
    random = torch.randn(16, 8, generator=g)
    separated = torch.nn.functional.one_hot(y, 8).float() + 1e-3 * random  # d_ap ≈ 0, d_an ≈ √2
    for emb, active in ((random, True), (separated, False)):
        torch.manual_seed(0)
        tuples = miners.DistanceWeightedMiner(cutoff=0.5, nonzero_loss_cutoff=1.4)(emb, y)
        kw = dict(margin=0.2, beta=1.0, learn_beta=True, num_classes=4)
        ref, ours = losses.MarginLoss(**kw), DeviceMarginLoss(**kw)
        got, want = _grads(ours, emb, y, tuples), _grads(ref, emb, y, tuples)
        assert _same(want, got)
        # no active triplet: the divisor is 0 and PML leaves β out of the graph (no gradient), as we do
        assert bool(want[-1].isnan().all()) != active and (active or float(want[0]) == 0.0)


def test_multi_similarity_matches_pml() -> None:
    g = torch.Generator().manual_seed(3)
    y = torch.arange(4).repeat_interleave(4)
    emb = torch.randn(16, 8, generator=g)
    tuples = miners.MultiSimilarityMiner(epsilon=0.1)(emb, y)
    ref, ours = losses.MultiSimilarityLoss(2.0, 50.0, 0.5), DeviceMultiSimilarityLoss(2.0, 50.0, 0.5)
    assert _same(_grads(ref, emb, y, tuples), _grads(ours, emb, y, tuples))


def test_divide_by_count_rounds_like_a_host_divisor() -> None:
    x = torch.rand(1000, generator=torch.Generator().manual_seed(4)) * 100
    for n in (1, 3, 7, 49, 112):
        assert torch.equal(divide_by_count(x, torch.tensor(n)), x / n)


def test_batch_keeps_its_host_labels() -> None:
    batch = Batch([torch.zeros(2, 3, 4, 4, dtype=torch.uint8)], torch.tensor([3, 5]), torch.arange(2))
    moved = batch.to("cpu")
    assert moved.host_labels is batch.labels and moved.labels_on_host() is batch.labels
    assert Batch([torch.zeros(1, 3, 2, 2)], torch.tensor([1]), torch.arange(1)).labels_on_host().tolist() == [1]
