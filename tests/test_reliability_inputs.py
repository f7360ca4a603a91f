"""Bad input through the real CLI: one clear sentence, exit code 2, no traceback, nothing left behind.

Every case of the table in ``docs/reliability.md`` that names this file is one parameter of
:func:`test_bad_input`. A case is a ``setup(tmp_path) -> argv`` function that writes whatever bad
file, tree or checkpoint it needs under ``tmp_path`` and returns the command line; the test then
snapshots ``tmp_path`` (paths, sizes, modification times), runs the command through Typer's
``CliRunner`` and checks:

* exit status 2 (:data:`dmlbench.cli.EXIT_USER_ERROR`) and a ``SystemExit`` (no other exception);
* stderr is exactly one ``error: ...`` line holding one sentence (ends with ``.``, no traceback)
  that contains the case's expected words (so the message says *what* is wrong);
* the folder is byte-for-byte what it was before: no new files or folders (no half-written
  output folders, rows, leaderboards or temp files) and no file changed.

The cases need no training: each fails before the first step (validation happens at config time).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from dmlbench.cli import EXIT_USER_ERROR, app
from dmlbench.results import schema, store
from tests.fixtures.benchmark_trees import make_cub

PYTHON_TAG = '!!python/object/apply:os.system ["touch {marker}"]'


@dataclass(frozen=True)
class Case:
    """One bad input: ``setup`` writes the files and returns argv; ``expect`` must all be in the message."""

    id: str
    setup: Callable[[Path], list[str]]
    expect: tuple[str, ...]
    #: "warning: skipped <file>: ..." lines expected before the error (unreadable row files are named)
    warnings: int = 0


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _train(*extra: str) -> list[str]:
    return ["train", "--method", "triplet", "--dataset", "digits", *extra]


def _sweep(*extra: str) -> list[str]:
    return ["sweep", "--methods", "triplet", "--datasets", "digits", "--preset", "smoke", "--dry-run", *extra]


def _row(row_id: str) -> dict[str, Any]:
    return {
        schema.ROW_ID: row_id, schema.SWEEP_ID: "sw1", schema.CELL: "triplet/digits/tiny", schema.SOURCE: "dmlbench",
        schema.METHOD: "triplet", schema.DATASET: "digits", schema.PHASE: "search", schema.STATUS: "complete",
        schema.MAP_AT_R: 0.5, schema.SCHEMA_VERSION_COL: schema.SCHEMA_VERSION,
    }  # fmt: skip


# ---- checkpoints ---------------------------------------------------------------------------------
class _Payload:
    """Pickles as "create the marker file": a checkpoint holding it must never be unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def _checkpoint(tmp: Path, payload: Any) -> list[str]:
    out = tmp / "run"
    path = out / "checkpoints" / "last.pt"
    path.parent.mkdir(parents=True)
    torch.save(payload, path)
    _write(out / "config.yaml", "method: the-earlier-run\n")
    return _train("--output", str(out))


def _foreign_checkpoint(tmp: Path) -> list[str]:
    from dmlbench.engine.trainer import CHECKPOINT_VERSION

    cfg = {"method": "proxyanchor", "dataset": "digits", "backbone": "tiny", "embedding_dim": 32}
    return _checkpoint(tmp, {"format": CHECKPOINT_VERSION, "config": cfg, "model": {}})


def _corrupt_checkpoint(tmp: Path) -> list[str]:
    args = _checkpoint(tmp, {"format": 1})
    path = tmp / "run" / "checkpoints" / "last.pt"
    path.write_bytes(path.read_bytes()[:40])  # truncated zip archive
    return args


def _pickle_checkpoint(tmp: Path) -> list[str]:
    return _checkpoint(tmp, {"format": 1, "config": _Payload(tmp / "PWNED")})


