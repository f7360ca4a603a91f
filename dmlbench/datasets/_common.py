"""Shared machinery of the four on-disk benchmarks (CUB200-2011, CARS196, SOP, In-Shop).

Each benchmark module only knows how to read its official list files into a :class:`Listing`
(relative image paths, class ids, official split, query/gallery flags). Everything else lives
here, once:

* finding the dataset: the ``root`` text (``--data-root``: roots and ``name=path`` entries, see
  :mod:`dmlbench.datasets.roots`; else ``$DMLBENCH_DATA``), searched in the root itself, in folders
  named like the dataset (case-insensitive) and one level below those, for any of the dataset's
  accepted :class:`Layout` s (official archives as they unpack, and the names peer tools use);
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
from typing import Any, ClassVar, Literal

import numpy as np
from PIL import Image

from dmlbench.datasets.base import DatasetCheck, DatasetSource, SampleTable
from dmlbench.datasets.roots import DATA_ENV, data_roots, folder_key
from dmlbench.errors import ConfigError, DatasetError, close_matches

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

    def select(self, part: str | None) -> np.ndarray:
        """Row indices of ``part``: None (all), "train", "test", "query" or "gallery"."""
        if part is None:
            return np.arange(len(self.rel_paths))
        if part in ("train", "test"):
            return np.flatnonzero(self.split == part)
        flags = {"query": self.is_query, "gallery": self.is_gallery}.get(part)
        if flags is None:
            raise ConfigError(
                f"unknown split {part!r}; use train or test"
                + (", query or gallery." if self.is_query is not None else ".")
            )
        return np.flatnonzero(flags)


@dataclass(frozen=True)
class Layout:
    """One accepted on-disk layout of a benchmark.

    Attributes:
        key: short name shown by ``datasets check`` (e.g. ``"car_ims"``).
        markers: paths relative to the dataset folder (files or folders) that must all exist.
        description: what the layout looks like, for messages and docs.
    """

    key: str
    markers: tuple[str, ...]
    description: str


def candidate_folders(base: Path, names: set[str]) -> list[Path]:
    """Where a dataset may sit under ``base``: ``base`` itself, then each sub-folder whose
    :func:`~dmlbench.datasets.roots.folder_key` is in ``names``, each followed by its own
    sub-folders with such a name (one wrapper level, e.g. ``cub2011/CUB_200_2011``)."""

    def named_children(folder: Path) -> list[Path]:
        try:
            return sorted(p for p in folder.iterdir() if folder_key(p.name) in names and p.is_dir())
        except OSError:
            return []

    out = [base]
    for child in named_children(base):
        out.append(child)
        out.extend(named_children(child))
    return out


ProblemKind = Literal["missing", "empty", "truncated", "corrupt"]


@dataclass(frozen=True)
class ImageProblem:
    """An image that cannot be used; ``message`` is one sentence naming the file."""

    path: str
    kind: ProblemKind
    message: str


def image_problem(path: str, dataset: str) -> ImageProblem | None:
    """What is wrong with one image file (missing, empty, truncated, corrupt), or None.

    Decodes the whole file with PIL (``Image.load``), so a JPEG cut short is caught even when
    its header is intact (with PIL's default ``ImageFile.LOAD_TRUNCATED_IMAGES = False``).
    """
    fix = "replace it from the original archive"
    try:
        size = os.stat(path).st_size
    except OSError:
        return ImageProblem(path, "missing", f"the image {path} of {dataset} is missing; re-extract the official archive.")
    if size == 0:
        return ImageProblem(path, "empty", f"the image {path} of {dataset} is an empty file; {fix}.")
    try:
        with Image.open(path) as im:
            im.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        kind: ProblemKind = "truncated" if "truncated" in str(err).lower() else "corrupt"
        what = "is truncated" if kind == "truncated" else "cannot be decoded"
        return ImageProblem(path, kind, f"the image {path} of {dataset} {what} ({err}); {fix}.")
    return None


def find_image_problems(paths: Sequence[str], dataset: str, workers: int | None = None) -> list[ImageProblem]:
    """:func:`image_problem` of every path, in order, problems only (threads; PIL drops the GIL)."""
    n = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=n) as pool:
        found = list(pool.map(lambda p: image_problem(p, dataset), paths, chunksize=64))
    return [p for p in found if p is not None]


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
    """Indices of the files in ``paths`` that PIL cannot fully decode (empty and truncated included)."""
    bad = {p.path for p in find_image_problems(paths, "", workers) if p.kind != "missing"}
    return [i for i, p in enumerate(paths) if p in bad]


def single_image_classes(labels: np.ndarray, mask: np.ndarray | None = None) -> list[int]:
    """Class ids with exactly one image (among ``mask`` rows when given), sorted."""
    sel = labels if mask is None else labels[mask]
    ids, counts = np.unique(sel, return_counts=True)
    return [int(c) for c in ids[counts == 1]]


def _fmt(n: int) -> str:
    return f"{n:,}"


class BenchmarkSource(DatasetSource):
    """A benchmark read from its official list files, found under the data root(s).

    Subclasses set ``name``, ``folder`` (the canonical folder name), ``folder_names`` (other names
    it is found under), ``how_to_get``, ``recall_ks``, ``layouts`` (accepted layouts, tried in
    order), ``FULL`` (the full-size counts, asserted when ``expect_full``) and implement
    :meth:`read_listing`.
    """

    #: the accepted layouts, in the order they are tried in each candidate folder
    layouts: ClassVar[tuple[Layout, ...]] = ()
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
        self._listing: tuple[Path, Layout, Listing] | None = None
        #: absolute paths of the images dropped by ``skip_corrupt`` in the last ``table()``
        self.skipped: list[str] = []

    # ---- subclass hook ----------------------------------------------------------------------
    def read_listing(self, folder: Path, layout: Layout) -> Listing:
        """Parse the list files of ``layout`` in ``folder`` (image paths relative to ``folder``);
        raise :class:`DatasetError` if malformed."""
        raise NotImplementedError

    # ---- locating ---------------------------------------------------------------------------
    @classmethod
    def accepted_layouts(cls) -> str:
        """The accepted layouts in one line, for messages."""
        return "; or ".join(layout.description for layout in cls.layouts)

    def locate(self) -> tuple[Path, Layout]:
        """The dataset folder and its layout; raises :class:`DatasetMissing` naming what is absent.

        Searches each root (or the dataset's explicit ``name=path``) with :func:`candidate_folders`
        and returns the first folder where every marker of some layout exists.
        """
        roots = data_roots(self.root)
        bases = roots.for_dataset(self.name)
        if not bases:
            raise DatasetMissing(
                f"no data root for {self.name}: pass --data-root or set ${DATA_ENV} to the folder that "
                f"contains {self.folder}/ (or --data-root {self.name}=PATH; see docs/datasets.md)."
            )
        explicit = self.name in roots.explicit
        names = {folder_key(n) for n in (self.name, self.folder, *self.folder_names)}
        partial: tuple[int, Path, Layout] | None = None
        for base in bases:
            if not base.is_dir():
                given = f"the path {base} given as {self.name}=" if explicit else f"the data root {base}"
                raise DatasetMissing(
                    f"{given} does not exist; pass --data-root or set ${DATA_ENV} to the folder "
                    f"that contains {self.folder}/ (or --data-root {self.name}=PATH)."
                )
            for folder in candidate_folders(base, names):
                for layout in self.layouts:
                    present = [m for m in layout.markers if (folder / m).exists()]
                    if len(present) == len(layout.markers):
                        return folder, layout
                    # a folder named like the dataset (or given for it), or a list file present:
                    # the user meant this to be the dataset, so name what is missing
                    meant = explicit or folder != base or any((folder / m).is_file() for m in present)
                    if present and meant and (partial is None or len(present) > partial[0]):
                        partial = (len(present), folder, layout)
        if partial is not None:
            _, folder, layout = partial
            absent = next(m for m in layout.markers if not (folder / m).exists())
            what = "the list file" if "." in Path(absent).name else "the folder"
            raise DatasetMissing(
                f"{self.name} is incomplete: {what} {folder / absent} is missing (layout "
                f"{layout.key!r}: {layout.description}); {self.how_to_get}"
            )
        where = roots.describe(self.name)
        raise DatasetMissing(
            f"{self.name} not found under {where}: expected {self.accepted_layouts()}, in the root itself or in "
            f"a folder named {self.folder} (case-insensitive; also {', '.join(self.folder_names)}); "
            f"{self.how_to_get}"
        )

    def dataset_dir(self) -> Path:
        """The folder the dataset was found in (see :meth:`locate`)."""
        return self.locate()[0]

    def listing(self) -> tuple[Path, Layout, Listing]:
        """The dataset folder, its layout and what its list files say (read once, cached)."""
        if self._listing is None:
            folder, layout = self.locate()
            listing = self.read_listing(folder, layout)
            if len(listing.rel_paths) == 0:
                raise DatasetError(f"{folder / listing.list_file} lists no images; re-extract the official archive.")
            self._listing = (folder, layout, listing)
        return self._listing

    def image_problems(
        self, part: str | None = None, sample: int | None = None, seed: int = 0, workers: int | None = None
    ) -> list[ImageProblem]:
        """Missing, empty, truncated or corrupt images of one split (``part``: None = all, "train",
        "test", "query", "gallery"), optionally of a seeded random ``sample`` of its images.

        Reads the list files (raises :class:`DatasetError` if they are missing or malformed) and
        decodes each chosen image fully; returns the problems in list order, each with one sentence
        naming the file. The full-size count checks are not applied here.
        """
        folder, _, listing = self.listing()
        rows = listing.select(part)
        if sample is not None and sample < len(rows):
            if sample < 0:
                raise ConfigError(f"the image sample size must be >= 0, got {sample}.")
            rows = np.sort(np.random.default_rng(seed).choice(rows, size=sample, replace=False))
        paths = [str(folder / listing.rel_paths[i]) for i in rows.tolist()]
        return find_image_problems(paths, self.name, workers)

    # ---- reading ----------------------------------------------------------------------------
    def table(self) -> SampleTable:
        if self._table is None:
            self._table = self._build_table()
        return self._table

    def _build_table(self) -> SampleTable:
        folder, _, listing = self.listing()
        if self.options["expect_full"]:
            self._check_full_counts(folder, listing)
        paths = [str(folder / p) for p in listing.rel_paths]
        self._check_files_present(folder, paths, listing)
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

    def _check_full_counts(self, folder: Path, listing: Listing) -> None:
        counts = listing_counts(listing.labels, listing.split, listing.is_query, listing.is_gallery)
        facts = [(listing.list_file, k, counts[k]) for k in self.FULL if k in counts] + listing.stated
        for file, what, got in facts:
            expected = self.FULL.get(what)
            if expected is not None and got != expected:
                raise DatasetError(
                    f"{folder / file} gives {_fmt(got)} {what.replace('_', ' ')} but the full {self.name} "
                    f"has {_fmt(expected)}; re-extract the official archive, or pass expect_full=False (--subset) to use a subset."
                )

    def _check_files_present(self, folder: Path, paths: list[str], listing: Listing) -> None:
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
                f"{folder / listing.list_file} names {_fmt(len(missing))} image(s) that are not on disk, "
                f"first {missing[0]}; re-extract the official archive into {folder}."
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
        folder, layout, _ = self.listing()
        try:
            hash_ = protocol_split_hash(table, self.name)
        except DatasetError as err:
            return DatasetCheck(
                self.name, "malformed", str(err), counts=counts, path=str(folder), layout=layout.key
            )
        return DatasetCheck(
            self.name, "found", msg, counts=counts, split_hash=hash_, path=str(folder), layout=layout.key
        )


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
