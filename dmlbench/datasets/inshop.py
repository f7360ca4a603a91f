"""In-shop Clothes Retrieval (DeepFashion): 52,712 images of 7,982 clothing items.

Accepted layouts (in a folder named ``InShop``, ``inshop``, ``In-shop Clothes Retrieval Benchmark``,
``DeepFashion_InShop`` ... under the data root, or given as ``--data-root inshop=PATH``)::

    Eval      Eval/list_eval_partition.txt + Img/img/MEN/... Img/img/WOMEN/...
              (the benchmark folder as distributed, with Img/img.zip extracted in place)
    Eval-img  Eval/list_eval_partition.txt + img/...              (mirrors with img/ at the top)
    flat      list_eval_partition.txt + img/...                   (the two side by side)

``list_eval_partition.txt``: line 1 the number of images (52712); line 2 the header
"image_name item_id evaluation_status"; then lines such as
"img/WOMEN/Dresses/id_00000002/02_1_front.jpg id_00000002 train" (status train, query or gallery).

DML protocol: 25,882 train images of 3,997 items; the test items (3,985) are split into 14,218
query and 12,612 gallery images; each query retrieves from the gallery only (Recall@1,10,20,30,40,50).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from dmlbench.datasets._common import BenchmarkSource, Layout, Listing, malformed_line, read_text_lines
from dmlbench.datasets.base import DATASETS
from dmlbench.errors import DatasetError

INSHOP_HEADER = ["image_name", "item_id", "evaluation_status"]
STATUSES = ("train", "query", "gallery")
PARTITION = "list_eval_partition.txt"

#: layout -> (partition file, folder the listed ``img/...`` paths are relative to)
DISTRIBUTED = Layout(
    "Eval",
    (f"Eval/{PARTITION}", "Img/img"),
    f"Eval/{PARTITION} + Img/img/ (the benchmark folder as distributed, Img/img.zip extracted in place)",
)
EVAL_IMG = Layout("Eval-img", (f"Eval/{PARTITION}", "img"), f"Eval/{PARTITION} + img/")
FLAT = Layout("flat", (PARTITION, "img"), f"{PARTITION} + img/ side by side")
_FILES = {DISTRIBUTED.key: (f"Eval/{PARTITION}", "Img/"), EVAL_IMG.key: (f"Eval/{PARTITION}", ""), FLAT.key: (PARTITION, "")}


@DATASETS.register("inshop")
class InShop(BenchmarkSource):
    """In-Shop with query-vs-gallery evaluation."""

    name: ClassVar[str] = "inshop"
    recall_ks: ClassVar[tuple[int, ...]] = (1, 10, 20, 30, 40, 50)
    # k-means with thousands of clusters at every validation would cost more than the epoch;
    # the test split still gets NMI and F1 (``val_clustering=true`` turns them back on)
    preset: ClassVar[dict[str, Any]] = {"val_clustering": False}
    query_gallery: ClassVar[bool] = True
    folder: ClassVar[str] = "InShop"
    folder_names: ClassVar[tuple[str, ...]] = (
        "In-shop Clothes Retrieval Benchmark",
        "In-shop",
        "inshop_clothes",
        "DeepFashion_InShop",
        "deepfashion",
        "deepfashion_inshop",
    )
    how_to_get: ClassVar[str] = (
        "request the DeepFashion In-shop Clothes Retrieval Benchmark at "
        "https://mmlab.ie.cuhk.edu.hk/projects/DeepFashion/InShopRetrieval.html, put its folder (with "
        "Eval/list_eval_partition.txt) under the data root and extract Img/img.zip in place (Img/img/)."
    )
    layouts: ClassVar[tuple[Layout, ...]] = (DISTRIBUTED, EVAL_IMG, FLAT)
    FULL: ClassVar[dict[str, int]] = {
        "images": 52712,
        "classes": 7982,
        "train_images": 25882,
        "train_classes": 3997,
        "test_classes": 3985,
        "query_images": 14218,
        "gallery_images": 12612,
    }

    def read_listing(self, folder: Path, layout: Layout) -> Listing:
        list_file, image_prefix = _FILES[layout.key]
        path = folder / list_file
        lines = read_text_lines(path)
        if not lines or not lines[0].isdigit():
            raise malformed_line(path, 1, lines[0] if lines else "", "<number of images>")
        if len(lines) < 2 or lines[1].split() != INSHOP_HEADER:
            raise malformed_line(path, 2, lines[1] if len(lines) > 1 else "", " ".join(INSHOP_HEADER))
        declared = int(lines[0])
        rel: list[str] = []
        items: list[int] = []
        status: list[str] = []
        for n, line in enumerate(lines[2:], start=3):
            parts = line.split()
            if len(parts) != 3 or parts[2] not in STATUSES or not _is_item(parts[1]):
                raise malformed_line(path, n, line, "img/<...>.jpg id_<8 digits> train|query|gallery")
            rel.append(image_prefix + parts[0])
            items.append(int(parts[1][3:]))
            status.append(parts[2])
        if declared != len(rel):
            raise DatasetError(
                f"{path} declares {declared:,} images on its first line but lists {len(rel):,}; "
                f"re-download list_eval_partition.txt."
            )
        st = np.asarray(status)
        labels = np.asarray(items, dtype=np.int64)
        split = np.where(st == "train", "train", "test")
        shared = np.intersect1d(labels[split == "train"], labels[split == "test"])
        if shared.size:
            raise DatasetError(
                f"{path} puts item id_{shared[0]:08d} in both train and query/gallery, but the splits must be "
                f"item-disjoint; re-download list_eval_partition.txt."
            )
        return Listing(
            rel,
            labels,
            split,
            list_file=list_file,
            is_query=st == "query",
            is_gallery=st == "gallery",
            stated=[(list_file, "images", declared)],
        )

    def check_pairs(
        self,
        labels: np.ndarray,
        split: np.ndarray,
        is_query: np.ndarray | None,
        is_gallery: np.ndarray | None,
    ) -> None:
        """Every query item needs a gallery image (else it has nothing to retrieve).

        Training items with a single image are not rejected (the official list is used as
        released); ``check()`` reports how many there are as ``train_single_image_classes``.
        """
        assert is_query is not None and is_gallery is not None
        orphans = np.setdiff1d(labels[is_query], labels[is_gallery])
        if orphans.size:
            raise DatasetError(
                f"{orphans.size} query item(s) of inshop have no gallery image (first id_{orphans[0]:08d}), "
                f"but query-vs-gallery retrieval needs one; restore the gallery images of list_eval_partition.txt."
            )


def _is_item(token: str) -> bool:
    return token.startswith("id_") and token[3:].isdigit()
