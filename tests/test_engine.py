from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from dmlbench.config import TrialConfig
from dmlbench.engine import train
from dmlbench.errors import CheckpointError, ConfigError, DatasetError, Diverged
from dmlbench.methods import METHODS, Batch, LossOutput, Method
from tests.fixtures.resume import Interrupt, count_loss_calls, stop_after


def make(tiny_cfg: dict[str, Any], **kw: Any) -> TrialConfig:
    return TrialConfig.from_dict({**tiny_cfg, "method": "proxyanchor", **kw})


def test_train_reports_checkpoints_and_result(tiny_cfg: dict[str, Any], tmp_path: Path) -> None:
    calls: list[tuple[int, dict[str, float], str | None]] = []
    res = train(make(tiny_cfg, output_dir=str(tmp_path)), report=lambda e, m, c: calls.append((e, m, c)))
    assert [c[0] for c in calls] == [0, 1, 2]
    assert all("map_at_r" in m and 0.0 <= m["map_at_r"] <= 1.0 for _, m, _ in calls)
    assert "loss" in calls[1][1] and math.isfinite(calls[1][1]["loss"])
    assert calls[1][2] == str(tmp_path / "checkpoints")
    assert (tmp_path / "checkpoints" / "last.pt").exists() and (tmp_path / "checkpoints" / "best.pt").exists()
    assert res.eval_split == "val" and res.steps == 6 and res.epochs_run == 2 and res.test_metrics is None
    assert res.best_epoch in (1, 2) and res.metrics["map_at_r"] == max(h["map_at_r"] for h in res.history[1:])
    assert len(res.split_hash) == 16 and res.pretrained_id == "none"


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path / "checkpoints" / "last.pt", weights_only=True)["model"]  # type: ignore[no-any-return]


@pytest.fixture
def loss_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    return count_loss_calls(monkeypatch, "proxyanchor")


def test_resume_is_exact(tiny_cfg: dict[str, Any], tmp_path: Path, loss_calls: list[int]) -> None:
    straight = train(make(tiny_cfg, epochs=3, output_dir=str(tmp_path / "a")))
    assert len(loss_calls) == 9
    cfg = make(tiny_cfg, epochs=3, output_dir=str(tmp_path / "b"))  # the SAME config for both calls
    first: list[int] = []
    with pytest.raises(Interrupt):
        train(cfg, report=stop_after(1, first))  # stopped after epoch 1's checkpoint and report
    assert first == [0, 1]
    loss_calls.clear()
    again: list[int] = []
    resumed = train(cfg, report=lambda e, m, c: again.append(e))
    # the second call picked up where the checkpoint ended: epochs 2 and 3 only, 2 x 3 steps
    assert again == [2, 3], "the second call did not resume from last.pt"
    assert len(loss_calls) == 6 and resumed.steps == straight.steps == 9
    wa, wb = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert resumed.history == straight.history