# ---- dataset trees ---------------------------------------------------------------------------------
def _cub(tmp: Path, edit: Callable[[Path], None]) -> list[str]:
    folder = make_cub(tmp / "data", n_classes=4, per_class=2)
    edit(folder)
    return ["train", "--method", "triplet", "--dataset", "cub200", "--data-root", str(tmp / "data"),
            "--backbone", "tiny", "--set", "pretrained=false", "--set", "dataset_kwargs={expect_full: false}",
            "--output", str(tmp / "out")]  # fmt: skip


def _cub_bad_line(folder: Path) -> None:
    lines = (folder / "images.txt").read_text().splitlines()
    (folder / "images.txt").write_text("\n".join(["not-a-number " + lines[0].split()[1], *lines[1:]]) + "\n")


def _cub_ids_disagree(folder: Path) -> None:
    lines = (folder / "image_class_labels.txt").read_text().splitlines()
    (folder / "image_class_labels.txt").write_text("\n".join(lines[:-1]) + "\n")


def _cub_missing_image(folder: Path) -> None:
    first = (folder / "images.txt").read_text().split()[1]
    (folder / "images" / first).unlink()


def _cub_missing_list(folder: Path) -> None:
    (folder / "image_class_labels.txt").unlink()


def _cub_binary_list(folder: Path) -> None:
    (folder / "images.txt").write_bytes(b"\xff\xfe\x00\x81garbage\x00")


# ---- result files ----------------------------------------------------------------------------------
def _results(tmp: Path, content: bytes | None, *, command: str = "leaderboard") -> list[str]:
    rows = tmp / "results" / "sw1" / "rows"
    rows.mkdir(parents=True)
    if content is not None:
        (rows / "sw1-r0.parquet").write_bytes(content)
    return [command, str(tmp / "results")]


def _truncated_parquet(tmp: Path) -> list[str]:
    good = store.write_row(tmp / "scratch", _row("sw1-r0"))
    data = good.read_bytes()
    good.unlink()
    (tmp / "scratch").rmdir()
    return _results(tmp, data[: len(data) // 2])


def _foreign_parquet(tmp: Path) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"x": [1, 2]}), tmp / "f.parquet")
    data = (tmp / "f.parquet").read_bytes()
    (tmp / "f.parquet").unlink()
    return _results(tmp, data)


def _newer_schema(tmp: Path) -> list[str]:
    import pyarrow.parquet as pq

    path = store.write_row(tmp / "scratch", _row("sw1-r0"))
    table = pq.read_table(path)
    idx = table.schema.get_field_index(schema.SCHEMA_VERSION_COL)
    import pyarrow as pa

    table = table.set_column(
        idx,
        schema.SCHEMA_VERSION_COL,
        pa.array([schema.SCHEMA_VERSION + 1], type=table.schema.field(idx).type),
    )
    pq.write_table(table, path)
    data = path.read_bytes()
    path.unlink()
    (tmp / "scratch").rmdir()
    return _results(tmp, data)


def _report_truncated(tmp: Path) -> list[str]:
    _truncated_parquet(tmp)
    return ["report", str(tmp / "results"), "--out", str(tmp / "report" / "index.html")]


def _reproduce_unknown_row(tmp: Path) -> list[str]:
    store.write_row(tmp / "results" / "sw1" / "rows", _row("sw1-r0"))
    return ["reproduce", "sw1-nope", str(tmp / "results"), "--output-dir", str(tmp / "rerun")]


def _evaluate_pickled_npz(tmp: Path) -> list[str]:
    obj = np.empty(2, dtype=object)
    obj[0], obj[1] = {"a": 1}, [2]
    np.savez(tmp / "emb.npz", embeddings=obj, labels=np.array([0, 1]))
    return ["evaluate", "--embeddings", str(tmp / "emb.npz")]


def _evaluate_shape_mismatch(tmp: Path) -> list[str]:
    np.savez(tmp / "emb.npz", embeddings=np.zeros((4, 3), np.float32), labels=np.array([0, 0, 1]))
    return ["evaluate", "--embeddings", str(tmp / "emb.npz")]


def _space(tmp: Path, text: str) -> list[str]:
    return _sweep("--output", str(tmp / "results"), "--search-space", str(_write(tmp / "space.yaml", text)))


