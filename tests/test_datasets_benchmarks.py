"""The four benchmark loaders on tiny trees that mirror the official layouts, their checks, and the CLI."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from typer.testing import CliRunner

from dmlbench.cli import app
from dmlbench.datasets import DATASETS
from dmlbench.datasets._common import BenchmarkSource, split_hash
from dmlbench.datasets.checks import BENCHMARKS, check_datasets, expand_names, require_usable
from dmlbench.errors import ConfigError, DatasetError, UnknownNameError
from tests.fixtures.benchmark_trees import colour_of, make_cars, make_cub, make_inshop, make_sop

BUILDERS: dict[str, Callable[[Path], Path]] = {
    "cub200": make_cub,
    "cars196": make_cars,
    "sop": make_sop,
    "inshop": make_inshop,
}


def source(name: str, root: Path | str | None, **options: bool) -> BenchmarkSource:
    cls = DATASETS.get(name)
    assert issubclass(cls, BenchmarkSource)
    return cls(None if root is None else str(root), **{"expect_full": False, **options})


@pytest.fixture(autouse=True)
def _no_env_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DMLBENCH_DATA", raising=False)


# ---- registry and metadata ------------------------------------------------------------------


def test_registered_with_protocol_metadata() -> None:
    expected = {
        "cub200": ((1, 2, 4, 8), "CUB_200_2011", False),
        "cars196": ((1, 2, 4, 8), "CARS196", False),
        "sop": ((1, 10, 100, 1000), "Stanford_Online_Products", False),
        "inshop": ((1, 10, 20, 30, 40, 50), "InShop", True),
    }
    for name, (ks, folder, qg) in expected.items():
        cls = DATASETS.get(name)
        assert (cls.recall_ks, cls.folder, cls.query_gallery, cls.embedded) == (ks, folder, qg, False)
        assert "http" in cls.how_to_get or "mirror" in cls.how_to_get
    assert expand_names(None) == list(BENCHMARKS) == expand_names(["all"])
    with pytest.raises(UnknownNameError, match="valid datasets:.*cub200"):
        expand_names(["cub"])


def test_full_size_counts_are_consistent() -> None:
    """The asserted full-size counts add up (train + test = total) as the papers state them."""
    for name in BENCHMARKS:
        full = DATASETS.get(name).FULL
        assert full["train_classes"] + full["test_classes"] == full["classes"]
        test_images = full.get("test_images", full.get("query_images", 0) + full.get("gallery_images", 0))
        assert full["train_images"] + test_images == full["images"]
    assert DATASETS.get("cub200").FULL["images"] == 11788
    assert DATASETS.get("cars196").FULL["images"] == 16185
    assert (DATASETS.get("sop").FULL["images"], DATASETS.get("sop").FULL["classes"]) == (120053, 22634)
    assert (DATASETS.get("inshop").FULL["images"], DATASETS.get("inshop").FULL["classes"]) == (52712, 7982)


# ---- reading the tiny trees -----------------------------------------------------------------


def test_cub_reads_official_layout_and_split(tmp_path: Path) -> None:
    make_cub(tmp_path, n_classes=4, per_class=3)  # classes 99, 100 | 101, 102
    t = source("cub200", tmp_path).table()
    assert t.labels.tolist() == [99] * 3 + [100] * 3 + [101] * 3 + [102] * 3
    assert t.split.tolist() == ["train"] * 6 + ["test"] * 6
    assert t.paths is not None and t.paths[0].endswith("CUB_200_2011/images/099.Bird_99/Bird_99_0000_1.jpg")
    assert t.is_query is None and t.is_gallery is None


def test_cub_follows_image_ids_not_line_order(tmp_path: Path) -> None:
    folder = make_cub(tmp_path, n_classes=4, per_class=3)
    # the label file in reverse order: ids, not positions, pair images with labels
    lines = (folder / "image_class_labels.txt").read_text().splitlines()
    (folder / "image_class_labels.txt").write_text("\n".join(reversed(lines)) + "\n")
    t = source("cub200", tmp_path).table()
    assert t.labels.tolist() == [99] * 3 + [100] * 3 + [101] * 3 + [102] * 3


def test_cars_reads_mat_annotations(tmp_path: Path) -> None:
    folder = make_cars(tmp_path, n_classes=4, per_class=2)  # classes 97, 98 | 99, 100
    mat = scipy.io.loadmat(str(folder / "cars_annos.mat"))
    assert mat["annotations"].shape == (1, 8)  # a 1×N struct array, as in the release
    t = source("cars196", tmp_path).table()
    assert t.labels.tolist() == [97, 97, 98, 98, 99, 99, 100, 100]
    assert t.split.tolist() == ["train"] * 4 + ["test"] * 4
    assert t.paths is not None and t.paths[4].endswith("CARS196/car_ims/000005.jpg")


def test_sop_reads_both_files(tmp_path: Path) -> None:
    make_sop(tmp_path, n_classes=4, per_class=2)
    t = source("sop", tmp_path).table()
    assert t.labels.tolist() == [1, 1, 2, 2, 3, 3, 4, 4]
    assert t.split.tolist() == ["train"] * 4 + ["test"] * 4
    assert t.paths is not None and t.paths[2].endswith("Stanford_Online_Products/cabinet_final/100002_0.JPG")


def test_inshop_query_gallery(tmp_path: Path) -> None:
    make_inshop(tmp_path, n_train=2, n_test=2, per_item=3)
    t = source("inshop", tmp_path).table()
    assert t.labels.tolist() == [1] * 3 + [2] * 3 + [3] * 3 + [4] * 3
    assert t.split.tolist() == ["train"] * 6 + ["test"] * 6
    assert t.is_query is not None and t.is_gallery is not None
    assert np.flatnonzero(t.is_query).tolist() == [6, 9]
    assert np.flatnonzero(t.is_gallery).tolist() == [7, 8, 10, 11]


@pytest.mark.parametrize("name", BENCHMARKS)
def test_load_decodes_rgb_pixels(name: str, tmp_path: Path) -> None:
    BUILDERS[name](tmp_path)
    t = source(name, tmp_path).table()
    for i in (0, len(t) - 1):
        img = t.load(i)
        assert img.dtype == np.uint8 and img.shape == (14, 20, 3)
        # the fixture writes image k (1-based, in list order) as a flat colour; JPEG is near-lossless on flat colour
        assert np.abs(img.astype(int) - np.array(colour_of(i + 1))).max() <= 3


def test_root_from_env_or_dataset_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = make_sop(tmp_path)
    monkeypatch.setenv("DMLBENCH_DATA", str(tmp_path))
    assert len(source("sop", None).table()) == 32
    monkeypatch.delenv("DMLBENCH_DATA")
    assert len(source("sop", folder).table()) == 32  # --data-root may point at the dataset folder itself


def test_greyscale_image_becomes_rgb(tmp_path: Path) -> None:
    from PIL import Image

    make_cub(tmp_path, n_classes=4, per_class=3)
    t0 = source("cub200", tmp_path).table()
    assert t0.paths is not None
    Image.new("L", (9, 7), 200).save(t0.paths[0], format="JPEG")
    img = source("cub200", tmp_path).table().load(0)
    assert img.shape == (7, 9, 3) and np.abs(img.astype(int) - 200).max() <= 2


# ---- full-size counts -----------------------------------------------------------------------


def test_full_counts_asserted_naming_file_and_count(tmp_path: Path) -> None:
    make_cub(tmp_path)
    with pytest.raises(
        DatasetError, match=r"CUB_200_2011/images.txt gives 48 images but the full cub200 has 11,788"
    ):
        DATASETS.get("cub200")(str(tmp_path)).table()
    make_inshop(tmp_path)
    with pytest.raises(DatasetError, match=r"InShop/list_eval_partition.txt gives 33 images .* 52,712"):
        DATASETS.get("inshop")(str(tmp_path)).table()


def test_full_counts_pass_when_they_match(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the expected counts set to the tree's true sizes, expect_full accepts it (the check is not a blanket refusal)."""
    make_sop(tmp_path, n_classes=16, per_class=2)
    cls = DATASETS.get("sop")
    full = {
        "images": 32,
        "classes": 16,
        "train_images": 16,
        "train_classes": 8,
        "test_images": 16,
        "test_classes": 8,
    }
    monkeypatch.setattr(cls, "FULL", full)
    assert len(cls(str(tmp_path)).table()) == 32
    monkeypatch.setattr(cls, "FULL", {**full, "test_classes": 9})
    with pytest.raises(DatasetError, match="gives 8 test classes but the full sop has 9"):
        cls(str(tmp_path)).table()


