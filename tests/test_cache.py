"""The decoded-image cache: content, keys, concurrent builders, interrupted and damaged builds."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dmlbench.datasets.base import SampleTable
from dmlbench.datasets.cache import (
    INDEX,
    META,
    PIXELS,
    CachedImages,
    cached_table,
    ensure_cache,
    is_valid_cache,
    resize_shorter,
    resized_shape,
    stored_side,
)
from dmlbench.errors import ConfigError, DatasetError


def _images(n: int, seed: int = 0) -> list[np.ndarray]:
    """Images of varying shape (portrait, landscape, square) with random pixels."""
    rng = np.random.default_rng(seed)
    shapes = [(30, 40), (40, 30), (25, 25), (12, 50)]
    return [rng.integers(0, 256, size=(*shapes[i % 4], 3), dtype=np.uint8) for i in range(n)]


def _memory_table(images: list[np.ndarray]) -> SampleTable:
    labels = np.arange(len(images)) // 2
    split = np.where(labels < len(images) // 4, "train", "test")
    return SampleTable(labels=labels, split=split, load=lambda i: images[i])


def _file_table(folder: Path, images: list[np.ndarray]) -> SampleTable:
    paths = []
    for i, img in enumerate(images):
        p = folder / f"{i}.png"  # lossless, so decoded pixels are known exactly
        Image.fromarray(img).save(p)
        paths.append(str(p))

    def load(i: int) -> np.ndarray:
        with Image.open(paths[i]) as im:
            return np.asarray(im.convert("RGB"))

    labels = np.arange(len(images)) // 2
    return SampleTable(labels=labels, split=np.array(["train"] * len(images)), load=load, paths=paths)


def test_sizes_closed_form() -> None:
    assert [stored_side(s) for s in (224, 227, 256, 64)] == [256, 259, 293, 73]
    # shorter side = side, longer side scaled by side / shorter, rounded half to even
    for h, w, side in [(375, 500, 256), (500, 375, 256), (100, 100, 73), (12, 50, 18), (1, 1000, 4)]:
        s = min(h, w)
        expected = (side, round(w * side / s)) if h <= w else (round(h * side / s), side)
        assert resized_shape(h, w, side) == expected
    with pytest.raises(ConfigError, match="positive number of pixels"):
        stored_side(0)


def test_resize_matches_pil() -> None:
    img = _images(1)[0]  # 30×40
    out = resize_shorter(img, 18)
    ref = np.asarray(Image.fromarray(img).resize((24, 18), Image.Resampling.BILINEAR))
    assert out.shape == (18, 24, 3) and np.array_equal(out, ref)


def test_cached_table_returns_resized_pixels(tmp_path: Path) -> None:
    images = _images(9)
    table = _memory_table(images)
    ct = cached_table(table, "toy", size=16, cache_dir=tmp_path)
    side = stored_side(16)
    for i, img in enumerate(images):
        got = ct.load(i)
        assert got.dtype == np.uint8 and got.flags.writeable
        assert np.array_equal(got, resize_shorter(img, side))
    assert ct.labels is table.labels and ct.split is table.split and ct.paths is table.paths
    # one folder, complete; the second call reuses it
    (folder,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    meta = json.loads((folder / META).read_text())
    assert meta["n"] == 9 and meta["side"] == side and meta["total_bytes"] == (folder / PIXELS).stat().st_size
    assert ensure_cache(table, "toy", 16, tmp_path) == (folder, False)


def test_loader_is_picklable_and_reopens(tmp_path: Path) -> None:
    import pickle

    images = _images(4)
    ct = cached_table(_memory_table(images), "toy", size=16, cache_dir=tmp_path)
    first = ct.load(2)
    clone = pickle.loads(pickle.dumps(ct.load))
    assert isinstance(clone, CachedImages) and clone._pixels is None
    assert np.array_equal(clone(2), first) and len(clone) == 4


def test_key_changes_with_source(tmp_path: Path) -> None:
    images = _images(4)
    src = tmp_path / "src"
    src.mkdir()
    table = _file_table(src, images)
    f1, built1 = ensure_cache(table, "files", 16, tmp_path / "c")
    assert built1
    # a changed file (new size/mtime) gives a new cache folder with the new pixels
    new = np.zeros((30, 40, 3), dtype=np.uint8)
    Image.fromarray(new).save(table.paths[0])  # type: ignore[index]
    os.utime(table.paths[0], ns=(1, 1))  # type: ignore[index]
    f2, built2 = ensure_cache(table, "files", 16, tmp_path / "c")
    assert built2 and f2 != f1
    assert np.array_equal(CachedImages(f2)(0), resize_shorter(new, stored_side(16)))
    # in-memory tables are keyed by their pixels
    mem = _memory_table(images)
    g1, _ = ensure_cache(mem, "mem", 16, tmp_path / "c")
    images[1] = images[1].copy()
    images[1][0, 0, 0] ^= 1
    g2, _ = ensure_cache(mem, "mem", 16, tmp_path / "c")
    assert g1 != g2


def test_env_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DMLBENCH_CACHE", str(tmp_path / "envcache"))
    folder, built = ensure_cache(_memory_table(_images(2)), "toy", 8)
    assert built and folder.parent == tmp_path / "envcache"


class _Boom(Exception):
    pass


def test_interrupted_build_leaves_nothing_valid_and_is_rebuilt(tmp_path: Path) -> None:
    images = _images(6)

    def flaky(i: int) -> np.ndarray:
        if i == 4:
            raise _Boom("killed midway")
        return images[i]

    bad = SampleTable(labels=np.arange(6) // 2, split=np.array(["train"] * 6), load=flaky)
    with pytest.raises(_Boom):
        ensure_cache(bad, "toy", 16, tmp_path)
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == []  # no folder, no temp left
    # a build killed hard (no cleanup) leaves a .tmp- folder without meta.json: ignored, removed, rebuilt
    good = SampleTable(labels=np.arange(6) // 2, split=np.array(["train"] * 6), load=lambda i: images[i])
    folder, _ = ensure_cache(good, "toy", 16, tmp_path)
    name = folder.name
    leftover = tmp_path / f"{name}.tmp-dead"
    leftover.mkdir()
    (leftover / PIXELS).write_bytes(b"\0" * 100)
    import shutil

    shutil.rmtree(folder)
    folder2, built = ensure_cache(good, "toy", 16, tmp_path)
    assert built and folder2 == folder and not leftover.exists()
    assert np.array_equal(CachedImages(folder2)(5), resize_shorter(images[5], stored_side(16)))


def test_damaged_cache_detected_and_rebuilt(tmp_path: Path) -> None:
    images = _images(5)
    table = _memory_table(images)
    folder, _ = ensure_cache(table, "toy", 16, tmp_path)
    expected = {"version": 1, "n": 5}
    assert is_valid_cache(folder, expected)
    with open(folder / PIXELS, "r+b") as f:  # truncate the pixels
        f.truncate(10)
    assert not is_valid_cache(folder, expected)
    folder2, built = ensure_cache(table, "toy", 16, tmp_path)
    assert built and folder2 == folder and is_valid_cache(folder, expected)
    # an index that does not tile the pixel file is also invalid
    index = np.load(folder / INDEX)
    index[2, 0] += 3
    np.save(folder / INDEX, index)
    assert not is_valid_cache(folder, expected)
    (folder / META).unlink()
    assert not is_valid_cache(folder, {})


def test_corrupt_image_named_during_build(tmp_path: Path) -> None:
    from dmlbench.datasets._common import ImageFileLoader

    src = tmp_path / "src"
    src.mkdir()
    table = _file_table(src, _images(4))
    Path(table.paths[3]).write_bytes(b"not an image")  # type: ignore[index]
    table = SampleTable(
        table.labels, table.split, ImageFileLoader(table.paths or [], "toy"), paths=table.paths
    )
    with pytest.raises(DatasetError, match=f"cannot decode image {table.paths[3]} of toy"):  # type: ignore[index]
        ensure_cache(table, "toy", 16, tmp_path / "c")
    assert [p for p in (tmp_path / "c").iterdir() if p.is_dir()] == []


def test_bad_dataset_id(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="without slashes"):
        ensure_cache(_memory_table(_images(2)), "a/b", 16, tmp_path)


def _build_in_process(args: tuple[str, int]) -> tuple[str, bool]:
    cache_dir, seed = args
    images = _images(40, seed=seed)
    folder, built = ensure_cache(_memory_table(images), "race", 16, cache_dir, workers=1)
    return str(folder), built


def test_concurrent_builders_build_once(tmp_path: Path) -> None:
    ctx = mp.get_context("fork")
    with ctx.Pool(3) as pool:
        results = pool.map(_build_in_process, [(str(tmp_path), 7)] * 3)
    folders = {f for f, _ in results}
    assert len(folders) == 1 and sum(b for _, b in results) == 1
    folder = Path(folders.pop())
    images = _images(40, seed=7)
    reader = CachedImages(folder)
    assert all(np.array_equal(reader(i), resize_shorter(images[i], stored_side(16))) for i in range(40))
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []
