"""BN-Inception backbone: architecture facts, input convention, frozen BN, weight loading (CPU, random init)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import dmlbench.engine.bninception as bni
from dmlbench.config import TrialConfig
from dmlbench.engine.backbones import BACKBONES, build_backbone
from dmlbench.errors import ConfigError

SMALL = 64  # the smallest input the stride-2 blocks handle; keeps the CPU test fast


def cfg(**kw: object) -> TrialConfig:
    base = {
        "method": "ccp",
        "dataset": "digits",
        "backbone": "bninception",
        "pretrained": False,
        "embedding_dim": 16,
    }
    return TrialConfig.from_dict({**base, **kw})


@pytest.fixture(scope="module")
def trunk() -> bni.BNInception:
    torch.manual_seed(0)
    return bni.BNInception().eval()


def test_layer_shapes_match_the_converted_weights(trunk: bni.BNInception) -> None:
    """Shapes of the converted Caffe BN-Inception state dict (pretrained-models.pytorch layout)."""
    sd = trunk.state_dict()
    expected = {
        "conv1_7x7_s2.weight": (64, 3, 7, 7),
        "conv1_7x7_s2.bias": (64,),
        "conv2_3x3.weight": (192, 64, 3, 3),
        "inception_3a_pool_proj.weight": (32, 192, 1, 1),
        "inception_3c_3x3.weight": (160, 128, 3, 3),
        "inception_4c_pool_proj.weight": (128, 576, 1, 1),
        "inception_4d_1x1.weight": (96, 608, 1, 1),
        "inception_4e_double_3x3_2.weight": (256, 256, 3, 3),
        "inception_5a_1x1.weight": (352, 1056, 1, 1),
        "inception_5b_pool_proj.weight": (128, 1024, 1, 1),
        "inception_5b_double_3x3_2_bn.running_var": (224,),
    }
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key
    assert "inception_3c_1x1.weight" not in sd and "inception_4e_pool_proj.weight" not in sd
    # every conv has its BN, conv layers count: 3 stem + 7 per regular block × 8 + 5 per reduction block × 2
    convs = [k for k in sd if k.endswith(".weight") and sd[k].dim() == 4]
    assert len(convs) == 3 + 7 * 8 + 5 * 2
    assert all(f"{k[:-7]}_bn.running_mean" in sd for k in convs)


def test_feature_shapes(trunk: bni.BNInception) -> None:
    with torch.device("meta"):  # shapes only: the paper sizes without the CPU cost
        meta = bni.BNInception().eval()
        for size in (224, 227):
            assert tuple(meta.feature_map(torch.empty(1, 3, size, size)).shape) == (1, 1024, 7, 7)
    with torch.no_grad():
        fm = trunk.feature_map(torch.randn(2, 3, SMALL, SMALL))
        pooled = trunk(torch.randn(2, 3, SMALL, SMALL))
    assert fm.shape[1] == 1024 and pooled.shape == (2, 1024) and torch.isfinite(pooled).all()


def test_registered_backbone_input_convention() -> None:
    """features(x) == trunk(BGR·255 − (104, 117, 128)) for [0, 1] RGB input."""
    assert "bninception" in BACKBONES
    torch.manual_seed(1)
    bb = build_backbone(cfg()).eval()
    assert bb.feat_dim == 1024 and bb.head.in_features == 1024 and bb.head.out_features == 16
    x = torch.rand(2, 3, SMALL, SMALL)
    caffe = torch.stack([x[:, 2] * 255 - 104, x[:, 1] * 255 - 117, x[:, 0] * 255 - 128], dim=1)
    with torch.no_grad():
        assert torch.allclose(bb.features(x), bb.trunk(caffe), atol=1e-4)
        assert bb(x).shape == (2, 16)


def test_frozen_batchnorm() -> None:
    torch.manual_seed(2)
    bb = build_backbone(cfg(bn_policy="frozen_all"))
    bb.train()
    bns = [m for m in bb.trunk.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == 69 and all(not m.training for m in bns)
    assert all(not p.requires_grad for m in bns for p in m.parameters())
    before = bns[0].running_mean.clone()
    out = bb(torch.rand(2, 3, SMALL, SMALL))
    out.sum().backward()
    assert torch.equal(bns[0].running_mean, before)
    assert (
        bb.trunk.conv1_7x7_s2.weight.grad is not None
        and torch.isfinite(bb.trunk.conv1_7x7_s2.weight.grad).all()
    )
    assert bns[0].weight.grad is None


def test_loads_converted_weights(tmp_path: Path, trunk: bni.BNInception) -> None:
    """A file in the converted layout (classifier keys, [1, C] BN tensors, no counters) loads exactly."""
    sd = {k: v.clone() for k, v in trunk.state_dict().items() if not k.endswith("num_batches_tracked")}
    for k in list(sd):
        if "_bn." in k:
            sd[k] = sd[k].reshape(1, -1)
    sd["last_linear.weight"] = torch.zeros(1000, 1024)
    sd["last_linear.bias"] = torch.zeros(1000)
    path = tmp_path / "bn_inception-converted.pth"
    torch.save(sd, path)
    bb = build_backbone(cfg(pretrained=str(path))).eval()
    x = torch.rand(1, 3, SMALL, SMALL)
    with torch.no_grad():
        assert torch.allclose(bb.trunk(x), trunk(x), atol=1e-5)
    assert bb.pretrained_id.startswith("file:bn_inception-converted.pth:")


def test_bad_weights_list_keys(tmp_path: Path, trunk: bni.BNInception) -> None:
    sd = dict(trunk.state_dict())
    del sd["inception_3a_1x1.weight"]
    sd["inception_9z_1x1.weight"] = torch.zeros(1)
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    with pytest.raises(
        ConfigError,
        match=r"1 missing key\(s\) \(inception_3a_1x1.weight\); 1 unexpected key\(s\) \(inception_9z_1x1.weight\)",
    ):
        build_backbone(cfg(pretrained=str(path)))


def test_pretrained_true_without_file_says_where(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DMLBENCH_CACHE", str(tmp_path))
    target = tmp_path / "weights" / "bn_inception.pth"
    with pytest.raises(ConfigError, match=f"BN-Inception weights not found at {target}.*put it at {target}"):
        build_backbone(cfg(pretrained=True))
    with pytest.raises(ConfigError, match="weights not found at .*nope.pth"):
        build_backbone(cfg(pretrained=str(tmp_path / "nope.pth")))
