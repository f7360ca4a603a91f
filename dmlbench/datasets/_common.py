"""Shared machinery of the four on-disk benchmarks (CUB200-2011, CARS196, SOP, In-Shop).

Each benchmark module only knows how to read its official list files into a :class:`Listing`
(relative image paths, class ids, official split, query/gallery flags). Everything else lives
here, once:

* the data root (``root`` argument, else ``$DMLBENCH_DATA``) and the dataset folder under it;
* the checks every user needs before a long sweep: list files present, every listed image on
  disk and non-empty, full-size counts (when ``expect_full``), classes with a single image where
  the protocol needs pairs, and (``verify_images`` / ``skip_corrupt``) a full decode of every image;
* turning a listing into a :class:`~dmlbench.datasets.base.SampleTable` whose ``load(i)``
  decodes with PIL and converts to RGB;
* ``check()``: the same reading, reported as found / missing / malformed instead of raised.

Options (``DatasetSource(root, **options)``, i.e. ``TrialConfig.dataset_kwargs``):

* ``expect_full`` (default ``True``): the list files must describe the complete official
  dataset (11,788 CUB images, ...); a mismatch names the file and the count. Set it to ``False``
  for a deliberate subset (the tests' tiny trees).
* ``skip_corrupt`` (default ``False``): decode every image once, drop and count the ones that
  cannot be decoded instead of failing on the first.
* ``verify_images`` (default ``False``): decode every image once and fail naming the first
  corrupt one (implied by ``skip_corrupt``). Without it, only presence and non-zero size are
  checked up front and a corrupt file fails when it is first decoded, naming the file.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from dmlbench.datasets.base import DatasetCheck, DatasetSource, SampleTable
from dmlbench.errors import ConfigError, DatasetError, close_matches

DATA_ENV = "DMLBENCH_DATA"

#: options every benchmark accepts, with their defaults
DEFAULT_OPTIONS: dict[str, bool] = {"expect_full": True, "skip_corrupt": False, "verify_images": False}


class DatasetMissing(DatasetError):
    """The data root, the dataset folder or one of its list files is absent (status ``missing``)."""


@dataclass
class Listing:
    """What a benchmark's list files say, before any file on disk is looked at.

    Attributes:
        rel_paths: image paths relative to the dataset folder.
        labels: the dataset's own class id per image.
        split: "train" or "test" per image.
        list_file: the list file named in count errors (relative to the data root).
        is_query / is_gallery: query/gallery flags (In-Shop), False on train rows.
    """

    rel_paths: list[str]
    labels: np.ndarray
    split: np.ndarray
    list_file: str
    is_query: np.ndarray | None = None
    is_gallery: np.ndarray | None = None
    #: ``(file, what, got)`` facts the list files state about themselves, checked against ``FULL``
    stated: list[tuple[str, str, int]] = field(default_factory=list)


def resolve_root(root: str | os.PathLike[str] | None) -> Path | None:
    """The data root: ``root`` if given, else ``$DMLBENCH_DATA``, else ``None``."""
    if root is not None and str(root) != "":
        return Path(root).expanduser()
    env = os.environ.get(DATA_ENV, "")
    return Path(env).expanduser() if env else None


def split_hash(labels: np.ndarray, split: np.ndarray) -> str:
    """sha256 (16 hex digits) of the sorted distinct ``(class id, split)`` pairs.

    Identifies the official class split of a dataset independently of image order. This is the
    fallback used until ``dmlbench.datasets.splits`` provides the fold-manifest hash.

    Example:
        Classes 1 (train, two images) and 2 (test) hash the text ``"1\ttrain\n2\ttest"``:

        >>> split_hash(np.array([2, 1, 1]), np.array(["test", "train", "train"]))
        'c3b1b5210031a0cc'
    """
    pairs = sorted({(int(c), str(s)) for c, s in zip(labels.tolist(), split.tolist(), strict=True)})
    text = "\n".join(f"{c}\t{s}" for c, s in pairs)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def decode_rgb(path: str | os.PathLike[str]) -> np.ndarray:
    """Decode an image file to an HWC uint8 RGB array (PIL; greyscale/CMYK/alpha converted)."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