# ---- bad input ------------------------------------------------------------------------------


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(
        DatasetError, match=r"no data root for cub200: pass --data-root or set \$DMLBENCH_DATA"
    ):
        source("cub200", None).table()
    with pytest.raises(DatasetError, match="the data root .*nope does not exist"):
        source("cub200", tmp_path / "nope").table()
    check = source("cars196", tmp_path).check()
    assert check.status == "missing" and "cars196 not found under" in check.message and "CARS196" in check.message
    assert "cars_annos.mat + car_ims/" in check.message  # names the layouts it accepts


@pytest.mark.parametrize(
    ("name", "list_file"),
    [
        ("cub200", "image_class_labels.txt"),
        ("cars196", "cars_annos.mat"),
        ("sop", "Ebay_test.txt"),
        ("inshop", "list_eval_partition.txt"),
    ],
)
def test_missing_list_file(name: str, list_file: str, tmp_path: Path) -> None:
    folder = BUILDERS[name](tmp_path)
    (folder / list_file).unlink()
    check = source(name, tmp_path).check()
    assert check.status == "missing"
    # In-Shop's img/ fits two layouts; the first (the partition file under Eval/) is named
    expected = folder / ("Eval/" if name == "inshop" else "") / list_file
    assert f"{name} is incomplete: the list file {expected} is missing" in check.message


