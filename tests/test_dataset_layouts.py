"""Where the benchmarks are found: ``--data-root`` parsing, every accepted layout on a tiny tree,
and the image verification the preflight calls."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from dmlbench.cli import app
from dmlbench.datasets import DATASETS
from dmlbench.datasets._common import BenchmarkSource
from dmlbench.datasets.checks import check_datasets, image_problems
from dmlbench.datasets.roots import DataRoots, data_roots, parse_data_root
from dmlbench.errors import ConfigError, DatasetError
from tests.fixtures.benchmark_trees import (
    colour_of,
    make_cars,
    make_cars_csv,
    make_cars_devkit,
    make_cub,
    make_inshop,
    make_sop,
)


@pytest.fixture(autouse=True)
def _no_env_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DMLBENCH_DATA", raising=False)


def source(name: str, root: Path | str | None) -> BenchmarkSource:
    cls = DATASETS.get(name)
    assert issubclass(cls, BenchmarkSource)
    return cls(None if root is None else str(root), expect_full=False)


def first_pixel_colour_ok(src: BenchmarkSource) -> bool:
    """Image 0 decodes to the fixture's colour of image 1 (so paths resolve to the right files)."""
    img = src.table().load(0)
    return bool(np.abs(img.astype(int) - np.array(colour_of(1))).max() <= 3)