class ImageFileLoader:
    """``i -> HWC uint8 RGB`` for a list of files; picklable, so it crosses into DataLoader workers."""

    def __init__(self, paths: Sequence[str], dataset: str):
        self.paths = list(paths)
        self.dataset = dataset

    def __call__(self, i: int) -> np.ndarray:
        path = self.paths[i]
        try:
            return decode_rgb(path)
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            raise DatasetError(
                f"cannot decode image {path} of {self.dataset} ({err}); replace the file from the "
                f"original archive, or pass skip_corrupt=True (--skip-corrupt) to count and skip it."
            ) from None


def find_corrupt(paths: Sequence[str], workers: int | None = None) -> list[int]:
    """Indices of the files in ``paths`` that PIL cannot fully decode (threads; PIL drops the GIL)."""

    def bad(path: str) -> bool:
        try:
            with Image.open(path) as im:
                im.load()
            return False
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            return True

    n = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=n) as pool:
        flags = list(pool.map(bad, paths, chunksize=64))
    return [i for i, f in enumerate(flags) if f]


def single_image_classes(labels: np.ndarray, mask: np.ndarray | None = None) -> list[int]:
    """Class ids with exactly one image (among ``mask`` rows when given), sorted."""
    sel = labels if mask is None else labels[mask]
    ids, counts = np.unique(sel, return_counts=True)
    return [int(c) for c in ids[counts == 1]]


def _fmt(n: int) -> str:
    return f"{n:,}"