@pytest.mark.parametrize("name", BENCHMARKS)
def test_list_names_image_not_on_disk(name: str, tmp_path: Path) -> None:
    BUILDERS[name](tmp_path)
    victim = source(name, tmp_path).table().paths[5]  # type: ignore[index]
    os.remove(victim)
    check = source(name, tmp_path).check()
    assert check.status == "malformed"
    assert "names 1 image(s) that are not on disk" in check.message and victim in check.message


def test_corrupt_jpeg_named_then_skipped(tmp_path: Path) -> None:
    make_cub(tmp_path)
    paths = source("cub200", tmp_path).table().paths
    assert paths is not None
    Path(paths[4]).write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    # default: presence checks pass, decoding that file fails naming it
    t = source("cub200", tmp_path).table()
    with pytest.raises(DatasetError, match=f"cannot decode image {paths[4]} of cub200"):
        t.load(4)
    with pytest.raises(DatasetError, match=f"1 image\\(s\\) of cub200 cannot be decoded, first {paths[4]}"):
        source("cub200", tmp_path, verify_images=True).table()
    src = source("cub200", tmp_path, skip_corrupt=True)
    t2 = src.table()
    assert len(t2) == 47 and src.skipped == [paths[4]] and paths[4] not in (t2.paths or [])
    check = source("cub200", tmp_path, skip_corrupt=True).check()
    assert check.status == "found" and check.counts["corrupt_skipped"] == 1 and check.counts["images"] == 47


