"""`dmlbench train`, `methods list`, `datasets list` through the real CLI, and `--help` of every command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dmlbench.cli import app

runner = CliRunner()


def test_train_proxyanchor_on_digits_beats_untrained(tmp_path: Path) -> None:
    """The issue's acceptance run with the CLI's defaults for embedded data (tiny CNN, 32 px)."""
    out = tmp_path / "run"
    res = runner.invoke(app, ["train", "--method", "proxyanchor", "--dataset", "digits", "--format", "json",
                              "--output", str(out)])  # fmt: skip
    assert res.exit_code == 0, res.output
    payload = json.loads(res.output.strip().splitlines()[-1])
    before, after = payload["untrained"]["map_at_r"], payload["metrics"]["map_at_r"]
    assert payload["eval_split"] == "val" and payload["epochs"] == 8
    assert after > before + 0.1, (before, after)
    assert (out / "config.yaml").exists() and (out / "result.json").exists()
    assert (out / "checkpoints" / "best.pt").exists()


@pytest.mark.parametrize(
    "args, pattern",
    [
        (["--method", "cpp", "--dataset", "digits"], "unknown method 'cpp'"),
        (["--method", "ccp", "--dataset", "cub"], "unknown dataset 'cub'"),
        (["--method", "ccp", "--dataset", "digits", "--set", "lamda=0.1"], "unknown key 'lamda'"),
        (["--method", "proxyanchor", "--dataset", "digits", "--set", "lr=-1"], "lr"),
        (["--method", "proxyanchor", "--dataset", "digits", "--set", "embedding_dim=0"], "embedding_dim"),
        (["--method", "proxyanchor", "--dataset", "digits", "--set", "samples_per_class=400"], "batch cannot be formed"),
        (["--method", "proxyanchor", "--dataset", "digits", "--backbone", "nonet"], "unknown backbone 'nonet'"),
    ],
)
def test_train_bad_input_one_sentence_exit_2(args: list[str], pattern: str) -> None:
    res = runner.invoke(app, ["train", *args])
    assert res.exit_code == 2, res.output
    assert pattern in res.output and "Traceback" not in res.output


def test_lists() -> None:
    res = runner.invoke(app, ["methods", "list"])
    assert res.exit_code == 0
    for name in ("nivmf", "ccp", "diva", "proxyanchor", "proxynca", "multisimilarity", "margin", "triplet"):
        assert name in res.output
    res = runner.invoke(app, ["datasets", "list"])
    assert res.exit_code == 0
    for name in ("digits", "synthetic", "cub200", "cars196", "sop", "inshop"):
        assert name in res.output


def _commands() -> list[list[str]]:
    import typer.main

    root = typer.main.get_command(app)
    found: list[list[str]] = []

    def walk(cmd: object, path: list[str]) -> None:
        subs = getattr(cmd, "commands", None)
        if subs:
            for name, sub in subs.items():
                walk(sub, [*path, name])
        else:
            found.append(path)

    walk(root, [])
    return found


@pytest.mark.parametrize("path", _commands(), ids=lambda p: " ".join(p))
def test_every_command_has_help_with_an_example(path: list[str]) -> None:
    res = runner.invoke(app, [*path, "--help"])
    assert res.exit_code == 0, res.output
    assert "example" in res.output.lower(), f"`dmlbench {' '.join(path)} --help` shows no example"
