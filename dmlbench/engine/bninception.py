"""BN-Inception (Inception with Batch Normalization, Ioffe & Szegedy 2015) as a dmlbench backbone.

The backbone CCP and the MLRC protocol use: the Caffe BN-Inception network, global average
pooling to 1,024-d features, ImageNet weights converted from Caffe. The layer names follow the
widely shared converted state dict (``conv1_7x7_s2.weight``, ``conv1_7x7_s2_bn.running_mean``,
``inception_3a_1x1.weight``, ... ``last_linear.*``), so such a file loads without renaming.

Every convolution (with bias, as in Caffe) is followed by BatchNorm (eps 1e-5) and ReLU. An
inception block concatenates four branches (1×1; 1×1→3×3; 1×1→3×3→3×3; pool→1×1) or, in the
grid-reduction blocks ``3c`` and ``4e``, three branches with stride 2 (no 1×1 branch, the pool
branch is a bare 3×3/2 max-pool). Channel widths per block are in :data:`BLOCKS`.

Input: the weights expect BGR pixels in 0–255 minus the Caffe means (104, 117, 128), no std
division. The transforms give [0, 1] RGB, so the registered factory puts an :class:`InputNorm`
with ``scale=255, bgr=True, mean=(104, 117, 128), std=(1, 1, 1)`` in front of the trunk.
Input sizes: 224 or 227 (the papers), any size ≥ 64 works (the tests use 64).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Literal, NamedTuple

import torch
from torch import Tensor, nn

from dmlbench.engine.backbones import (
    BACKBONES,
    Backbone,
    InputNorm,
    file_digest,
    load_state_dict_file,
)
from dmlbench.errors import ConfigError

if TYPE_CHECKING:
    from dmlbench.config import TrialConfig

#: Caffe BGR means of the converted ImageNet weights (0–255 scale)
CAFFE_BGR_MEAN = (104.0, 117.0, 128.0)
FEAT_DIM = 1024
#: where ``pretrained=true`` looks for the converted weights (under the cache dir)
DEFAULT_WEIGHTS_NAME = "bn_inception.pth"
#: keys of the converted file that the pooled trunk has no use for (the ImageNet classifier)
IGNORED_PREFIXES = ("last_linear.", "fc.")


class Block(NamedTuple):
    """Channel widths of one inception block (0 = branch absent)."""

    cin: int
    b1x1: int
    b3x3_reduce: int
    b3x3: int
    d3x3_reduce: int
    d3x3: int
    pool: Literal["avg", "max", "reduce"]  # "reduce": stride-2 block, pool branch = 3×3/2 max-pool
    pool_proj: int

    @property
    def cout(self) -> int:
        pool_out = self.cin if self.pool == "reduce" else self.pool_proj
        return self.b1x1 + self.b3x3 + self.d3x3 + pool_out


BLOCKS: dict[str, Block] = {
    "3a": Block(192, 64, 64, 64, 64, 96, "avg", 32),
    "3b": Block(256, 64, 64, 96, 64, 96, "avg", 64),
    "3c": Block(320, 0, 128, 160, 64, 96, "reduce", 0),
    "4a": Block(576, 224, 64, 96, 96, 128, "avg", 128),
    "4b": Block(576, 192, 96, 128, 96, 128, "avg", 128),
    "4c": Block(576, 160, 128, 160, 128, 160, "avg", 128),
    "4d": Block(608, 96, 128, 192, 160, 192, "avg", 128),
    "4e": Block(608, 0, 128, 192, 192, 256, "reduce", 0),
    "5a": Block(1056, 352, 192, 320, 160, 224, "avg", 128),
    "5b": Block(1024, 352, 192, 320, 192, 224, "max", 128),
}


def add_conv_bn(owner: nn.Module, name: str, cin: int, cout: int, k: int, stride: int = 1) -> None:
    """Register ``<name>`` (conv with bias, "same" padding) and ``<name>_bn`` on ``owner`` (flat key names)."""
    owner.add_module(name, nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2))
    owner.add_module(f"{name}_bn", nn.BatchNorm2d(cout, eps=1e-5))


class BNInception(nn.Module):
    """The BN-Inception trunk: ``forward(x) -> [B, 1024]`` globally average-pooled features."""

    def __init__(self) -> None:
        super().__init__()
        self.num_features = FEAT_DIM
        add_conv_bn(self, "conv1_7x7_s2", 3, 64, 7, 2)
        add_conv_bn(self, "conv2_3x3_reduce", 64, 64, 1)
        add_conv_bn(self, "conv2_3x3", 64, 192, 3)
        self.pool_s2 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.pool_avg = nn.AvgPool2d(3, stride=1, padding=1, ceil_mode=True, count_include_pad=True)
        self.pool_max = nn.MaxPool2d(3, stride=1, padding=1, ceil_mode=True)
        for tag, b in BLOCKS.items():
            p = f"inception_{tag}"
            stride = 2 if b.pool == "reduce" else 1
            if b.b1x1:
                add_conv_bn(self, f"{p}_1x1", b.cin, b.b1x1, 1)
            add_conv_bn(self, f"{p}_3x3_reduce", b.cin, b.b3x3_reduce, 1)
            add_conv_bn(self, f"{p}_3x3", b.b3x3_reduce, b.b3x3, 3, stride)
            add_conv_bn(self, f"{p}_double_3x3_reduce", b.cin, b.d3x3_reduce, 1)
            add_conv_bn(self, f"{p}_double_3x3_1", b.d3x3_reduce, b.d3x3, 3)
            add_conv_bn(self, f"{p}_double_3x3_2", b.d3x3, b.d3x3, 3, stride)
            if b.pool != "reduce":
                add_conv_bn(self, f"{p}_pool_proj", b.cin, b.pool_proj, 1)
        assert BLOCKS["5b"].cout == FEAT_DIM

    def _cbr(self, name: str, x: Tensor) -> Tensor:
        conv: nn.Module = getattr(self, name)
        bn: nn.Module = getattr(self, f"{name}_bn")
        return torch.relu(bn(conv(x)))

    def _block(self, tag: str, b: Block, x: Tensor) -> Tensor:
        p = f"inception_{tag}"
        outs: list[Tensor] = []
        if b.b1x1:
            outs.append(self._cbr(f"{p}_1x1", x))
        outs.append(self._cbr(f"{p}_3x3", self._cbr(f"{p}_3x3_reduce", x)))
        d = self._cbr(f"{p}_double_3x3_reduce", x)
        outs.append(self._cbr(f"{p}_double_3x3_2", self._cbr(f"{p}_double_3x3_1", d)))
        if b.pool == "reduce":
            outs.append(self.pool_s2(x))
        else:
            pooled = self.pool_avg(x) if b.pool == "avg" else self.pool_max(x)
            outs.append(self._cbr(f"{p}_pool_proj", pooled))
        return torch.cat(outs, dim=1)

    def feature_map(self, x: Tensor) -> Tensor:
        """The last 1,024-channel map before pooling (7×7 at 224 px input)."""
        x = self.pool_s2(self._cbr("conv1_7x7_s2", x))
        x = self.pool_s2(self._cbr("conv2_3x3", self._cbr("conv2_3x3_reduce", x)))
        for tag, b in BLOCKS.items():
            x = self._block(tag, b, x)
        return x

    def forward(self, x: Tensor) -> Tensor:
        return self.feature_map(x).mean(dim=(2, 3))


def load_bninception_weights(trunk: BNInception, state: dict[str, Tensor], source: str) -> None:
    """Load a converted BN-Inception state dict into ``trunk``, strictly.

    Classifier keys (``last_linear.*``, ``fc.*``) are dropped, a ``module.`` prefix is removed,
    BN tensors stored as ``[1, C]`` (some conversions) are reshaped to ``[C]``, and absent
    ``num_batches_tracked`` counters are allowed. Any other missing or unexpected key, or a shape
    mismatch, is a :class:`ConfigError` listing them.
    """
    own = trunk.state_dict()
    sd: dict[str, Tensor] = {}
    for k, v in state.items():
        k = k.removeprefix("module.")
        if k.startswith(IGNORED_PREFIXES):
            continue
        if k in own and v.shape != own[k].shape and v.numel() == own[k].numel() and v.squeeze().dim() <= 1:
            v = v.reshape(own[k].shape)
        sd[k] = v
    missing = sorted(k for k in own if k not in sd and not k.endswith("num_batches_tracked"))
    unexpected = sorted(k for k in sd if k not in own)
    wrong = sorted(
        f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}"
        for k in sd
        if k in own and sd[k].shape != own[k].shape
    )
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(
                f"{len(missing)} missing key(s) ({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''})"
            )
        if unexpected:
            parts.append(
                f"{len(unexpected)} unexpected key(s) ({', '.join(unexpected[:5])}{', ...' if len(unexpected) > 5 else ''})"
            )
        if wrong:
            parts.append(f"{len(wrong)} shape mismatch(es) ({', '.join(wrong[:3])})")
        raise ConfigError(
            f"the BN-Inception weights {source!r} do not fit the network: {'; '.join(parts)}; use a state dict "
            f"converted from the Caffe BN-Inception (keys like conv1_7x7_s2.weight, inception_3a_1x1_bn.running_mean)."
        )
    trunk.load_state_dict(sd, strict=False)


def default_weights_path() -> Path:
    """``<cache dir>/weights/bn_inception.pth`` (cache dir: ``$DMLBENCH_CACHE`` or ``~/.cache/dmlbench``)."""
    from dmlbench.datasets.cache import default_cache_dir

    return default_cache_dir() / "weights" / DEFAULT_WEIGHTS_NAME


def bninception_input_norm() -> InputNorm:
    """[0, 1] RGB → BGR 0–255 minus the Caffe means, no std division."""
    return InputNorm(mean=CAFFE_BGR_MEAN, std=(1.0, 1.0, 1.0), scale=255.0, bgr=True)


@BACKBONES.register("bninception")
def bninception(cfg: TrialConfig) -> Backbone:
    """BN-Inception with a ``Linear(1024, embedding_dim)`` head; BN policy from ``cfg.bn_policy``.

    ``pretrained``: a path loads that converted state dict; ``True`` loads
    :func:`default_weights_path` and fails with instructions when it is absent (no download,
    no silent random init); ``False`` is random init.
    """
    trunk = BNInception()
    pretrained_id = "none"
    if cfg.pretrained is not False:
        path = (
            default_weights_path()
            if cfg.pretrained is True
            else Path(os.path.expanduser(str(cfg.pretrained)))
        )
        if not path.is_file():
            raise ConfigError(
                f"BN-Inception weights not found at {path}: convert the Caffe ImageNet BN-Inception weights to a "
                f"PyTorch state dict (the common 'bn_inception-52deb4733.pth' works as is) and put it at "
                f"{default_weights_path()}, or pass pretrained=<path>, or pretrained=false for random init."
            )
        load_bninception_weights(trunk, load_state_dict_file(path), str(path))
        pretrained_id = f"file:{path.name}:{file_digest(path)}"
    return Backbone(
        trunk,
        FEAT_DIM,
        cfg.embedding_dim,
        cfg.bn_policy,
        input_norm=bninception_input_norm(),
        name="bninception",
        pretrained_id=pretrained_id,
    )
