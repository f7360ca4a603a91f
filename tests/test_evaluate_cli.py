"""``dmlbench evaluate``: good files give the library's numbers, bad files one sentence and exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from dmlbench.cli import app
from dmlbench.evaluation import evaluate_embeddings

runner = CliRunner()


@pytest.fixture
def data() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 8, 120)
    emb = rng.normal(size=(8, 16))[labels] + 0.8 * rng.normal(size=(120, 16))
    return {"embeddings": emb.astype(np.float32), "labels": labels}


def write(tmp_path: Path, name: str = "emb.npz", **arrays: np.ndarray) -> Path:
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


def test_json_output_matches_library(tmp_path: Path, data: dict[str, np.ndarray]) -> None:
    path = write(tmp_path, **data)
    res = runner.invoke(app, ["evaluate", "--embeddings", str(path), "--recall-ks", "1,4", "--format", "json"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)
    want = evaluate_embeddings(data["embeddings"], data["labels"], recall_ks=(1, 4))
    assert list(got) == ["map_at_r", "r_precision", "precision_at_1", "recall_at_1", "recall_at_4", "nmi", "f1"]
    assert got == pytest.approx(want, abs=1e-12)


def test_query_gallery_arrays_and_euclidean(tmp_path: Path, data: dict[str, np.ndarray]) -> None:
    is_query = np.arange(120) % 2 == 0
    path = write(tmp_path, is_query=is_query, is_gallery=~is_query, **data)
    res = runner.invoke(app, ["evaluate", "-e", str(path), "--distance", "euclidean", "--format", "json"])
    assert res.exit_code == 0, res.output
    want = evaluate_embeddings(data["embeddings"], data["labels"], query_mask=is_query, gallery_mask=~is_query,
                               distance="euclidean")
    assert json.loads(res.stdout) == pytest.approx(want, abs=1e-12)
    assert json.loads(res.stdout) != pytest.approx(evaluate_embeddings(data["embeddings"], data["labels"]))


def test_table_output(tmp_path: Path, data: dict[str, np.ndarray]) -> None:
    res = runner.invoke(app, ["evaluate", "-e", str(write(tmp_path, **data))])
    assert res.exit_code == 0, res.output
    want = evaluate_embeddings(data["embeddings"], data["labels"])
    for key in ("map_at_r", "recall_at_8", "nmi", "f1"):
        assert key in res.stdout
    assert f"{want['map_at_r']:.4f}" in res.stdout


def test_help_has_an_example() -> None:
    res = runner.invoke(app, ["evaluate", "--help"])
    assert res.exit_code == 0
    assert "dmlbench evaluate --embeddings emb.npz" in res.stdout


def bad_cases(tmp_path: Path, data: dict[str, np.ndarray]) -> list[tuple[list[str], str]]:
    text = tmp_path / "notes.npz"
    text.write_text("not an archive")
    npy = tmp_path / "single.npy"
    np.save(npy, data["embeddings"])
    obj = write(tmp_path, "obj.npz", embeddings=data["embeddings"], labels=np.array([{"a": 1}] * 120, dtype=object))
    return [
        (["-e", str(tmp_path / "missing.npz")], "does not exist"),
        (["-e", str(text)], "is not an .npz archive"),
        (["-e", str(npy)], "is not an .npz archive"),
        (["-e", str(write(tmp_path, "nolab.npz", embeddings=data["embeddings"]))], "no array named 'labels'"),
        (["-e", str(write(tmp_path, "short.npz", embeddings=data["embeddings"], labels=data["labels"][:50]))],
         "'labels' in"),
        (["-e", str(write(tmp_path, "mask.npz", is_query=np.ones(3, dtype=bool), **data))], "'is_query' in"),
        (["-e", str(write(tmp_path, "flat.npz", embeddings=data["embeddings"][:, 0], labels=data["labels"]))],
         "must be 2-D"),
        (["-e", str(obj)], "pickled"),
        (["-e", str(write(tmp_path, "ok.npz", **data)), "--recall-ks", "1,x"], "--recall-ks must be positive"),
        (["-e", str(write(tmp_path, "ok2.npz", **data)), "--distance", "cityblock"], "unknown distance"),
        (["-e", str(write(tmp_path, "ok3.npz", **data)), "--format", "yaml"], "--format must be table or json"),
        (["-e", str(write(tmp_path, "lone.npz", embeddings=data["embeddings"], labels=np.arange(120)))],
         "no query has another item of its class"),
    ]


def test_bad_input_is_one_sentence_and_exit_2(tmp_path: Path, data: dict[str, np.ndarray]) -> None:
    for args, message in bad_cases(tmp_path, data):
        res = runner.invoke(app, ["evaluate", *args])
        assert res.exit_code == 2, (args, res.output)
        assert message in " ".join(res.output.split()), (args, res.output)
        assert "Traceback" not in res.output