def _config(tmp: Path, text: str) -> list[str]:
    return _train("--output", str(tmp / "run"), "--config", str(_write(tmp / "cfg.yaml", text)))


def _existing_sweep_changed(tmp: Path) -> list[str]:
    from dmlbench.orchestrator import sweep as sw

    spec = sw.build_spec(
        methods="triplet", datasets="digits", preset="smoke", name="s1", output=str(tmp / "results")
    )
    sw.write_spec(spec)
    return _sweep("--name", "s1", "--output", str(tmp / "results"), "--epochs", "1", "--grace-period", "1")


CASES: list[Case] = [
    # -- CLI options: unknown names -------------------------------------------------------------------
    Case("train-unknown-method", lambda t: ["train", "--method", "cpp", "--dataset", "digits"], ("unknown method", "ccp")),
    Case("train-unknown-dataset", lambda t: ["train", "--method", "triplet", "--dataset", "digitz"], ("unknown dataset", "digits")),
    Case("train-unknown-backbone", lambda t: _train("--backbone", "resnet9000", "--output", str(t / "run")), ("unknown backbone",)),
    Case("train-set-unknown-key", lambda t: _train("--set", "lrr=0.1"), ("unknown key 'lrr'", "lr")),
    Case("train-set-no-equals", lambda t: _train("--set", "lr"), ("key=value",)),
    Case("train-bad-format", lambda t: _train("--format", "xml"), ("--format",)),
    Case("sweep-unknown-method", lambda t: ["sweep", "--methods", "cpp", "--datasets", "digits"], ("unknown method", "ccp")),
    Case("sweep-unknown-dataset", lambda t: ["sweep", "--methods", "triplet", "--datasets", "cub"], ("unknown dataset", "cub200")),
    Case("sweep-unknown-backbone", lambda t: _sweep("--backbones", "resnet9000", "--output", str(t / "results")), ("unknown backbone",)),
    Case("sweep-unknown-metric", lambda t: _sweep("--metric", "accuracy"), ("unknown metric", "map_at_r")),
    Case("sweep-unknown-preset", lambda t: ["sweep", "--methods", "triplet", "--datasets", "digits", "--preset", "huge"], ("unknown preset", "smoke")),
    Case("sweep-empty-methods", lambda t: ["sweep", "--methods", ",", "--datasets", "digits"], ("--methods is empty",)),
    Case("leaderboard-unknown-format", lambda t: ["leaderboard", str(t), "--format", "xml"], ("unknown format", "markdown")),
    # -- CLI options: wrong types / out of range ------------------------------------------------------
    Case("train-set-wrong-type", lambda t: _train("--set", "lr=fast"), ("'lr'", "valid number")),
    Case("train-set-out-of-range", lambda t: _train("--set", "lr=-1"), ("'lr'", "greater than 0")),
    Case("train-method-param-out-of-range", lambda t: _train("--set", "params.margin=-5"), ("'margin'",)),
    Case("train-negative-epochs", lambda t: _train("--epochs", "-1", "--output", str(t / "run")), ("'epochs'",)),
    Case("train-unknown-phase", lambda t: _train("--phase", "tset"), ("'phase'", "search", "final")),
    Case("train-fold-out-of-range", lambda t: _train("--fold", "17"), ("fold must be < num_folds",)),
    Case("sweep-zero-trials", lambda t: _sweep("--trials", "0"), ("'trials'", "greater than or equal to 1")),
    Case("sweep-negative-gpus", lambda t: _sweep("--gpus-per-trial", "-1"), ("'gpus_per_trial'",)),
    Case("sweep-grace-over-epochs", lambda t: _sweep("--epochs", "2", "--grace-period", "5"), ("grace_period",)),
    Case("sweep-too-many-folds", lambda t: _sweep("--folds", "5", "--output", str(t / "results")), ("--folds 3 or fewer",)),
    Case("sweep-unsafe-name", lambda t: _sweep("--name", "../x"), ("sweep name",)),
    Case("sweep-output-is-a-file", lambda t: _sweep("--output", str(_write(t / "f.txt", "x"))), ("not writable",)),
    Case("sweep-resume-nothing", lambda t: _sweep("--resume", "--output", str(t / "results" / "new")), ("--resume", "no sweep")),
    Case("sweep-changed-spec", _existing_sweep_changed, ("already exists with a different spec", "--force")),
    Case("sweep-unreachable-address", lambda t: ["sweep", "--methods", "triplet", "--datasets", "digits", "--preset", "smoke", "--address", "127.0.0.1:9", "--output", str(t / "results")], ("cannot reach a Ray cluster",)),
    Case("submit-not-a-sweep", lambda t: ["submit", "--address", "http://127.0.0.1:9", "--", "train"], ("submit runs a sweep",)),
    Case("submit-address-not-url", lambda t: ["submit", "--address", "127.0.0.1:8265", "--", "sweep"], ("dashboard URL",)),
    Case("submit-nested-address", lambda t: ["submit", "--address", "http://127.0.0.1:9", "--", "sweep", "--address", "x:1"], ("do not pass --address",)),
    # -- config / search-space YAML ------------------------------------------------------------------
    Case("config-python-tag", lambda t: _config(t, "lr: " + PYTHON_TAG.format(marker=t / "PWNED") + "\n"), ("not valid YAML", "python/object")),
    Case("config-malformed", lambda t: _config(t, "lr: [1e-3\nepochs: {\n"), ("not valid YAML",)),
    Case("config-not-a-mapping", lambda t: _config(t, "- 1\n- 2\n"), ("must be a mapping",)),
    Case("config-missing-file", lambda t: _train("--config", str(t / "nope.yaml")), ("does not exist",)),
    Case("config-is-a-folder", lambda t: _train("--config", str(t)), ("is a folder",)),
    Case("config-unknown-key", lambda t: _config(t, "lrr: 0.1\n"), ("unknown key 'lrr'", "lr")),
    Case("config-wrong-type", lambda t: _config(t, "epochs: many\n"), ("'epochs'",)),
    Case("space-python-tag", lambda t: _space(t, "method: triplet\nparams:\n  - " + PYTHON_TAG.format(marker=t / "PWNED") + "\n"), ("YAML tag", "safe loading")),
    Case("space-malformed", lambda t: _space(t, "method: [triplet\nparams: {\n"), ("not valid YAML", "line")),
    Case("space-not-a-mapping", lambda t: _space(t, "- method\n"), ("must be a mapping",)),
    Case("space-missing-file", lambda t: _sweep("--search-space", str(t / "none.yaml")), ("does not exist",)),
    Case("space-unknown-method", lambda t: _space(t, "method: tripplet\nparams: []\n"), ("unknown method", "triplet")),
    Case("space-other-method", lambda t: _space(t, "method: ccp\nparams:\n  - {name: lam, type: float, low: 0.01, high: 0.1}\n"), ("not in --methods",)),
    Case("space-unknown-param", lambda t: _space(t, "method: triplet\nparams:\n  - {name: bogus, type: float, low: 0.1, high: 1.0}\n"), ("'bogus'", "triplet parameters")),
    Case("space-unknown-type", lambda t: _space(t, "method: triplet\nparams:\n  - {name: margin, type: floaty, low: 0.1, high: 1.0}\n"), ("unknown type 'floaty'", "float")),
    Case("space-low-above-high", lambda t: _space(t, "method: triplet\nparams:\n  - {name: margin, type: float, low: 1.0, high: 0.1}\n"), ("low (1", "greater than high")),
    Case("space-log-nonpositive", lambda t: _space(t, "method: triplet\nparams:\n  - {name: lr, type: float, low: 0.0, high: 0.1, log: true}\n"), ("log",)),
    # -- dataset trees -------------------------------------------------------------------------------
    Case("dataset-root-missing", lambda t: ["train", "--method", "triplet", "--dataset", "cub200", "--data-root", str(t / "nodata"), "--output", str(t / "out")], ("does not exist", "--data-root")),
    Case("dataset-malformed-line", lambda t: _cub(t, _cub_bad_line), ("images.txt", "line 1")),
    Case("dataset-ids-disagree", lambda t: _cub(t, _cub_ids_disagree), ("disagree",)),
    Case("dataset-missing-image", lambda t: _cub(t, _cub_missing_image), ("missing",)),
    Case("dataset-missing-list-file", lambda t: _cub(t, _cub_missing_list), ("image_class_labels.txt",)),
    Case("dataset-binary-list-file", lambda t: _cub(t, _cub_binary_list), ("not a text list file",)),
    # a dry run prints the plan without the datasets (issue 17); a real sweep stops before starting
    Case("sweep-dataset-missing", lambda t: ["sweep", "--methods", "triplet", "--datasets", "cub200", "--data-root", str(t / "nodata"), "--output", str(t / "results")], ("nodata does not exist", "CUB_200_2011")),
    # -- checkpoints ---------------------------------------------------------------------------------
    Case("checkpoint-corrupt", _corrupt_checkpoint, ("cannot be read", "delete it")),
    Case("checkpoint-other-method", _foreign_checkpoint, ("method='proxyanchor'", "triplet")),
    Case("checkpoint-pickled-object", _pickle_checkpoint, ("cannot be read",)),
    # -- result files --------------------------------------------------------------------------------
    Case("results-missing-folder", lambda t: ["leaderboard", str(t / "nowhere")], ("does not exist",)),
    Case("results-no-rows", lambda t: _results(t, None), ("no result rows",)),
    Case("results-truncated-parquet", _truncated_parquet, ("none of the row files", "could be read"), warnings=1),
    Case("results-foreign-parquet", _foreign_parquet, ("none of the row files", "could be read"), warnings=1),
    Case("results-newer-schema", _newer_schema, ("none of the row files", "could be read"), warnings=1),
    Case("report-truncated-parquet", _report_truncated, ("none of the row files", "could be read"), warnings=1),
    Case("reproduce-unknown-row", _reproduce_unknown_row, ("sw1-nope",)),
    Case("status-no-sweep", lambda t: ["status", str(t / "nowhere")], ("no sweep",)),
    Case("evaluate-pickled-npz", _evaluate_pickled_npz, ("pickled",)),
    Case("evaluate-shape-mismatch", _evaluate_shape_mismatch, ("labels",)),
]  # fmt: skip


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """``{relative path: (size, mtime_ns)}`` of every file and folder under ``root``."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            p = Path(dirpath) / name
            st = p.stat()
            out[str(p.relative_to(root))] = (
                st.st_size if p.is_file() else -1,
                st.st_mtime_ns if p.is_file() else 0,
            )
    return out


def test_at_least_thirty_distinct_cases() -> None:
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 30


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # a command that wrongly falls back to ./results would show up here
    monkeypatch.delenv("DMLBENCH_DATA", raising=False)
    argv = case.setup(tmp_path)
    before = snapshot(tmp_path)
    result = CliRunner().invoke(app, argv)
    after = snapshot(tmp_path)

    assert isinstance(result.exception, SystemExit), f"{type(result.exception).__name__}: {result.exception}"
    assert result.exit_code == EXIT_USER_ERROR, result.output
    assert "Traceback" not in result.output
    err_lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    warned = [ln for ln in err_lines if ln.startswith("warning: skipped ")]
    assert len(warned) == case.warnings and all("sw1-r0.parquet" in w for w in warned), result.stderr
    err_lines = [ln for ln in err_lines if ln not in warned]
    assert len(err_lines) == 1 and err_lines[0].startswith("error: "), result.stderr
    message = err_lines[0][len("error: ") :]
    assert message.rstrip().endswith("."), message
    for words in case.expect:
        assert words in message, f"{words!r} not in {message!r}"
    assert after == before, f"files changed: {sorted(set(after) ^ set(before))} or contents"
    assert not (tmp_path / "PWNED").exists(), "a Python tag or pickled object ran code"
