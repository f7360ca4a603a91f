"""The dataset interface every dataset implements (embedded ones and the four benchmarks).

A :class:`DatasetSource` describes where a dataset lives and turns it into a :class:`SampleTable`:
one row per image with its class id, its official split (``train``/``test``, class-disjoint) and,
for query/gallery datasets (In-Shop), which test images are queries and which are gallery.
Images are read by ``SampleTable.load(i)`` as HWC uint8 RGB arrays.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np

from dmlbench.registry import Registry

Status = Literal["found", "missing", "malformed"]


@dataclass(frozen=True)
class SampleTable:
    """All images of a dataset.

    Attributes:
        labels: int64 class id per image (the dataset's own ids).
        split: "train" or "test" per image; train and test classes are disjoint.
        load: ``i -> HWC uint8 RGB array`` of image ``i``.
        is_query / is_gallery: for query/gallery evaluation (In-Shop), bool per image (test rows).
        paths: file path per image when read from disk (for error messages and caches).
    """

    labels: np.ndarray
    split: np.ndarray
    load: Callable[[int], np.ndarray]
    is_query: np.ndarray | None = None
    is_gallery: np.ndarray | None = None
    paths: list[str] | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def classes(self, split: str) -> np.ndarray:
        return np.unique(self.labels[self.split == split])


@dataclass
class DatasetCheck:
    """Result of checking a dataset on disk (``dmlbench datasets check``)."""

    name: str
    status: Status
    message: str = ""
    counts: dict[str, int] = field(default_factory=dict)
    split_hash: str | None = None
    #: the dataset folder found and the layout it was read in (``found`` only)
    path: str | None = None
    layout: str | None = None

    @property
    def usable(self) -> bool:
        return self.status == "found"


class DatasetSource(ABC):
    """A registered dataset. Subclasses set the class attributes and implement ``table``/``check``."""

    name: ClassVar[str] = ""
    #: conventional Recall@k list of this dataset
    recall_ks: ClassVar[tuple[int, ...]] = (1, 2, 4, 8)
    #: bundled with the package (no download, no data root)
    embedded: ClassVar[bool] = False
    #: query/gallery evaluation instead of self-retrieval on the test split
    query_gallery: ClassVar[bool] = False
    #: folder name under the data root, and where to get the data (docs/datasets.md)
    folder: ClassVar[str] = ""
    how_to_get: ClassVar[str] = ""
    #: other folder names the dataset is found under (case and punctuation are ignored)
    folder_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, root: str | None = None, **options: Any):
        self.root = root
        self.options = options

    @abstractmethod
    def table(self) -> SampleTable:
        """Read the dataset; raises :class:`dmlbench.errors.DatasetError` if it is unusable."""

    @abstractmethod
    def check(self) -> DatasetCheck:
        """Check presence and layout without raising."""


DATASETS: Registry[type[DatasetSource]] = Registry("dataset")