def test_empty_image_file(tmp_path: Path) -> None:
    make_sop(tmp_path, per_class=3)
    paths = source("sop", tmp_path).table().paths
    assert paths is not None
    Path(paths[0]).write_bytes(b"")
    with pytest.raises(DatasetError, match=f"1 image file\\(s\\) of sop are empty, first {paths[0]}"):
        source("sop", tmp_path).table()
    assert len(source("sop", tmp_path, skip_corrupt=True).table()) == 47
    # with two images per class, skipping one leaves a single-image class: refused, not silently kept
    make_sop(tmp_path / "two", per_class=2)
    first = source("sop", tmp_path / "two").table().paths[0]  # type: ignore[index]
    Path(first).write_bytes(b"")
    with pytest.raises(DatasetError, match="single image"):
        source("sop", tmp_path / "two", skip_corrupt=True).table()


def test_single_image_class_rejected(tmp_path: Path) -> None:
    folder = make_sop(tmp_path, n_classes=4, per_class=2)
    lines = (folder / "Ebay_test.txt").read_text().splitlines()
    (folder / "Ebay_test.txt").write_text("\n".join(lines[:-1]) + "\n")  # class 4 keeps one image
    with pytest.raises(DatasetError, match=r"1 class\(es\) of sop have a single image \(first class id 4\)"):
        source("sop", tmp_path).table()


def test_inshop_query_without_gallery(tmp_path: Path) -> None:
    folder = make_inshop(tmp_path, n_train=2, n_test=2, per_item=3)
    text = (
        (folder / "list_eval_partition.txt")
        .read_text()
        .replace(
            "id_00000004/02_1_front.jpg id_00000004 gallery", "id_00000004/02_1_front.jpg id_00000004 query"
        )
        .replace(
            "id_00000004/03_1_front.jpg id_00000004 gallery", "id_00000004/03_1_front.jpg id_00000004 query"
        )
    )
    (folder / "list_eval_partition.txt").write_text(text)
    with pytest.raises(
        DatasetError, match="1 query item\\(s\\) of inshop have no gallery image \\(first id_00000004\\)"
    ):
        source("inshop", tmp_path).table()


def test_inshop_declared_count_and_header(tmp_path: Path) -> None:
    folder = make_inshop(tmp_path)
    path = folder / "list_eval_partition.txt"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(["34"] + lines[1:]) + "\n")
    with pytest.raises(DatasetError, match="declares 34 images on its first line but lists 33"):
        source("inshop", tmp_path).table()
    path.write_text("\n".join(lines[:1] + ["image item status"] + lines[2:]) + "\n")
    with pytest.raises(
        DatasetError,
        match="line 2 is 'image item status' but should be 'image_name item_id evaluation_status'",
    ):
        source("inshop", tmp_path).table()


def test_sop_bad_header_and_line(tmp_path: Path) -> None:
    folder = make_sop(tmp_path)
    path = folder / "Ebay_train.txt"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[1:]) + "\n")
    with pytest.raises(
        DatasetError, match="Ebay_train.txt line 1 .* should be 'image_id class_id super_class_id path'"
    ):
        source("sop", tmp_path).table()
    path.write_text("\n".join(lines[:3] + ["7 x 1 bicycle_final/a.JPG"] + lines[3:]) + "\n")
    with pytest.raises(DatasetError, match="Ebay_train.txt line 4 is '7 x 1 bicycle_final/a.JPG'"):
        source("sop", tmp_path).table()


def test_cub_id_mismatch(tmp_path: Path) -> None:
    folder = make_cub(tmp_path)
    lines = (folder / "image_class_labels.txt").read_text().splitlines()
    (folder / "image_class_labels.txt").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(
        DatasetError, match="images.txt and image_class_labels.txt disagree on the image ids \\(first: 48\\)"
    ):
        source("cub200", tmp_path).table()


def test_cars_mat_without_class_field(tmp_path: Path) -> None:
    folder = make_cars(tmp_path)
    ann = np.zeros((1, 1), dtype=[("relative_im_path", "O")])
    ann[0, 0]["relative_im_path"] = np.array(["car_ims/000001.jpg"])
    scipy.io.savemat(str(folder / "cars_annos.mat"), {"annotations": ann})
    with pytest.raises(
        DatasetError,
        match="has no 'annotations' struct with fields relative_im_path, class \\(missing class\\)",
    ):
        source("cars196", tmp_path).table()
    (folder / "cars_annos.mat").write_bytes(b"garbage")
    with pytest.raises(DatasetError, match="cannot read .*cars_annos.mat"):
        source("cars196", tmp_path).table()