def test_corrupt_checkpoint_is_reported_not_restarted(tiny_cfg: dict[str, Any], tmp_path: Path) -> None:
    ck = tmp_path / "checkpoints"
    ck.mkdir(parents=True)
    (ck / "last.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"last\.pt.*cannot be read"):
        train(make(tiny_cfg, output_dir=str(tmp_path)))
    assert (ck / "last.pt").read_bytes() == b"not a checkpoint"


def test_checkpoint_of_another_method_refused(tiny_cfg: dict[str, Any], tmp_path: Path) -> None:
    train(make(tiny_cfg, epochs=1, output_dir=str(tmp_path)))
    other = TrialConfig.from_dict({**tiny_cfg, "method": "triplet", "output_dir": str(tmp_path)})
    with pytest.raises(CheckpointError, match="method='proxyanchor'"):
        train(other)


def test_final_phase_scores_test_once(
    tiny_cfg: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A spy on every evaluation: validation never touches a test image, and the test split is
    scored exactly once, last, with the weights of the best validation epoch (here epoch 1 of 3)."""
    from dmlbench.engine import trainer

    real = trainer.evaluate_indices
    calls: list[dict[str, Any]] = []
    # validation MAP@R by step (3 steps per epoch): epoch 1 is the best, the last epoch is not
    scripted = {3: 0.9, 6: 0.1, 9: 0.2}

    def spy(method: Method, data: Any, indices: Any, cfg: TrialConfig, device: Any, **kw: Any) -> dict[str, float]:
        metrics = real(method, data, indices, cfg, device, **kw)
        weights = {k: v.detach().clone() for k, v in method.state_dict().items()}
        calls.append({"indices": np.asarray(indices).copy(), "test": np.asarray(data.split.test).copy(),
                      "weights": weights, "step": kw.get("step", 0)})  # fmt: skip
        if not np.isin(indices, data.split.test).any():
            metrics["map_at_r"] = scripted.get(kw.get("step", 0), 0.0)
        return metrics

    monkeypatch.setattr(trainer, "evaluate_indices", spy)
    res = train(make(tiny_cfg, epochs=3, phase="final", output_dir=str(tmp_path)))

    touching = [i for i, c in enumerate(calls) if np.isin(c["indices"], c["test"]).any()]
    assert touching == [len(calls) - 1], "the test split was read before the final evaluation, or not once"
    final = calls[-1]
    assert len(final["test"]) > 0 and np.array_equal(np.sort(final["indices"]), np.sort(final["test"]))
    by_step = {c["step"]: c["weights"] for c in calls[:-1]}
    assert sorted(by_step) == [0, 3, 6, 9]
    # scored on the epoch-1 (best validation) weights, not on the last epoch's
    assert res.best_epoch == 1 and res.epochs_run == 3
    assert all(torch.equal(final["weights"][k], v) for k, v in by_step[3].items()), "test not scored on best.pt"
    assert not all(torch.equal(final["weights"][k], v) for k, v in by_step[9].items()), "scored the last epoch"
    assert res.eval_split == "test" and res.test_metrics is not None
    assert res.metrics == res.test_metrics and 0.0 <= res.metrics["map_at_r"] <= 1.0
    assert [h["map_at_r"] for h in res.history] == [0.0, 0.9, 0.1, 0.2]  # validation ran on the fold


class _NaN(Method):
    name = "nan_test"

    def loss(self, batch: Batch) -> LossOutput:
        out = self.backbone(batch.images).sum()
        return LossOutput(out * float("nan"), {"part": out.detach()})


@pytest.fixture
def nan_method() -> Any:
    METHODS.register("nan_test")(_NaN)
    yield "nan_test"
    METHODS._entries.pop("nan_test")


def test_non_finite_loss_raises_diverged_with_step(tiny_cfg: dict[str, Any], nan_method: str) -> None:
    with pytest.raises(Diverged) as info:
        train(TrialConfig.from_dict({**tiny_cfg, "method": nan_method}))
    assert info.value.step == 1 and "step 1" in str(info.value) and "part=" in str(info.value)


@pytest.mark.parametrize(
    "kw, err, pattern",
    [
        ({"samples_per_class": 5000}, DatasetError, "a batch cannot be formed"),
        ({"classes_per_batch": 50}, DatasetError, "lower classes_per_batch"),
        ({"early_stop_metric": "accuracy"}, ConfigError, "unknown early_stop_metric"),
        ({"backbone": "resnet_does_not_exist"}, ConfigError, "unknown backbone"),
        ({"backbone": "tiny", "pretrained": True}, ConfigError, "no pretrained weights"),
    ],
)
def test_bad_input_before_training(tiny_cfg: dict[str, Any], kw: dict[str, Any], err: type, pattern: str) -> None:
    with pytest.raises(err, match=pattern):
        train(make(tiny_cfg, **kw))


def test_unwritable_output(tiny_cfg: dict[str, Any], tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="not writable"):
        train(make(tiny_cfg, output_dir=str(blocker / "sub")))


def test_bf16_autocast_on_cpu(tiny_cfg: dict[str, Any]) -> None:
    res = train(make(tiny_cfg, amp="bf16", epochs=1))
    assert math.isfinite(res.history[-1]["loss"])


def test_early_stopping(tiny_cfg: dict[str, Any]) -> None:
    res = train(make(tiny_cfg, epochs=6, lr=1e-9, early_stop_patience=1, early_stop_min_delta=0.5))
    assert res.stopped_early and res.epochs_run == 2


def test_timm_backbone_and_frozen_bn(tiny_cfg: dict[str, Any]) -> None:
    from dmlbench.engine.backbones import build_backbone

    cfg = make(tiny_cfg, backbone="test_resnet", bn_policy="frozen_all", image_size=32)
    bb = build_backbone(cfg)
    bb.train()
    bns = [m for m in bb.trunk.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(not m.training for m in bns) and all(not p.requires_grad for m in bns for p in m.parameters())
    assert bb(torch.rand(2, 3, 32, 32)).shape == (2, 32)
    stats = make(tiny_cfg, backbone="test_resnet", bn_policy="frozen_stats", image_size=32)
    bb2 = build_backbone(stats).train()
    assert all(p.requires_grad for m in bb2.trunk.modules() if isinstance(m, torch.nn.BatchNorm2d) for p in m.parameters())


def test_pretrained_missing_is_explained(tiny_cfg: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dmlbench.engine.backbones import build_backbone
    from dmlbench.errors import DmlbenchError

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    hub = pytest.importorskip("huggingface_hub.constants")
    before = hub.HF_HUB_OFFLINE
    with pytest.raises(DmlbenchError, match="not in the local timm/Hugging Face cache"):
        build_backbone(make(tiny_cfg, backbone="test_resnet", pretrained=True))
    assert hub.HF_HUB_OFFLINE == before  # offline only while dmlbench looks for the weights
    with pytest.raises(DmlbenchError, match="does not exist"):
        build_backbone(make(tiny_cfg, backbone="test_resnet", pretrained=str(tmp_path / "w.pth")))


def test_pretrained_from_local_file(tiny_cfg: dict[str, Any], tmp_path: Path) -> None:
    import timm

    from dmlbench.engine.backbones import build_backbone

    src = timm.create_model("test_resnet", pretrained=False, num_classes=0)
    torch.save(src.state_dict(), tmp_path / "w.pth")
    bb = build_backbone(make(tiny_cfg, backbone="test_resnet", pretrained=str(tmp_path / "w.pth")))
    for (k, v), (k2, v2) in zip(src.state_dict().items(), bb.trunk.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    assert bb.pretrained_id.startswith("file:w.pth:")


class _NaNEmbed(Method):
    name = "nan_embed_test"

    def loss(self, batch: Batch) -> LossOutput:
        return LossOutput(self.backbone(batch.images).pow(2).mean())

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images) * float("nan")


def test_non_finite_embeddings_are_divergence(tiny_cfg: dict[str, Any]) -> None:
    METHODS.register("nan_embed_test")(_NaNEmbed)
    try:
        with pytest.raises(Diverged, match="non-finite primary embeddings"):
            train(TrialConfig.from_dict({**tiny_cfg, "method": "nan_embed_test"}))
    finally:
        METHODS._entries.pop("nan_embed_test")


def test_val_clustering_off_skips_kmeans_but_not_on_test(tiny_cfg: dict[str, Any]) -> None:
    res = train(make(tiny_cfg, epochs=1, phase="final", val_clustering=False))
    assert all("nmi" not in h and "map_at_r" in h for h in res.history)
    assert res.test_metrics is not None and "nmi" in res.test_metrics and "f1" in res.test_metrics
    with pytest.raises(ConfigError, match="needs val_clustering=true"):
        make(tiny_cfg, val_clustering=False, early_stop_metric="nmi")
