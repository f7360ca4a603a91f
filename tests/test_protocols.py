"""The two protocols (issue 17): recipes per method × dataset × embedding size, the MLRC common
settings, budgets and ASHA grace, protocol labels, and the dry-run plan without datasets."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from dmlbench.cli import app
from dmlbench.config import TrialConfig
from dmlbench.errors import ConfigError
from dmlbench.methods import METHODS
from dmlbench.orchestrator import planning
from dmlbench.orchestrator.spec import Cell, SweepSpec

runner = CliRunner()
BENCH = ("cub200", "cars196", "sop", "inshop")

# Expected paper recipes, written from the specs (shared/specs/*.md) independently of the code:
# (method, dataset, dim) -> (backbone, image size, crop scale, batch P x K, epochs, schedule facts,
# method params, extrapolated?)
N_COMMON = {"temp": 0.003, "temp_lr_mult": 200.0, "n_samples": 5, "sampler": "code", "log_cp": "code_poly",
            "warm_start": True, "stretch_samples": False}  # fmt: skip
NIVMF = {  # nivmf.md §2.3: epochs, milestones, gamma, proxy x, kappa x, concentration, init norm, guidance
    ("cub200", 128): (250, [25, 50], 0.3, 5000, 20000, 6, 30, 3),
    ("cub200", 512): (250, [31], 0.1, 5000, 20000, 18, 50, 5),
    ("cars196", 128): (300, [60, 80], 0.1, 7500, 7500, 9, 12, 0.3),
    ("cars196", 512): (300, [105, 170], 0.2, 5000, 20000, 22, 10, 0.1),
}
DIVA = {  # diva.md §3.1 R50 columns: epochs, milestone epoch, gamma, alpha, rho, n_key_batches
    "cub200": (350, 55, 0.2, 0.3, 1500, 30),
    "cars196": (350, 70, 0.2, 0.15, 100, 30),
    "sop": (150, 70, 0.3, 0.2, 150, 70),
    "inshop": (150, 70, 0.3, 0.2, 150, 70),  # extrapolated from SOP
}
CCP = {  # ccp.md §2-3: P, pool ratio (b = 12 / 7), steps per round
    "cub200": (8, 1.5, 25), "cars196": (8, 1.5, 25), "sop": (4, 1.75, 250), "inshop": (4, 1.75, 250),
}


def paper_cfg(method: str, dataset: str, dim: int | None) -> tuple[planning.CellSettings, TrialConfig]:
    spec = SweepSpec(methods=(method,), datasets=(dataset,), protocol="paper")
    (cell,) = [c for c in spec.cells() if c.dim == dim]
    st = planning.cell_settings(spec, cell)
    return st, TrialConfig.from_dict(planning.resolved_config(st))


def expected_paper_cells() -> list[tuple[str, str, int]]:
    return ([("nivmf", d, dim) for d in BENCH for dim in (128, 512)] + [("diva", d, 512) for d in BENCH]
            + [("ccp", d, 128) for d in BENCH])  # fmt: skip


def test_paper_cells_are_every_published_size() -> None:
    spec = SweepSpec(methods=("nivmf", "diva", "ccp"), datasets=BENCH, protocol="paper")
    got = sorted((c.method, c.dataset, c.dim) for c in spec.cells())
    assert got == sorted(expected_paper_cells())
    assert {c.backbone for c in spec.cells() if c.method != "ccp"} == {"resnet50.tv_in1k"}
    assert {c.backbone for c in spec.cells() if c.method == "ccp"} == {"bninception"}
    keys = [c.key for c in spec.cells()]
    assert "nivmf/cub200/resnet50.tv_in1k/d512" in keys and len(set(keys)) == len(keys)


@pytest.mark.parametrize(("method", "dataset", "dim"), expected_paper_cells())
def test_paper_recipe_table(method: str, dataset: str, dim: int) -> None:
    st, cfg = paper_cfg(method, dataset, dim)
    assert cfg.embedding_dim == dim and cfg.phase == "final" and st.searched is False
    assert not st.budget_capped and st.paper_selection and "test" in st.paper_selection or method == "ccp"
    p = cfg.params
    if method == "nivmf":
        row = NIVMF.get((dataset, dim)) or NIVMF[("cub200", dim)]
        epochs, ms, gamma, pm, km, conc, inm, gw = row
        assert (cfg.backbone, cfg.image_size, cfg.crop_scale, cfg.bn_policy) == ("resnet50.tv_in1k", 224, (0.08, 1.0),
                                                                                 "frozen_stats")  # fmt: skip
        assert (cfg.classes_per_batch, cfg.samples_per_class, cfg.lr, cfg.weight_decay) == (32, 2, 1e-5, 4e-4)
        assert (cfg.epochs, list(cfg.milestones), cfg.gamma, cfg.schedule) == (epochs, ms, gamma, "multistep")
        assert (p["proxy_lr_mult"], p["kappa_lr_mult"], p["concentration"], p["init_norm_multiplier"],
                p["guidance_w"]) == (pm, km, conc, inm, gw)  # fmt: skip
        assert {k: p[k] for k in N_COMMON} == N_COMMON and p["lr_milestone_frac"] is None
        assert (st.extrapolated is None) == (dataset in ("cub200", "cars196"))
        assert cfg.fold is None and not st.fold_models  # full train, scored at the last epoch
    elif method == "diva":
        epochs, milestone, gamma, alpha, rho, nkb = DIVA[dataset]
        assert (cfg.backbone, cfg.image_size, cfg.bn_policy) == ("resnet50.tv_in1k", 224, "frozen_stats")
        assert (cfg.classes_per_batch, cfg.samples_per_class, cfg.lr, cfg.weight_decay) == (56, 2, 1e-5, 4e-4)
        assert cfg.epochs == epochs and round(p["lr_milestone_frac"] * epochs) == milestone
        assert (p["lr_gamma"], p["alpha"], p["rho"], p["n_key_batches"], p["dance_tau"]) == (gamma, alpha, rho, nkb,
                                                                                             0.01)  # fmt: skip
        assert (st.extrapolated is not None) == (dataset == "inshop")
        # head weighting of network_loader.py: CUB 0.5-1-1-1, CARS 0.5-2-2-2, SOP 1-1-1-1 (spec §4.2)
        assert p["disc_weight"] == {"cub200": 0.5, "cars196": 0.25}.get(dataset, 1.0)
        assert nkb * 56 * 2 <= {"cub200": 5864, "cars196": 8054, "sop": 59551, "inshop": 25882}[dataset]
        assert cfg.fold is None and not st.fold_models
    else:
        P, ratio, rounds = CCP[dataset]
        assert (cfg.backbone, cfg.image_size, cfg.crop_scale, cfg.bn_policy) == ("bninception", 227, (0.16, 1.0),
                                                                                 "frozen_all")  # fmt: skip
        assert (cfg.classes_per_batch, cfg.samples_per_class, cfg.lr, cfg.weight_decay, cfg.adam_eps) == \
            (8, 4, 1e-5, 1e-4, 1e-7)  # fmt: skip
        assert (cfg.epochs, cfg.early_stop_patience, cfg.iters_per_epoch) == (10000, 60, rounds)
        assert (p["proxies_per_class"], p["pool_ratio"]) == (P, ratio)
        assert st.fold_models and st.extrapolated is None  # the paper's own protocol: val-selected fold models


def test_paper_protocol_refuses_methods_without_a_recipe() -> None:
    spec = SweepSpec(methods=("proxyanchor",), datasets=("cub200",), protocol="paper")
    with pytest.raises(ConfigError, match="no published recipe.*--protocol mlrc"):
        planning.cell_settings(spec, spec.cells()[0])


@pytest.mark.parametrize("method", ["nivmf", "diva", "ccp", "proxyanchor"])
@pytest.mark.parametrize("dataset", BENCH)
def test_mlrc_common_settings_on_benchmarks(method: str, dataset: str) -> None:
    spec = SweepSpec(methods=(method,), datasets=(dataset,))
    (cell,) = spec.cells()
    assert cell.backbone == "bninception" and cell.dim is None
    st = planning.cell_settings(spec, cell)
    cfg = TrialConfig.from_dict(planning.resolved_config(st))
    assert (cfg.image_size, cfg.crop_scale, cfg.bn_policy, cfg.embedding_dim) == (227, (0.16, 1.0), "frozen_all", 128)
    assert (cfg.classes_per_batch, cfg.samples_per_class, cfg.optimizer, cfg.lr, cfg.schedule) == (8, 4, "adam", 1e-5,
                                                                                                   "constant")  # fmt: skip
    assert cfg.iters_per_epoch == planning.MLRC_ROUND_STEPS[dataset] and cfg.early_stop_patience == 60
    assert cfg.params.get("lr_milestone_frac") is None  # the method's own LR drop is off under mlrc
    assert st.searched and st.fold_models and st.grace >= METHODS.get(method).grace_epochs(cfg)
    from dmlbench.search_spaces.loader import load_space

    space = planning.cell_space(spec, load_space(method), cell)
    fixed_or_searched = set(space.names()) | set(space.fixed)
    assert not fixed_or_searched & (set(planning.MLRC_COMMON) | {"lr_milestone_frac"})


def test_embedding_dims_axis_and_epoch_cap_recorded() -> None:
    spec = SweepSpec(methods=("nivmf", "diva"), datasets=("cub200",), embedding_dims=(128, 512), epochs=20)
    cells = spec.cells()
    assert [(c.method, c.dim) for c in cells] == [("nivmf", 128), ("nivmf", 512), ("diva", 128), ("diva", 512)]
    for c in cells:
        st = planning.cell_settings(spec, c)
        assert st.base["embedding_dim"] == c.dim and st.epochs == 20 and st.recipe_epochs == 10000
        assert st.budget_capped and st.grace <= 20
    text = planning.format_plan(spec, planning.plan(spec))
    assert "capped" in text and "budget_capped" in text


def test_grace_covers_what_each_method_needs() -> None:
    spec = SweepSpec(methods=("ccp",), datasets=("cub200",))
    st = planning.cell_settings(spec, spec.cells()[0])
    assert st.grace == 3 * (1 + 3)  # three stages of (min 1 + patience 3) rounds
    cfg = TrialConfig.from_dict(planning.resolved_config(paper_cfg("nivmf", "cub200", 128)[0]))
    assert METHODS.get("nivmf").grace_epochs(cfg) == 25  # first milestone of the CUB/128 recipe
    cfg = TrialConfig.from_dict(planning.resolved_config(paper_cfg("diva", "cars196", 512)[0]))
    assert METHODS.get("diva").grace_epochs(cfg) == 70
    user = SweepSpec(methods=("ccp",), datasets=("cub200",), grace_period=50)
    assert planning.cell_settings(user, user.cells()[0]).grace == 50


def test_protocol_labels() -> None:
    base: dict[str, Any] = {"methods": ("ccp",), "datasets": ("digits",), "folds": 3}
    assert planning.protocol_label(SweepSpec(**base)) == "mlrc"
    assert planning.protocol_label(SweepSpec(**base), concatenated=True) == "mlrc-concat3"
    assert planning.protocol_label(SweepSpec(**base, search_folds=1)) == "holdout"
    assert planning.protocol_label(SweepSpec(**base, search_folds=2)) == "mlrc-search2"
    assert planning.protocol_label(SweepSpec(**base, protocol="paper")) == "paper"
    with pytest.raises(ValueError, match="search_folds"):
        SweepSpec(**base, search_folds=4)


def test_cell_key_stays_without_a_dim_axis() -> None:
    assert Cell("ccp", "digits", "tiny").key == "ccp/digits/tiny"
    assert Cell("ccp", "digits", "tiny", 64).key == "ccp/digits/tiny/d64"
    assert Cell("n", "cub200", "resnet50.tv_in1k", 512).slug == "n-cub200-resnet50_tv_in1k-d512"


def test_dry_run_without_datasets_prints_the_plan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DMLBENCH_DATA", raising=False)
    args = ["sweep", "--methods", "nivmf,ccp,diva", "--datasets", "cub200,sop", "--dry-run",
            "--output", str(tmp_path / "r")]  # fmt: skip
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "missing datasets" in res.output and "cub200" in res.output and "GPU-h" in res.output
    for token in ("epochs 10000", "schedule constant", "batch 8x4", "227 px", "dim 128", "weights"):
        assert token in res.output
    assert not list((tmp_path / "r").glob("*/sweep.json"))  # a dry run starts no sweep
    # without --dry-run the missing data is an error before anything starts
    res = runner.invoke(app, args[:-3] + ["--output", str(tmp_path / "r")])
    assert res.exit_code != 0 and "no data root for cub200 and sop" in res.output


def test_dry_run_json_has_every_resolved_config_field(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DMLBENCH_DATA", raising=False)
    res = runner.invoke(app, ["sweep", "--methods", "nivmf,ccp,diva", "--datasets", "cub200,inshop", "--protocol",
                              "paper", "--dry-run", "--format", "json", "--output", str(tmp_path / "r")])  # fmt: skip
    assert res.exit_code == 0, res.output
    plan = json.loads(res.output)
    assert plan["protocol"] == "paper" and set(plan["missing_datasets"][0].split()) >= {"cub200"}
    assert len(plan["cells"]) == 2 * 2 + 2 + 2
    for cell in plan["cells"]:
        for key in ("method", "dataset", "backbone", "protocol", "search_trials", "final_trials", "config"):
            assert key in cell
        cfg = cell["config"]
        assert set(cfg) == set(TrialConfig.model_fields)
        assert set(cfg["params"]) == set(METHODS.get(cell["method"]).Params.model_fields)
        assert TrialConfig.from_dict(cfg).to_dict() == cfg
        assert cell["protocol"] == "paper" and cell["search_trials"] == 0 and cell["est_gpu_hours"] > 0
    diva_inshop = next(c for c in plan["cells"] if c["method"] == "diva" and c["dataset"] == "inshop")
    assert "In-Shop" in diva_inshop["extrapolated"]


def test_diva_queue_bounded_by_the_fold_training_images() -> None:
    from dmlbench.search_spaces.loader import load_space

    spec = SweepSpec(methods=("diva",), datasets=("cub200",), trial_base={"classes_per_batch": 56,
                                                                        "samples_per_class": 2})  # fmt: skip
    (cell,) = spec.cells()
    space = planning.cell_space(spec, load_space("diva"), cell)
    (nkb,) = [p for p in space.params if p.name == "n_key_batches"]
    # a CUB fold model trains on 5864 - 5864 // 4 = 4398 images: at most 39 batches of 112 keys
    assert nkb.high == 4398 // 112 and nkb.low == 10
    assert "disc_weight" in space.names()  # the head weighting is chosen on validation by the search


def test_diva_refuses_a_queue_larger_than_the_training_set() -> None:
    from dmlbench.engine import train

    cfg = TrialConfig.from_dict({"method": "diva", "dataset": "digits", "backbone": "tiny", "pretrained": False,
                                 "image_size": 16, "embedding_dim": 16, "epochs": 1, "iters_per_epoch": 1,
                                 "classes_per_batch": 4, "samples_per_class": 8, "device": "cpu",
                                 "progress": False, "num_folds": 3,
                                 "params": {"n_key_batches": 1000, "decorr_hidden": 8}})  # fmt: skip
    with pytest.raises(ConfigError, match="larger than the .* training images"):
        train(cfg)


def test_paper_cells_need_no_search_to_be_complete() -> None:
    from types import SimpleNamespace

    from dmlbench.orchestrator.sweep import incomplete_cells
    from dmlbench.results import schema

    spec = SweepSpec(methods=("nivmf",), datasets=("digits",), protocol="paper", folds=3)
    done = SimpleNamespace(cell=spec.cells()[0], rows={"r": {schema.PHASE: "final", schema.STATUS: "complete"}})
    assert incomplete_cells([done], spec) == []  # type: ignore[list-item]
    mlrc = spec.model_copy(update={"protocol": "mlrc"})
    assert incomplete_cells([done], mlrc) == ["nivmf/digits/tiny (search)"]  # type: ignore[list-item]