def test_unknown_or_bad_option() -> None:
    with pytest.raises(
        ConfigError,
        match="unknown option 'skip_corupt' for dataset cub200 \\(did you mean skip_corrupt\\?\\)",
    ):
        DATASETS.get("cub200")(None, skip_corupt=True)
    with pytest.raises(ConfigError, match="must be true or false"):
        DATASETS.get("sop")(None, expect_full="no")


# ---- check, split hash, CLI -----------------------------------------------------------------


def test_split_hash_fallback_matches_independent_computation() -> None:
    labels = np.array([5, 1, 1, 5, 9])
    split = np.array(["test", "train", "train", "test", "test"])
    text = "1\ttrain\n5\ttest\n9\ttest"
    assert split_hash(labels, split) == hashlib.sha256(text.encode()).hexdigest()[:16]
    assert split_hash(labels[::-1], split[::-1]) == split_hash(labels, split)  # order-free


def test_check_reports_counts_and_manifest_hash(tmp_path: Path) -> None:
    from dmlbench.datasets.splits import make_manifest

    for build in BUILDERS.values():
        build(tmp_path)
    checks = check_datasets(["all"], str(tmp_path), expect_full=False)
    assert [c.name for c in checks] == list(BENCHMARKS)
    assert all(c.status == "found" for c in checks), [c.message for c in checks]
    by = {c.name: c for c in checks}
    assert by["cub200"].counts == {
        "images": 48,
        "classes": 16,
        "train_images": 24,
        "train_classes": 8,
        "test_images": 24,
        "test_classes": 8,
    }
    assert by["inshop"].counts["query_images"] == 3 and by["inshop"].counts["gallery_images"] == 6
    table = source("cub200", tmp_path).table()
    assert by["cub200"].split_hash == make_manifest(table, "cub200", num_folds=4, split_seed=0).hash
    with pytest.raises(DatasetError, match=r"the data root .*empty does not exist; pass --data-root"):
        require_usable(["sop"], str(tmp_path / "empty"))


runner = CliRunner()
#: the real data root, read before the autouse fixture clears $DMLBENCH_DATA for the tiny-tree tests
REAL_DATA = os.environ.get("DMLBENCH_DATA")


def test_cli_check_found_and_unusable(tmp_path: Path) -> None:
    make_cub(tmp_path)
    make_sop(tmp_path)
    ok = runner.invoke(app, ["datasets", "check", "cub200,sop", "--data-root", str(tmp_path), "--subset"])
    assert ok.exit_code == 0, ok.output
    assert "found" in ok.output and "48" in ok.output
    full = runner.invoke(app, ["datasets", "check", "cub200", "--data-root", str(tmp_path)])
    assert full.exit_code == 2 and "malformed" in full.output
    missing = runner.invoke(app, ["datasets", "check", "all", "--data-root", str(tmp_path), "--subset"])
    assert missing.exit_code == 2 and "missing" in missing.output
    unknown = runner.invoke(app, ["datasets", "check", "cub", "--data-root", str(tmp_path)])
    assert unknown.exit_code == 2 and "unknown dataset 'cub'" in unknown.output
    assert runner.invoke(app, ["datasets", "check", "--help"]).exit_code == 0


# ---- the real data (only where it is) -------------------------------------------------------


@pytest.mark.data
@pytest.mark.parametrize("name", BENCHMARKS)
def test_real_dataset_full_counts(name: str) -> None:
    root = REAL_DATA
    cls = DATASETS.get(name)
    try:
        cls(root).locate()
    except DatasetError:
        pytest.skip(f"{name} not under $DMLBENCH_DATA")
    check = cls(root).check()
    assert check.status == "found", check.message
    for key, value in cls.FULL.items():
        assert check.counts[key] == value