class BenchmarkSource(DatasetSource):
    """A benchmark read from its official list files under ``<data root>/<folder>``.

    Subclasses set ``name``, ``folder``, ``how_to_get``, ``recall_ks``, ``list_files`` (checked for
    presence first), ``FULL`` (the full-size counts, asserted when ``expect_full``) and implement
    :meth:`read_listing`.
    """

    #: files (relative to the dataset folder) that must exist before anything is read
    list_files: ClassVar[tuple[str, ...]] = ()
    #: full-size counts: keys among images, classes, train_images, train_classes, test_images,
    #: test_classes, query_images, gallery_images
    FULL: ClassVar[dict[str, int]] = {}

    def __init__(self, root: str | None = None, **options: Any):
        unknown = sorted(set(options) - set(DEFAULT_OPTIONS))
        if unknown:
            key = unknown[0]
            hint = close_matches(key, sorted(DEFAULT_OPTIONS))
            did = f" (did you mean {', '.join(hint)}?)" if hint else ""
            raise ConfigError(
                f"unknown option {key!r} for dataset {self.name}{did}; valid options: "
                f"{', '.join(sorted(DEFAULT_OPTIONS))}."
            )
        for key, value in options.items():
            if not isinstance(value, bool):
                raise ConfigError(
                    f"dataset option {key!r} of {self.name} must be true or false, got {value!r}."
                )
        super().__init__(root, **{**DEFAULT_OPTIONS, **options})
        self._table: SampleTable | None = None
        #: absolute paths of the images dropped by ``skip_corrupt`` in the last ``table()``
        self.skipped: list[str] = []

    # ---- subclass hook ----------------------------------------------------------------------
    def read_listing(self, folder: Path) -> Listing:
        """Parse the official list files in ``folder``; raise :class:`DatasetError` if malformed."""
        raise NotImplementedError

    # ---- locating ---------------------------------------------------------------------------
    def dataset_dir(self) -> Path:
        """``<root>/<folder>`` (or the root itself when it already is that folder); raises if absent."""
        root = resolve_root(self.root)
        if root is None:
            raise DatasetMissing(
                f"no data root for {self.name}: pass --data-root or set ${DATA_ENV} to the folder that "
                f"contains {self.folder}/ (see docs/datasets.md)."
            )
        if not root.is_dir():
            raise DatasetMissing(
                f"the data root {root} does not exist; pass --data-root or set ${DATA_ENV} to the folder "
                f"that contains {self.folder}/."
            )
        if (root / self.folder).is_dir():
            candidate = root / self.folder
        elif root.name == self.folder:  # --data-root points at the dataset folder itself
            candidate = root
        else:
            raise DatasetMissing(
                f"{self.name} not found: expected the folder {root / self.folder}; {self.how_to_get}"
            )
        for f in self.list_files:
            if not (candidate / f).is_file():
                raise DatasetMissing(
                    f"{self.name} is incomplete: the list file {candidate / f} is missing; {self.how_to_get}"
                )
        return candidate

    # ---- reading ----------------------------------------------------------------------------
    def table(self) -> SampleTable:
        if self._table is None:
            self._table = self._build_table()
        return self._table

    def _build_table(self) -> SampleTable:
        folder = self.dataset_dir()
        listing = self.read_listing(folder)
        if len(listing.rel_paths) == 0:
            raise DatasetError(
                f"{self.folder}/{listing.list_file} lists no images; re-extract the official archive."
            )
        if self.options["expect_full"]:
            self._check_full_counts(listing)
        paths = [str(folder / p) for p in listing.rel_paths]
        self._check_files_present(paths, listing)
        keep = np.ones(len(paths), dtype=bool)
        self.skipped = []
        if self.options["skip_corrupt"] or self.options["verify_images"]:
            bad = find_corrupt(paths)
            if bad and not self.options["skip_corrupt"]:
                raise DatasetError(
                    f"{len(bad)} image(s) of {self.name} cannot be decoded, first {paths[bad[0]]}; replace "
                    f"them from the original archive, or pass skip_corrupt=True (--skip-corrupt) to skip them."
                )
            keep[bad] = False
            self.skipped = [paths[i] for i in bad]
        labels = listing.labels[keep]
        split = listing.split[keep]
        is_query = listing.is_query[keep] if listing.is_query is not None else None
        is_gallery = listing.is_gallery[keep] if listing.is_gallery is not None else None
        kept_paths = [p for p, k in zip(paths, keep.tolist(), strict=True) if k]
        self.check_pairs(labels, split, is_query, is_gallery)
        return SampleTable(
            labels=labels.astype(np.int64),
            split=split,
            load=ImageFileLoader(kept_paths, self.name),
            is_query=is_query,
            is_gallery=is_gallery,
            paths=kept_paths,
        )

    def _check_full_counts(self, listing: Listing) -> None:
        counts = listing_counts(listing.labels, listing.split, listing.is_query, listing.is_gallery)
        facts = [(listing.list_file, k, counts[k]) for k in self.FULL if k in counts] + listing.stated
        for file, what, got in facts:
            expected = self.FULL.get(what)
            if expected is not None and got != expected:
                raise DatasetError(
                    f"{self.folder}/{file} gives {_fmt(got)} {what.replace('_', ' ')} but the full {self.name} "
                    f"has {_fmt(expected)}; re-extract the official archive, or pass expect_full=False (--subset) to use a subset."
                )

    def _check_files_present(self, paths: list[str], listing: Listing) -> None:
        missing: list[str] = []
        empty: list[str] = []
        for p in paths:
            try:
                if os.stat(p).st_size == 0:
                    empty.append(p)
            except OSError:
                missing.append(p)
        if missing:
            raise DatasetError(
                f"{self.folder}/{listing.list_file} names {_fmt(len(missing))} image(s) that are not on disk, "
                f"first {missing[0]}; re-extract the official archive into {Path(paths[0]).parents[0]}."
            )
        if empty and not self.options["skip_corrupt"]:
            raise DatasetError(
                f"{_fmt(len(empty))} image file(s) of {self.name} are empty, first {empty[0]}; replace them from "
                f"the original archive, or pass skip_corrupt=True (--skip-corrupt) to skip them."
            )

    def check_pairs(
        self,
        labels: np.ndarray,
        split: np.ndarray,
        is_query: np.ndarray | None,
        is_gallery: np.ndarray | None,
    ) -> None:
        """Every class must have at least two images (positive pairs for training and retrieval)."""
        singles = single_image_classes(labels)
        if singles:
            raise DatasetError(
                f"{len(singles)} class(es) of {self.name} have a single image (first class id {singles[0]}), "
                f"but training and retrieval need at least two images per class; restore the missing images."
            )

    # ---- checking ---------------------------------------------------------------------------
    def check(self) -> DatasetCheck:
        try:
            table = self.table()
        except DatasetMissing as err:
            return DatasetCheck(self.name, "missing", str(err))
        except DatasetError as err:
            return DatasetCheck(self.name, "malformed", str(err))
        counts = listing_counts(table.labels, table.split, table.is_query, table.is_gallery)
        if self.query_gallery:
            counts["train_single_image_classes"] = len(
                single_image_classes(table.labels, table.split == "train")
            )
        if self.options["skip_corrupt"]:
            counts["corrupt_skipped"] = len(self.skipped)
        msg = f"{_fmt(len(table))} images, {_fmt(counts['classes'])} classes"
        if self.skipped:
            msg += f", {len(self.skipped)} corrupt skipped"
        if not self.options["expect_full"]:
            msg += " (full-size counts not asserted)"
        try:
            hash_ = protocol_split_hash(table, self.name)
        except DatasetError as err:
            return DatasetCheck(self.name, "malformed", str(err), counts=counts)
        return DatasetCheck(self.name, "found", msg, counts=counts, split_hash=hash_)


