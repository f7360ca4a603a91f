"""CUB200-2011 (Caltech-UCSD Birds): 11,788 images of 200 bird species.

Official layout, as ``CUB_200_2011.tgz`` unpacks (``CUB_200_2011/``; also found as ``cub200/``,
``CUB/``, powerful-benchmarker's ``cub2011/CUB_200_2011/`` ...)::

    images.txt               "<image_id> <folder>/<file>.jpg"     (1-based ids, 11,788 lines)
    image_class_labels.txt   "<image_id> <class_id>"              (class ids 1..200)
    classes.txt, train_test_split.txt, bounding_boxes.txt, ...    (not needed)
    images/<folder>/<file>.jpg

DML protocol: classes 1-100 train (5,864 images), 101-200 test (5,924 images), Recall@1,2,4,8.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np

from dmlbench.datasets._common import BenchmarkSource, Layout, Listing, malformed_line, read_text_lines
from dmlbench.datasets.base import DATASETS
from dmlbench.errors import DatasetError

#: last class id of the training half (classes 1..100 train, 101..200 test)
CUB_TRAIN_LAST_CLASS = 100


@DATASETS.register("cub200")
class CUB200(BenchmarkSource):
    """CUB200-2011 with the zero-shot split of the DML literature (first 100 classes train)."""

    name: ClassVar[str] = "cub200"
    recall_ks: ClassVar[tuple[int, ...]] = (1, 2, 4, 8)
    folder: ClassVar[str] = "CUB_200_2011"
    how_to_get: ClassVar[str] = (
        "download CUB_200_2011.tgz from https://www.vision.caltech.edu/datasets/cub_200_2011/ "
        "(data.caltech.edu/records/65de6-vp158) and extract it under the data root."
    )
    folder_names: ClassVar[tuple[str, ...]] = ("cub200", "cub", "cub2011")
    layouts: ClassVar[tuple[Layout, ...]] = (
        Layout(
            "CUB_200_2011",
            ("images.txt", "image_class_labels.txt", "images"),
            "images.txt + image_class_labels.txt + images/ (CUB_200_2011.tgz unpacked)",
        ),
    )
    FULL: ClassVar[dict[str, int]] = {
        "images": 11788,
        "classes": 200,
        "train_images": 5864,
        "train_classes": 100,
        "test_images": 5924,
        "test_classes": 100,
    }

    def read_listing(self, folder: Path, layout: Layout) -> Listing:
        images = _id_table(folder / "images.txt", "<image_id> <folder>/<file>.jpg")
        labels_txt = _id_table(folder / "image_class_labels.txt", "<image_id> <class_id>")
        if set(images) != set(labels_txt):
            only = min(set(images) ^ set(labels_txt))
            raise DatasetError(
                f"{folder}/images.txt and image_class_labels.txt disagree on the image ids (first: {only}); "
                f"re-extract the official archive."
            )
        ids = sorted(images)
        rel = [f"images/{images[i]}" for i in ids]
        labels = np.empty(len(ids), dtype=np.int64)
        for k, i in enumerate(ids):
            try:
                labels[k] = int(labels_txt[i])
            except ValueError:
                raise DatasetError(
                    f"{folder}/image_class_labels.txt gives class {labels_txt[i]!r} for image {i}, "
                    f"not an integer; re-extract the official archive."
                ) from None
        split = np.where(labels <= CUB_TRAIN_LAST_CLASS, "train", "test")
        return Listing(rel, labels, split, list_file="images.txt")


def _id_table(path: Path, expected: str) -> dict[int, str]:
    """``{id: value}`` from a file of ``"<int id> <value>"`` lines; duplicates are errors."""
    out: dict[int, str] = {}
    for n, line in enumerate(read_text_lines(path), start=1):
        parts = line.split(maxsplit=1)
        if len(parts) != 2 or not parts[0].isdigit():
            raise malformed_line(path, n, line, expected)
        key = int(parts[0])
        if key in out:
            raise DatasetError(f"{path} lists id {key} twice (line {n}); re-extract the official archive.")
        out[key] = parts[1].strip()
    return out
