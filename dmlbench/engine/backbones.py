"""Backbones: a trunk giving pooled features, input normalisation and a linear embedding head.

Any timm model name works (``resnet50``, ``resnet18``, ``vit_small_patch16_224``, ...), created
with ``num_classes=0`` (global pooling, no classifier). ``tiny`` is a small CPU CNN for tests and
the smoke sweep. Other backbones register a factory with ``@BACKBONES.register(name)``.

Pretrained weights are never downloaded silently: ``pretrained=True`` reads timm's local cache
(offline) and fails with instructions when the weights are not there; a path loads a local state
dict with ``weights_only=True``; ``pretrained=False`` is random init.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from dmlbench.errors import ConfigError, DmlbenchError
from dmlbench.registry import Registry

if TYPE_CHECKING:
    from dmlbench.config import TrialConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class InputNorm(nn.Module):
    """Maps [0, 1] RGB input to what a trunk expects: ``(x · scale[, BGR] − mean) / std``.

    Computed as one fused ``x · (scale/std) + (−mean/std)`` pass (a per-channel affine map).
    """

    def __init__(
        self,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        scale: float = 1.0,
        bgr: bool = False,
    ):
        super().__init__()
        m, sd = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
        self.register_buffer("gain", scale / sd, persistent=False)
        self.register_buffer("shift", -m / sd, persistent=False)
        self.bgr = bgr

    def forward(self, x: Tensor) -> Tensor:
        if self.bgr:
            x = x.flip(1)
        return torch.addcmul(self.shift, x, self.gain)


class Backbone(nn.Module):
    """``forward(x) = head(features(x))``; ``features`` = pooled trunk output (``feat_dim``)."""

    def __init__(
        self,
        trunk: nn.Module,
        feat_dim: int,
        embedding_dim: int,
        bn_policy: str = "frozen_stats",
        input_norm: InputNorm | None = None,
        name: str = "",
        pretrained_id: str = "none",
    ):
        super().__init__()
        self.input_norm = input_norm or InputNorm()
        self.trunk = trunk
        self.feat_dim = feat_dim
        self.head = nn.Linear(feat_dim, embedding_dim)
        self.bn_policy = bn_policy
        self.name = name
        self.pretrained_id = pretrained_id
        if bn_policy == "frozen_all":
            for m in self._bn_modules():
                for p in m.parameters(recurse=False):
                    p.requires_grad_(False)

    def _bn_modules(self) -> Iterator[nn.Module]:
        return (m for m in self.trunk.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))

    def train(self, mode: bool = True) -> Backbone:
        super().train(mode)
        if mode and self.bn_policy in ("frozen_stats", "frozen_all"):
            for m in self._bn_modules():
                m.eval()
        return self

    def features(self, x: Tensor) -> Tensor:
        return self.trunk(self.input_norm(x))  # type: ignore[no-any-return]

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))  # type: ignore[no-any-return]


class TinyNet(nn.Module):
    """A 4-layer CNN with BatchNorm and global average pooling (fast on CPU, 16–64 px inputs)."""

    def __init__(self, width: int = 32):
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

        self.body = nn.Sequential(
            block(3, width), nn.MaxPool2d(2), block(width, width * 2), nn.MaxPool2d(2),
            block(width * 2, width * 2), block(width * 2, width * 2),
        )
        self.num_features = width * 2

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x).mean(dim=(2, 3))  # type: ignore[no-any-return]


BackboneFactory = Callable[["TrialConfig"], Backbone]
BACKBONES: Registry[BackboneFactory] = Registry("backbone")


@BACKBONES.register("tiny")
def tiny(cfg: TrialConfig) -> Backbone:
    if cfg.pretrained is not False:
        raise ConfigError("the 'tiny' backbone has no pretrained weights; set pretrained=false.")
    trunk = TinyNet()
    return Backbone(trunk, trunk.num_features, cfg.embedding_dim, cfg.bn_policy, name="tiny")


@contextmanager
def _offline() -> Iterator[None]:
    """Hugging Face Hub offline mode: the environment variables, and huggingface_hub's own flag,
    which it reads from the environment once, at import (timm imports it before we get here)."""
    keys = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: "1" for k in keys})
    try:
        from huggingface_hub import constants as hub
    except ImportError:
        hub = None
    hub_old = getattr(hub, "HF_HUB_OFFLINE", None)
    if hub is not None:
        hub.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if hub is not None:
            hub.HF_HUB_OFFLINE = hub_old


def file_digest(path: str | Path, length: int = 12) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:length]


def load_state_dict_file(path: str | Path) -> dict[str, Tensor]:
    """Read a local weights file (``.safetensors`` or a torch state dict, ``weights_only=True``)."""
    p = Path(path)
    if not p.is_file():
        raise DmlbenchError(f"pretrained weights file {str(p)!r} does not exist; give the path of a state dict.")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(p))
        else:
            sd = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:
        raise DmlbenchError(f"cannot read pretrained weights {str(p)!r} ({type(err).__name__}: {err}).") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise DmlbenchError(f"pretrained weights {str(p)!r} do not hold a state dict.")
    return sd


def load_trunk_weights(trunk: nn.Module, sd: dict[str, Tensor], source: str, ignore: tuple[str, ...] = ()) -> None:
    """Load ``sd`` into ``trunk``; missing trunk keys are an error naming them (classifier keys of the
    file that the pooled trunk does not have are ignored)."""
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    result = trunk.load_state_dict(sd, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(ignore)]
    if missing:
        raise DmlbenchError(
            f"pretrained weights {source!r} do not fit this backbone: {len(missing)} missing keys "
            f"(e.g. {', '.join(missing[:3])})."
        )


def _timm_backbone(cfg: TrialConfig) -> Backbone:
    import timm

    name = cfg.backbone
    if not timm.is_model(name) and name not in timm.list_models(pretrained=False):
        valid = BACKBONES.names()
        raise ConfigError(
            f"unknown backbone {name!r}; use a registered backbone ({', '.join(valid)}) or any timm model "
            f"name (see timm.list_models())."
        )
    pretrained_id = "none"
    if cfg.pretrained is True:
        try:
            with _offline():
                trunk = timm.create_model(name, pretrained=True, num_classes=0)
        except Exception as err:
            raise DmlbenchError(
                f"pretrained weights for {name!r} are not in the local timm/Hugging Face cache ({type(err).__name__}); "
                f"download them where there is internet (python -c \"import timm; timm.create_model('{name}', "
                f"pretrained=True)\") and copy ~/.cache/huggingface here, or pass pretrained=<path to a state dict>, "
                f"or pretrained=false for random init."
            ) from None
        tag = getattr(getattr(trunk, "pretrained_cfg", None), "get", lambda k, d=None: d)("tag", None)
        pretrained_id = f"timm:{name}" + (f".{tag}" if tag else "")
    else:
        trunk = timm.create_model(name, pretrained=False, num_classes=0)
        if isinstance(cfg.pretrained, str):
            load_trunk_weights(trunk, load_state_dict_file(cfg.pretrained), cfg.pretrained)
            pretrained_id = f"file:{Path(cfg.pretrained).name}:{file_digest(cfg.pretrained)}"
    feat_dim = int(trunk.num_features)
    return Backbone(trunk, feat_dim, cfg.embedding_dim, cfg.bn_policy, name=name, pretrained_id=pretrained_id)


def build_backbone(cfg: TrialConfig) -> Backbone:
    """The backbone named by ``cfg.backbone`` (registered factory, else a timm model)."""
    if cfg.backbone in BACKBONES:
        return BACKBONES.get(cfg.backbone)(cfg)
    return _timm_backbone(cfg)


def known_backbone(name: str) -> bool:
    """Whether ``name`` is a registered backbone or a timm model (for validation before training)."""
    if name in BACKBONES:
        return True
    import timm

    return bool(timm.is_model(name))


# Backbones defined in their own modules register themselves on import.
from dmlbench.engine import bninception as _bninception  # noqa: E402,F401