#: fold settings of the split hash shown by ``check()`` (TrialConfig's defaults)
CHECK_NUM_FOLDS = 4
CHECK_SPLIT_SEED = 0


def protocol_split_hash(
    table: SampleTable, dataset: str, num_folds: int = CHECK_NUM_FOLDS, split_seed: int = CHECK_SPLIT_SEED
) -> str:
    """Hash of the split manifest a sweep with these fold settings uses (``dmlbench.datasets.splits``).

    Falls back to :func:`split_hash` (official class split only) while ``splits`` is not available;
    raises :class:`DatasetError` when the training classes are too few for the folds.
    """
    try:
        from dmlbench.datasets.splits import make_manifest
    except ImportError:  # pragma: no cover - the splits module is part of the package
        return split_hash(table.labels, table.split)
    return make_manifest(table, dataset, num_folds=num_folds, split_seed=split_seed).hash


def listing_counts(
    labels: np.ndarray,
    split: np.ndarray,
    is_query: np.ndarray | None = None,
    is_gallery: np.ndarray | None = None,
) -> dict[str, int]:
    """Image and class counts overall and per split (plus query/gallery images when given)."""
    counts = {"images": int(labels.shape[0]), "classes": int(np.unique(labels).shape[0])}
    for s in ("train", "test"):
        m = split == s
        counts[f"{s}_images"] = int(m.sum())
        counts[f"{s}_classes"] = int(np.unique(labels[m]).shape[0])
    if is_query is not None:
        counts["query_images"] = int(is_query.sum())
    if is_gallery is not None:
        counts["gallery_images"] = int(is_gallery.sum())
    return counts


def read_text_lines(path: Path) -> list[str]:
    """Non-empty lines of a text list file, stripped; a decoding error is a :class:`DatasetError`."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DatasetError(f"{path} is not a text list file; re-extract the official archive.") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def malformed_line(path: Path, lineno: int, line: str, expected: str) -> DatasetError:
    """The error for a list-file line that does not have the official format."""
    shown = line if len(line) <= 80 else line[:77] + "..."
    return DatasetError(
        f"{path} line {lineno} is {shown!r} but should be '{expected}'; re-extract the official archive."
    )
