"""Search-space loader: good files, every bad case, conditions, fixed values, Optuna sampling."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import optuna
import pytest

from dmlbench.errors import ConfigError
from dmlbench.methods.base import METHODS, Method, MethodParams
from dmlbench.search_spaces import loader


class _DummyParams(MethodParams):
    lam: float = 0.01
    proxies_per_class: int = 2
    base_loss: Literal["c1", "c2", "ms", "triplet"] = "c1"
    margin: float = 0.2


class _Dummy(Method):
    name = "dummy_ss"
    Params = _DummyParams


@pytest.fixture(autouse=True)
def dummy_method() -> Iterator[None]:
    METHODS._entries["dummy_ss"] = _Dummy
    yield
    METHODS._entries.pop("dummy_ss", None)


GOOD = """
method: dummy_ss
params:
  - {name: lam, type: float, low: 1.0e-5, high: 1.0e-1, log: true}
  - {name: proxies_per_class, type: int, low: 1, high: 16}
  - {name: base_loss, type: categorical, choices: [c1, c2, ms, triplet]}
  - {name: margin, type: float, low: 0.1, high: 0.5, condition: {param: base_loss, in: [c1, c2]}}
  - {name: weight_decay, type: float, low: 0.0, high: 0.001, step: 0.0005}
fixed: {lr: 1.0e-5}
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "space.yaml"
    p.write_text(text)
    return p


def test_good_file_parses(tmp_path: Path) -> None:
    space = loader.load_space_file(write(tmp_path, GOOD), method="dummy_ss")
    assert space.names() == ["lam", "proxies_per_class", "base_loss", "margin", "weight_decay"]
    assert space.fixed == {"lr": 1.0e-5}
    assert space.params[0].log is True
    assert space.params[3].condition is not None
    assert space.params[3].condition.allowed() == ("c1", "c2")


def test_sampling_respects_bounds_conditions_and_fixed(tmp_path: Path) -> None:
    space = loader.load_space_file(write(tmp_path, GOOD))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3), direction="maximize")
    seen_losses = set()
    for _ in range(40):
        trial = study.ask()
        fixed = space.suggest(trial)
        assert fixed == {"lr": 1.0e-5}
        p = trial.params
        assert 1e-5 <= p["lam"] <= 1e-1
        assert isinstance(p["proxies_per_class"], int) and 1 <= p["proxies_per_class"] <= 16
        assert p["weight_decay"] in (0.0, 0.0005, 0.001)
        seen_losses.add(p["base_loss"])
        # margin is sampled exactly when base_loss is c1 or c2
        assert ("margin" in p) == (p["base_loss"] in ("c1", "c2"))
        if "margin" in p:
            assert 0.1 <= p["margin"] <= 0.5
        cfg = loader.build_trial_config({"method": "dummy_ss", "dataset": "digits"}, {**p, **fixed})
        assert cfg.lr == 1.0e-5 and cfg.weight_decay == p["weight_decay"]
        assert cfg.params["lam"] == p["lam"] and cfg.params["base_loss"] == p["base_loss"]
        study.tell(trial, 0.0)
    assert seen_losses == {"c1", "c2", "ms", "triplet"}


def test_equals_condition(tmp_path: Path) -> None:
    text = """
method: dummy_ss
params:
  - {name: base_loss, type: categorical, choices: [c1, ms]}
  - {name: margin, type: float, low: 0.1, high: 0.5, condition: {param: base_loss, equals: ms}}
"""
    space = loader.load_space_file(write(tmp_path, text))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        t = study.ask()
        space.suggest(t)
        assert ("margin" in t.params) == (t.params["base_loss"] == "ms")
        study.tell(t, 0.0)


