from __future__ import annotations

import pytest
from pydantic import ValidationError

from dmlbench.config import TrialConfig
from dmlbench.errors import ConfigError, UnknownNameError
from dmlbench.registry import Registry


def cfg(**kw: object) -> TrialConfig:
    return TrialConfig.from_dict({"method": "proxyanchor", "dataset": "digits", **kw})


def test_roundtrip_json_yaml_and_digest() -> None:
    c = cfg(lr=3e-4, params={"alpha": 16.0})
    assert TrialConfig.from_json(c.to_json()) == c
    assert TrialConfig.from_yaml(c.to_yaml()) == c
    assert c.params["alpha"] == 16.0 and c.params["margin"] == 0.1  # defaults filled by the method's Params
    assert c.digest() == TrialConfig.from_json(c.to_json()).digest()
    assert c.digest() != cfg(lr=1e-4).digest()


def test_frozen() -> None:
    c = cfg()
    with pytest.raises(ValidationError, match="frozen"):
        c.lr = 1.0  # type: ignore[misc]


def test_unknown_key_named_with_suggestion() -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'lr_rate'.*did you mean lr"):
        cfg(lr_rate=0.1)


def test_unknown_method_param_named() -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'alpah'.*did you mean alpha"):
        cfg(params={"alpah": 3})


@pytest.mark.parametrize(
    "kw, pattern",
    [
        ({"lr": -1.0}, "lr"),
        ({"embedding_dim": 0}, "embedding_dim"),
        ({"fold": 5, "num_folds": 4}, "fold must be < num_folds"),
        ({"phase": "search", "fold": None}, "needs a validation fold"),
        ({"schedule": "multistep"}, "needs milestones"),
        ({"params": {"alpha": -2}}, "alpha"),
    ],
)
def test_bad_values(kw: dict[str, object], pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        cfg(**kw)


def test_unknown_method_lists_valid() -> None:
    with pytest.raises(UnknownNameError, match=r"unknown method 'cpp' \(did you mean ccp\?\); valid methods: .*nivmf"):
        cfg(method="cpp")


def test_overrides_route_to_trial_or_params() -> None:
    c = cfg().with_overrides(["lr=0.01", "alpha=8", "params.margin=0.2", "fold=1"])
    assert c.lr == 0.01 and c.params["alpha"] == 8 and c.params["margin"] == 0.2 and c.fold == 1
    with pytest.raises(ConfigError, match=r"unknown key 'marign' in --set \(did you mean margin\?\)"):
        cfg().with_overrides(["marign=0.3"])
    with pytest.raises(ConfigError, match="key=value"):
        cfg().with_overrides(["lr"])


def test_registry_duplicates_and_unknown() -> None:
    r: Registry[int] = Registry("thing")
    r.register("a")(1)
    with pytest.raises(ValueError, match="registered twice"):
        r.register("a")(2)
    with pytest.raises(UnknownNameError, match="valid things: a"):
        r.get("b")
    assert "a" in r and list(r) == ["a"] and len(r) == 1


def test_alternative_params_later_layer_wins() -> None:
    """CCP's pool_size and pool_ratio are alternatives: --set pool_size over the recipe's pool_ratio."""
    from dmlbench.engine.resolve import layered_config

    rec = layered_config("ccp", "digits")
    assert rec.params["pool_ratio"] == 1.5 and rec.params["pool_size"] is None
    over = layered_config("ccp", "digits", overrides=["pool_size=4"])
    assert over.params["pool_size"] == 4 and over.params["pool_ratio"] is None
    with pytest.raises(ConfigError, match="not both"):  # both in one layer is still an error
        TrialConfig.from_dict({"method": "ccp", "dataset": "digits", "params": {"pool_size": 4, "pool_ratio": 2.0}})


def test_large_benchmark_presets_skip_validation_clustering() -> None:
    from dmlbench.engine.resolve import layered_config

    # thousands of classes per SOP / In-Shop fold: no k-means at every validation by default
    assert not layered_config("proxyanchor", "sop").val_clustering
    assert not layered_config("proxyanchor", "inshop").val_clustering
    assert layered_config("proxyanchor", "sop", overrides=["val_clustering=true"]).val_clustering
    assert layered_config("proxyanchor", "cub200").val_clustering
