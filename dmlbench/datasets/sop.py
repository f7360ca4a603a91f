"""Stanford Online Products (SOP): 120,053 images of 22,634 products (12 super-classes).

Official layout, as ``Stanford_Online_Products.zip`` unpacks (``Stanford_Online_Products/``; also
found as ``sop/``, ``online_products/`` ...)::

    Ebay_train.txt   header "image_id class_id super_class_id path", then e.g.
                     "1 1 1 bicycle_final/111085122871_0.JPG"        (59,551 images, classes 1..11,318)
    Ebay_test.txt    same format                                      (60,502 images, classes 11,319..22,634)
    bicycle_final/ cabinet_final/ ... (12 folders of images)

DML protocol: the two files are the class-disjoint train and test splits, Recall@1,10,100,1000.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from dmlbench.datasets._common import BenchmarkSource, Layout, Listing, malformed_line, read_text_lines
from dmlbench.datasets.base import DATASETS
from dmlbench.errors import DatasetError

SOP_HEADER = ["image_id", "class_id", "super_class_id", "path"]


@DATASETS.register("sop")
class StanfordOnlineProducts(BenchmarkSource):
    """SOP with its official train/test files."""

    name: ClassVar[str] = "sop"
    recall_ks: ClassVar[tuple[int, ...]] = (1, 10, 100, 1000)
    # k-means with thousands of clusters at every validation would cost more than the epoch;
    # the test split still gets NMI and F1 (``val_clustering=true`` turns them back on)
    preset: ClassVar[dict[str, Any]] = {"val_clustering": False}
    folder: ClassVar[str] = "Stanford_Online_Products"
    how_to_get: ClassVar[str] = (
        "download Stanford_Online_Products.zip from https://cvgl.stanford.edu/projects/lifted_struct/ "
        "and extract it under the data root."
    )
    folder_names: ClassVar[tuple[str, ...]] = ("sop", "online_products", "stanford_products")
    layouts: ClassVar[tuple[Layout, ...]] = (
        Layout(
            "Ebay",
            ("Ebay_train.txt", "Ebay_test.txt"),
            "Ebay_train.txt + Ebay_test.txt + the 12 <super class>_final/ folders (Stanford_Online_Products.zip unpacked)",
        ),
    )
    FULL: ClassVar[dict[str, int]] = {
        "images": 120053,
        "classes": 22634,
        "train_images": 59551,
        "train_classes": 11318,
        "test_images": 60502,
        "test_classes": 11316,
    }

    def read_listing(self, folder: Path, layout: Layout) -> Listing:
        rel: list[str] = []
        labels: list[int] = []
        split: list[str] = []
        stated: list[tuple[str, str, int]] = []
        for fname, part in (("Ebay_train.txt", "train"), ("Ebay_test.txt", "test")):
            paths, classes = read_ebay_file(folder / fname)
            rel += paths
            labels += classes
            split += [part] * len(paths)
            stated.append((fname, f"{part}_images", len(paths)))
        lab = np.asarray(labels, dtype=np.int64)
        spl = np.asarray(split)
        shared = np.intersect1d(lab[spl == "train"], lab[spl == "test"])
        if shared.size:
            raise DatasetError(
                f"{folder}/Ebay_train.txt and Ebay_test.txt share {shared.size} class id(s) (first {shared[0]}), "
                f"but the splits must be class-disjoint; re-extract the official archive."
            )
        return Listing(rel, lab, spl, list_file="Ebay_train.txt + Ebay_test.txt", stated=stated)


def read_ebay_file(path: Path) -> tuple[list[str], list[int]]:
    """Paths and class ids of one ``Ebay_*.txt`` file (header checked)."""
    lines = read_text_lines(path)
    if not lines or lines[0].split() != SOP_HEADER:
        got = lines[0] if lines else ""
        raise malformed_line(path, 1, got, " ".join(SOP_HEADER))
    paths: list[str] = []
    classes: list[int] = []
    for n, line in enumerate(lines[1:], start=2):
        parts = line.split()
        if len(parts) != 4 or not all(p.isdigit() for p in parts[:3]):
            raise malformed_line(path, n, line, "<image_id> <class_id> <super_class_id> <folder>/<file>.JPG")
        classes.append(int(parts[1]))
        paths.append(parts[3])
    return paths, classes
