"""Decoded-image cache: decode and resize every image once per (dataset, size), share it on the node.

JPEG decoding of full-size images dominates the cost of a DML input pipeline. The cache stores
every image of a :class:`~dmlbench.datasets.base.SampleTable` decoded and resized so that its
shorter side is ``stored_side(size)`` (``size * 256 / 224``, the usual resize-then-crop ratio;
aspect ratio kept), as raw uint8 RGB in one flat file read through ``numpy.memmap``. Training
transforms (random resized crop, flip) then run on these small arrays.

On-disk layout, under ``$DMLBENCH_CACHE`` (default ``~/.cache/dmlbench``)::

    <dataset_id>-s<size>-<key>/          key = hash of the source list (see source_key)
        pixels.u8                        all images, HWC uint8, back to back
        index.npy                        int64 [n, 3]: byte offset, height, width per image
        meta.json                        written last; format version, counts, byte total
    <dataset_id>-s<size>-<key>.lock      fcntl lock file serialising builders

Concurrency and interruption: a builder takes an exclusive ``fcntl.flock`` on the lock file,
re-checks whether another process finished meanwhile, builds into a temporary sibling folder
(``<name>.tmp-XXXX``) and publishes it with one atomic ``os.rename``. A folder only counts as a
cache when ``meta.json`` exists and agrees with the files (sizes, counts, key); a build killed
midway leaves only a ``.tmp-`` folder, which the next builder deletes before rebuilding, and a
published folder that fails validation (e.g. a truncated ``pixels.u8``) is rebuilt.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dmlbench.datasets.base import SampleTable
from dmlbench.errors import ConfigError, DatasetError
from dmlbench.fsutil import file_lock, fsync_dir

CACHE_ENV = "DMLBENCH_CACHE"
FORMAT_VERSION = 1
PIXELS = "pixels.u8"
INDEX = "index.npy"
META = "meta.json"
#: images decoded per chunk of the build (bounds the memory held by in-flight results)
CHUNK = 256


def default_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """``cache_dir`` if given, else ``$DMLBENCH_CACHE``, else ``~/.cache/dmlbench``."""
    if cache_dir is not None and str(cache_dir) != "":
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV, "")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dmlbench"


def stored_side(size: int) -> int:
    """Shorter side of the cached images for crops of ``size`` pixels: ``round(size * 256 / 224)``.

    Example:
        >>> stored_side(224), stored_side(227), stored_side(64)
        (256, 259, 73)
    """
    if size < 1:
        raise ConfigError(f"the cache image size must be a positive number of pixels, got {size}.")
    return round(size * 256 / 224)


def resized_shape(height: int, width: int, side: int) -> tuple[int, int]:
    """``(h, w)`` after scaling so that the shorter side is ``side`` (aspect ratio kept, rounded).

    Example:
        A 375×500 (h×w) photo with ``side=256``: the scale is 256/375, the width 500·256/375 = 341.3.

        >>> resized_shape(375, 500, 256)
        (256, 341)
        >>> resized_shape(500, 375, 256)
        (341, 256)
    """
    if height <= width:
        return side, max(1, round(width * side / height))
    return max(1, round(height * side / width)), side


def resize_shorter(image: np.ndarray, side: int) -> np.ndarray:
    """Resize an HWC uint8 RGB array so its shorter side is ``side`` (PIL bilinear, antialiased)."""
    h, w = image.shape[:2]
    nh, nw = resized_shape(h, w, side)
    if (nh, nw) == (h, w):
        return np.ascontiguousarray(image, dtype=np.uint8)
    out = Image.fromarray(image).resize((nw, nh), Image.Resampling.BILINEAR)
    return np.asarray(out, dtype=np.uint8)


def source_key(table: SampleTable, dataset_id: str, size: int) -> str:
    """Content hash (16 hex digits) of what the cache is built from.

    Covers the format version, ``dataset_id``, ``size``, the labels and splits, and per image
    either its file (path, byte size, modification time) when the table has paths, or else its
    decoded pixels (in-memory tables such as the embedded datasets, which are small). Any change
    of the source list or of a file gives a new key, hence a new cache folder.
    """
    h = hashlib.sha256()
    h.update(f"v{FORMAT_VERSION}|{dataset_id}|{size}|{len(table)}|".encode())
    h.update(np.ascontiguousarray(table.labels, dtype=np.int64).tobytes())
    h.update("|".join(map(str, table.split.tolist())).encode())
    if table.paths is not None:
        for p in table.paths:
            try:
                st = os.stat(p)
                h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}\n".encode())
            except OSError:
                raise DatasetError(
                    f"the image {p} of {dataset_id} is not on disk; check the dataset first."
                ) from None
    else:
        for i in range(len(table)):
            img = np.ascontiguousarray(table.load(i), dtype=np.uint8)
            h.update(f"{img.shape}".encode())
            h.update(img.tobytes())
    return h.hexdigest()[:16]


class CachedImages:
    """``i -> HWC uint8 RGB`` read from a published cache folder (memory-mapped, opened lazily).

    Picklable: the memory map is reopened in each DataLoader worker process.
    """

    def __init__(self, folder: str | os.PathLike[str]):
        self.folder = str(folder)
        self._pixels: np.memmap | None = None
        self._index: np.ndarray | None = None

    def _open(self) -> tuple[np.memmap, np.ndarray]:
        if self._pixels is None or self._index is None:
            self._index = np.load(os.path.join(self.folder, INDEX), allow_pickle=False)
            self._pixels = np.memmap(os.path.join(self.folder, PIXELS), dtype=np.uint8, mode="r")
        return self._pixels, self._index

    def __len__(self) -> int:
        return int(self._open()[1].shape[0])

    def __call__(self, i: int) -> np.ndarray:
        pixels, index = self._open()
        off, h, w = (int(v) for v in index[i])
        return np.array(pixels[off : off + h * w * 3]).reshape(h, w, 3)

    def __getstate__(self) -> dict[str, Any]:
        return {"folder": self.folder, "_pixels": None, "_index": None}


def cached_table(
    table: SampleTable,
    dataset_id: str,
    size: int,
    cache_dir: str | os.PathLike[str] | None = None,
    workers: int | None = None,
) -> SampleTable:
    """The same table, with ``load(i)`` reading image ``i`` from the decoded-image cache.

    Builds the cache on first use (once per node: concurrent callers wait on a file lock and
    reuse the first build). Labels, splits, query/gallery flags and paths are unchanged.

    Args:
        table: the source table (its ``load`` is called once per image during the build).
        dataset_id: names the cache folder; include anything that changes the images
            (e.g. ``"synthetic-8x10"``); the source key guards against stale content anyway.
        size: the crop size the images are prepared for (shorter side ``stored_side(size)``).
        cache_dir: cache root; default ``$DMLBENCH_CACHE`` or ``~/.cache/dmlbench``.
        workers: decoding threads for the build (default: CPU count, at most 8).
    """
    folder, _ = ensure_cache(table, dataset_id, size, cache_dir, workers)
    return dataclasses.replace(table, load=CachedImages(folder))


def ensure_cache(
    table: SampleTable,
    dataset_id: str,
    size: int,
    cache_dir: str | os.PathLike[str] | None = None,
    workers: int | None = None,
) -> tuple[Path, bool]:
    """Make sure the cache of ``table`` exists; return its folder and whether this call built it."""
    if not dataset_id or any(c in dataset_id for c in "/\\\0"):
        raise ConfigError(
            f"the cache dataset id must be a non-empty name without slashes, got {dataset_id!r}."
        )
    final, expected = cache_location(table, dataset_id, size, cache_dir)
    root, name = final.parent, final.name
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DatasetError(
            f"cannot create the image cache folder {root} ({err}); set ${CACHE_ENV} to a writable folder."
        ) from None
    if is_valid_cache(final, expected):
        return final, False
    with file_lock(root / f"{name}.lock"):
        if is_valid_cache(final, expected):  # another process finished while we waited
            return final, False
        for stale in root.glob(f"{name}.tmp-*"):  # left by an interrupted build
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():  # published but invalid (truncated, older format): rebuild
            shutil.rmtree(final)
        tmp = Path(tempfile.mkdtemp(prefix=f"{name}.tmp-", dir=root))
        try:
            _build(table, tmp, {**expected, "dataset_id": dataset_id, "size": size}, workers)
            os.rename(tmp, final)
            fsync_dir(root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final, True


def cache_location(
    table: SampleTable, dataset_id: str, size: int, cache_dir: str | os.PathLike[str] | None = None
) -> tuple[Path, dict[str, Any]]:
    """Where :func:`ensure_cache` keeps the cache of ``table`` and the metadata a valid one has
    (pass both to :func:`is_valid_cache`); builds nothing. Stats every image file (the source key)."""
    key = source_key(table, dataset_id, size)
    expected = {"version": FORMAT_VERSION, "key": key, "n": len(table), "side": stored_side(size)}
    return default_cache_dir(cache_dir) / f"{dataset_id}-s{size}-{key}", expected


def estimate_cache_bytes(table: SampleTable, size: int, sample: int = 64, seed: int = 0) -> int:
    """Bytes a cache of ``table`` at ``size`` will take, from the header sizes of a seeded sample
    of its image files (PIL reads the header only, nothing is decoded); in-memory tables (no paths)
    are measured on decoded samples. Index and metadata included.

    Example:
        Every image 640×480: the shorter side becomes ``stored_side(224) = 256``, so
        ``256 · 341 · 3 = 261,888`` bytes each, plus 24 bytes of index.
    """
    n = len(table)
    if n == 0:
        return 0
    side = stored_side(size)
    rng = np.random.default_rng(seed)
    picks = rng.choice(n, size=min(sample, n), replace=False)
    per = []
    for i in picks:
        if table.paths is not None:
            try:
                with Image.open(table.paths[int(i)]) as im:
                    w, h = im.size
            except OSError:
                continue  # unreadable files are the image check's to report
        else:
            h, w = table.load(int(i)).shape[:2]
        nh, nw = resized_shape(h, w, side)
        per.append(nh * nw * 3)
    mean = float(np.mean(per)) if per else float(side * side * 3)
    return int(mean * n) + 24 * n + 4096


def is_valid_cache(folder: Path, expected: dict[str, Any]) -> bool:
    """True when ``folder`` holds a complete cache whose metadata matches ``expected``."""
    try:
        meta = json.loads((folder / META).read_text())
        if any(meta.get(k) != v for k, v in expected.items()):
            return False
        index = np.load(folder / INDEX, allow_pickle=False)
        total = int(meta["total_bytes"])
        if index.shape != (expected["n"], 3) or (folder / PIXELS).stat().st_size != total:
            return False
        sizes = index[:, 1] * index[:, 2] * 3
        ends = index[:, 0] + sizes
        return bool(
            np.all(index[1:, 0] == ends[:-1])
            and (len(index) == 0 or (index[0, 0] == 0 and ends[-1] == total))
        )
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _build(table: SampleTable, folder: Path, meta: dict[str, Any], workers: int | None) -> None:
    side = int(meta["side"])
    n = len(table)
    index = np.zeros((n, 3), dtype=np.int64)
    offset = 0
    start = time.time()

    def prepare(i: int) -> np.ndarray:
        img = table.load(i)
        if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
            raise DatasetError(
                f"image {i} of {meta['dataset_id']} is {img.dtype} {tuple(img.shape)}, not HWC uint8 RGB; "
                f"the dataset's load() must return RGB arrays."
            )
        return resize_shorter(img, side)

    nthreads = workers or min(8, os.cpu_count() or 1)
    with open(folder / PIXELS, "wb") as f, ThreadPoolExecutor(max_workers=nthreads) as pool:
        for lo in range(0, n, CHUNK):
            for i, img in zip(
                range(lo, min(n, lo + CHUNK)), pool.map(prepare, range(lo, min(n, lo + CHUNK))), strict=True
            ):
                h, w = img.shape[:2]
                index[i] = (offset, h, w)
                f.write(img.tobytes())
                offset += h * w * 3
        f.flush()
        os.fsync(f.fileno())
    np.save(folder / INDEX, index, allow_pickle=False)
    meta = {**meta, "total_bytes": offset, "build_seconds": round(time.time() - start, 3)}
    with open(folder / META, "w") as mf:  # written last: its presence marks a complete build
        json.dump(meta, mf, indent=1, sort_keys=True)
        mf.flush()
        os.fsync(mf.fileno())