BAD_CASES = {
    "unknown_key": (
        "method: dummy_ss\nparams:\n  - {name: lam, type: float, low: 0.1, high: 1, lgo: true}\n",
        r"unknown key 'lgo'.*params\[0\] \(lam\).*did you mean low, log",
    ),
    "low_gt_high": (
        "method: dummy_ss\nparams:\n  - {name: lam, type: float, low: 2, high: 1}\n",
        r"params\[0\] \(lam\).*low \(2\) is greater than high \(1\)",
    ),
    "bad_type": (
        "method: dummy_ss\nparams:\n  - {name: lam, type: uniform, low: 0.1, high: 1}\n",
        r"unknown type 'uniform'.*valid types: float, int, categorical",
    ),
    "unknown_name": (
        "method: dummy_ss\nparams:\n  - {name: lamb, type: float, low: 0.1, high: 1}\n",
        r"params\[0\] 'lamb' is neither a trial setting nor a dummy_ss parameter \(did you mean lam\?\)",
    ),
    "unknown_fixed": (
        "method: dummy_ss\nparams: []\nfixed: {lrr: 0.1}\n",
        r"fixed key 'lrr' is neither.*did you mean lr",
    ),
    "log_nonpositive": (
        "method: dummy_ss\nparams:\n  - {name: lam, type: float, low: 0, high: 1, log: true}\n",
        r"log-scale parameter needs low > 0",
    ),
    "int_float_bounds": (
        "method: dummy_ss\nparams:\n  - {name: proxies_per_class, type: int, low: 1.5, high: 4}\n",
        r"integer low",
    ),
    "categorical_empty": (
        "method: dummy_ss\nparams:\n  - {name: base_loss, type: categorical, choices: []}\n",
        r"non-empty 'choices'",
    ),
    "missing_high": (
        "method: dummy_ss\nparams:\n  - {name: lam, type: float, low: 0.1}\n",
        r"needs both 'low' and 'high'",
    ),
    "condition_forward_ref": (
        (
            "method: dummy_ss\nparams:\n  - {name: margin, type: float, low: 0.1, high: 0.5, "
            "condition: {param: base_loss, in: [c1]}}\n"
            "  - {name: base_loss, type: categorical, choices: [c1, c2]}\n"
        ),
        r"condition on 'base_loss', which is not a parameter listed before it",
    ),
    "condition_value_not_a_choice": (
        (
            "method: dummy_ss\nparams:\n  - {name: base_loss, type: categorical, choices: [c1, c2]}\n"
            "  - {name: margin, type: float, low: 0.1, high: 0.5, condition: {param: base_loss, in: [c3]}}\n"
        ),
        r"condition value 'c3' that is not among the choices of 'base_loss'",
    ),
    "condition_both": (
        (
            "method: dummy_ss\nparams:\n  - {name: base_loss, type: categorical, choices: [c1, c2]}\n"
            "  - {name: margin, type: float, low: 0.1, high: 0.5, condition: {param: base_loss, in: [c1], equals: c1}}\n"
        ),
        r"exactly one of 'in",
    ),
    "duplicate": (
        (
            "method: dummy_ss\nparams:\n  - {name: lam, type: float, low: 0.1, high: 1}\n"
            "  - {name: lam, type: float, low: 0.1, high: 1}\n"
        ),
        r"'lam' is listed twice",
    ),
    "searched_and_fixed": (
        "method: dummy_ss\nparams:\n  - {name: lr, type: float, low: 0.1, high: 1}\nfixed: {lr: 0.5}\n",
        r"'lr' is both searched and fixed",
    ),
    "protocol_field": (
        "method: dummy_ss\nparams:\n  - {name: seed, type: int, low: 0, high: 3}\n",
        r"'seed' is neither a trial setting",
    ),
    "unknown_method": ("method: dumy_ss\nparams: []\n", r"unknown method 'dumy_ss' \(did you mean dummy_ss\?\)"),
    "unknown_top_key": ("method: dummy_ss\nparams: []\nfixd: {lr: 1}\n", r"unknown key 'fixd'.*did you mean fixed"),
    "not_a_mapping": ("- a\n- b\n", r"must be a mapping"),
    "params_not_list": ("method: dummy_ss\nparams: {lam: 1}\n", r"'params' must be a list"),
    "yaml_syntax": ("method: dummy_ss\nparams: [\n", r"not valid YAML at line"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_files_give_one_clear_sentence(tmp_path: Path, case: str) -> None:
    text, pattern = BAD_CASES[case]
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=pattern) as info:
        loader.load_space_file(path)
    msg = str(info.value)
    assert "\n" not in msg
    if case not in ("unknown_method",):
        assert str(path) in msg


def test_method_mismatch_and_missing_files(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    METHODS._entries["other_ss"] = _Dummy
    try:
        with pytest.raises(ConfigError, match="is for method 'dummy_ss', not 'other_ss'"):
            loader.load_space("other_ss", override=path)
        with pytest.raises(ConfigError, match="has no search space.*--search-space"):
            loader.load_space("other_ss")
    finally:
        METHODS._entries.pop("other_ss")
    with pytest.raises(ConfigError, match="does not exist"):
        loader.load_space_file(tmp_path / "missing.yaml")


def test_yaml_tags_are_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "method: !!python/object/apply:os.system [echo hi]\nparams: []\n")
    with pytest.raises(ConfigError, match="YAML tag that safe loading refuses"):
        loader.load_space_file(path)


def test_shipped_spaces_parse() -> None:
    """Every YAML shipped in the package parses (for the methods registered now)."""
    for name in loader.available_spaces():
        if name in METHODS:
            space = loader.load_space(name)
            assert space.method == name