def move_into(src: Path, dest: Path) -> Path:
    """Move ``src``'s contents into ``dest`` (created); returns ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    for child in list(src.iterdir()):
        shutil.move(str(child), str(dest / child.name))
    src.rmdir()
    return dest


# ---- parsing --data-root ----------------------------------------------------------------------


def test_parse_roots_and_named_entries() -> None:
    r = parse_data_root(" /data/dml , cars196=/mnt/cars,CUB_200_2011=/x/birds, /more ")
    assert r.roots == (Path("/data/dml"), Path("/more"))
    assert dict(r.explicit) == {"cars196": Path("/mnt/cars"), "cub200": Path("/x/birds")}
    assert r.for_dataset("cars196") == (Path("/mnt/cars"),) and r.for_dataset("sop") == r.roots
    # aliases are folder names, compared without case or punctuation
    assert dict(parse_data_root("In-Shop=/a,SOP=/b,cars=/c").explicit) == {
        "inshop": Path("/a"),
        "sop": Path("/b"),
        "cars196": Path("/c"),
    }
    # '=' inside a path is part of the path; ~ is expanded; empty text means nothing given
    assert parse_data_root("/data/a=b").roots == (Path("/data/a=b"),)
    assert parse_data_root("~/dml").roots == (Path.home() / "dml",)
    assert parse_data_root("") == DataRoots() and parse_data_root(None) == DataRoots()


def test_parse_rejects_bad_entries() -> None:
    with pytest.raises(ConfigError, match=r"'carz=/x' names no dataset \(did you mean cars196\?\)"):
        parse_data_root("/data,carz=/x")
    with pytest.raises(ConfigError, match="has no path after '='; write sop=/path/to/sop"):
        parse_data_root("sop=")
    with pytest.raises(ConfigError, match="gives cub200 twice"):
        parse_data_root("cub200=/a,CUB=/b")
    with pytest.raises(ConfigError, match="names no dataset"):
        parse_data_root("digits=/x")  # embedded datasets have no location


def test_env_completes_the_given_text(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DMLBENCH_DATA", "/env/root,sop=/env/sop")
    r = data_roots("cars196=/mnt/cars")
    assert r.roots == (Path("/env/root"),)  # no plain root given: the environment's
    assert dict(r.explicit) == {"sop": Path("/env/sop"), "cars196": Path("/mnt/cars")}
    r = data_roots("/given,sop=/given/sop")
    assert r.roots == (Path("/given"),) and r.explicit["sop"] == Path("/given/sop")
    monkeypatch.delenv("DMLBENCH_DATA")
    assert data_roots(None) == DataRoots()


# ---- every accepted layout ----------------------------------------------------------------------


def test_cars_layouts(tmp_path: Path) -> None:
    # the official car_ims/ + cars_annos.mat with no wrapper folder: directly in the data root
    bare = tmp_path / "bare"
    move_into(make_cars(bare, n_classes=4, per_class=2), bare)
    (bare / "CUB_200_2011").mkdir()  # other datasets beside it do not matter
    src = source("cars196", bare)
    assert src.table().labels.tolist() == [97, 97, 98, 98, 99, 99, 100, 100] and first_pixel_colour_ok(src)
    assert src.check().layout == "car_ims" and src.check().path == str(bare)
    # lower-case cars196/ (powerful-benchmarker's name)
    lower = tmp_path / "lower"
    (make_cars(lower, n_classes=4, per_class=2)).rename(lower / "cars196")
    assert source("cars196", lower).check().path == str(lower / "cars196")
    # the classification archives (OML's layout), flat and with nested image folders
    for nested in (False, True):
        root = tmp_path / f"devkit{nested}"
        make_cars_devkit(root, n_classes=4, per_class=2, nested=nested)
        src = source("cars196", root)
        t = src.table()
        assert t.labels.tolist() == [97, 97, 98, 98, 99, 99, 100, 100] * 2 and src.check().layout == "devkit"
        assert t.split.tolist() == (["train"] * 4 + ["test"] * 4) * 2 and first_pixel_colour_ok(src)
    # the Kaggle by-classes-folder copy pytorch-metric-learning downloads
    root = tmp_path / "pml"
    make_cars_csv(root, n_classes=4, per_class=2)
    src = source("cars196", root)
    t = src.table()
    assert t.labels.tolist() == [3, 3, 98, 98, 99, 99, 100, 100] * 2 and src.check().layout == "csv"
    assert t.paths is not None and "car_data/car_data/train/Ram C-V Cargo Van Minivan 2012/00001.jpg" in t.paths[0]
    assert first_pixel_colour_ok(src)


def test_inshop_layouts(tmp_path: Path) -> None:
    # as distributed: Eval/list_eval_partition.txt, images under Img/img/
    root = tmp_path / "dist"
    flat = make_inshop(root, n_train=2, n_test=2, per_item=3)
    bench = root / "DeepFashion" / "In-shop Clothes Retrieval Benchmark"  # one wrapper level
    (bench / "Eval").mkdir(parents=True)
    (bench / "Img").mkdir()
    (flat / "list_eval_partition.txt").rename(bench / "Eval" / "list_eval_partition.txt")
    (flat / "img").rename(bench / "Img" / "img")
    flat.rmdir()
    src = source("inshop", root)
    t = src.table()
    assert t.paths is not None and t.paths[0] == str(bench / "Img/img/WOMEN/Dresses/id_00000001/01_1_front.jpg")
    assert np.flatnonzero(t.is_query).tolist() == [6, 9] and first_pixel_colour_ok(src)  # type: ignore[arg-type]
    assert src.check().layout == "Eval"
    # a mirror with Eval/ and img/ at the top, in a lower-case inshop/
    root = tmp_path / "mirror"
    flat = make_inshop(root, n_train=2, n_test=2, per_item=3)
    (flat / "Eval").mkdir()
    (flat / "list_eval_partition.txt").rename(flat / "Eval" / "list_eval_partition.txt")
    flat.rename(root / "inshop")
    src = source("inshop", root)
    assert src.check().layout == "Eval-img" and first_pixel_colour_ok(src)
    # the partition file and img/ side by side
    root = tmp_path / "flat"
    make_inshop(root, n_train=2, n_test=2, per_item=3)
    assert source("inshop", root).check().layout == "flat"


def test_cub_and_sop_folder_names(tmp_path: Path) -> None:
    # powerful-benchmarker keeps CUB as cub2011/CUB_200_2011/
    (make_cub(tmp_path / "pb", n_classes=4, per_class=3)).rename(tmp_path / "pb" / "tmp")
    (tmp_path / "pb" / "cub2011").mkdir()
    (tmp_path / "pb" / "tmp").rename(tmp_path / "pb" / "cub2011" / "CUB_200_2011")
    src = source("cub200", tmp_path / "pb")
    assert src.check().path == str(tmp_path / "pb" / "cub2011" / "CUB_200_2011") and first_pixel_colour_ok(src)
    # lower-case folder names; --data-root may point at the dataset folder itself
    (make_cub(tmp_path / "lc")).rename(tmp_path / "lc" / "cub_200_2011")
    assert source("cub200", tmp_path / "lc").check().status == "found"
    assert source("cub200", tmp_path / "lc" / "cub_200_2011").check().status == "found"
    (make_sop(tmp_path / "s", n_classes=4)).rename(tmp_path / "s" / "sop")
    assert len(source("sop", tmp_path / "s").table()) == 8


def test_explicit_paths_mixed_with_a_root(tmp_path: Path) -> None:
    root = tmp_path / "dml"
    make_cub(root)
    make_sop(root)
    make_inshop(root)
    elsewhere = make_cars(tmp_path / "mnt")
    odd = elsewhere.rename(tmp_path / "mnt" / "my cars copy")  # any folder name once given explicitly
    text = f"{root},cars196={odd}"
    checks = check_datasets(["all"], text, expect_full=False)
    assert [c.status for c in checks] == ["found"] * 4, [c.message for c in checks]
    assert checks[1].path == str(odd)
    # the explicit path wins over the root, and is the only place searched for that dataset
    make_cars(root)
    assert source("cars196", text).check().path == str(odd)
    gone = source("cars196", f"{root},cars196={tmp_path / 'nope'}").check()
    assert gone.status == "missing" and f"the path {tmp_path / 'nope'} given as cars196= does not exist" in gone.message
    bad = check_datasets(["sop"], f"{root},sopp=/x")
    assert bad[0].status == "malformed" and "names no dataset" in bad[0].message


def test_missing_and_incomplete_messages_name_accepted_layouts(tmp_path: Path) -> None:
    check = source("inshop", tmp_path).check()
    assert check.status == "missing"
    for described in ("Eval/list_eval_partition.txt + Img/img/", "list_eval_partition.txt + img/ side by side"):
        assert described in check.message
    # a folder named like the dataset but with a layout half there: name the missing piece
    (tmp_path / "In-shop Clothes Retrieval Benchmark" / "Eval").mkdir(parents=True)
    (tmp_path / "In-shop Clothes Retrieval Benchmark" / "Eval" / "list_eval_partition.txt").write_text("1\n")
    check = source("inshop", tmp_path).check()
    assert check.status == "missing" and "inshop is incomplete: the folder" in check.message
    assert "In-shop Clothes Retrieval Benchmark/Img/img is missing" in check.message


def test_cli_check_accepts_mixed_data_root(tmp_path: Path) -> None:
    make_cub(tmp_path / "dml")
    cars = make_cars_devkit(tmp_path / "x")
    out = CliRunner().invoke(
        app, ["datasets", "check", "cub200,cars196", "--data-root", f"{tmp_path / 'dml'},cars196={cars}", "--subset"]
    )
    assert out.exit_code == 0, out.output
    assert out.output.count("found") >= 2 and "devkit" in out.output


# ---- image verification (the preflight's check of a split) ----------------------------------------


def test_image_problems_name_each_file(tmp_path: Path) -> None:
    make_inshop(tmp_path, n_train=3, n_test=3, per_item=3)
    paths = source("inshop", tmp_path).table().paths
    assert paths is not None
    assert image_problems("inshop", str(tmp_path)) == []
    Path(paths[0]).unlink()  # train
    Path(paths[1]).write_bytes(b"")  # train
    data = Path(paths[9]).read_bytes()  # first query image
    Path(paths[9]).write_bytes(data[: len(data) // 2])  # truncated
    Path(paths[11]).write_bytes(b"not an image at all")  # gallery
    found = image_problems("inshop", str(tmp_path))
    assert [(p.path, p.kind) for p in found] == [
        (paths[0], "missing"),
        (paths[1], "empty"),
        (paths[9], "truncated"),
        (paths[11], "corrupt"),
    ]
    for p in found:  # one sentence naming the file
        assert p.message.count(". ") == 0 and p.message.endswith(".") and p.path in p.message
    assert "truncated" in found[2].message and "is missing" in found[0].message
    assert [p.kind for p in image_problems("inshop", str(tmp_path), part="query")] == ["truncated"]
    assert [p.kind for p in image_problems("inshop", str(tmp_path), part="gallery")] == ["corrupt"]
    assert [p.kind for p in image_problems("inshop", str(tmp_path), part="train")] == ["missing", "empty"]
    # a seeded sample: the same images each time, a subset of the split
    s1 = image_problems("inshop", str(tmp_path), part="train", sample=4, seed=1)
    assert s1 == image_problems("inshop", str(tmp_path), part="train", sample=4, seed=1)
    assert len(image_problems("inshop", str(tmp_path), part="train", sample=0)) == 0
    with pytest.raises(ConfigError, match="unknown split 'val'"):
        image_problems("inshop", str(tmp_path), part="val")
    # the loader names the missing file too
    with pytest.raises(DatasetError, match=f"first {paths[0]}"):
        source("inshop", tmp_path).table()


def test_image_problems_of_embedded_dataset_is_empty() -> None:
    assert image_problems("digits", None) == []
