"""Safety: no code runs from files a user is handed, the dashboard stays local, submit uploads no secrets.

* checkpoints load with ``weights_only=True``: a checkpoint holding a pickled object is refused
  with a :class:`CheckpointError` and the object's code never runs (a control load without
  ``weights_only`` shows the payload is real);
* YAML is read only through ``yaml.safe_load`` (an AST scan of the package) and a Python tag in a
  config or search-space file is one :class:`ConfigError` sentence;
* no ``pickle.load``, ``pd.read_pickle``, ``np.load`` without ``allow_pickle=False`` and no
  ``torch.load`` without ``weights_only=True`` anywhere in the package (AST scan);
* the local Ray dashboard is off and bound to 127.0.0.1 unless ``--dashboard-host`` asks otherwise;
* ``dmlbench submit`` builds a runtime_env whose excludes keep data, results and secret files out
  of the upload: checked by running Ray's own packaging matcher over a fake project tree.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

import dmlbench
from dmlbench.cli import app
from dmlbench.errors import CheckpointError, ConfigError

PACKAGE = Path(dmlbench.__file__).parent


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def test_pickled_checkpoint_is_refused_and_never_runs(tmp_path: Path) -> None:
    from dmlbench.engine.trainer import load_checkpoint

    marker = tmp_path / "PWNED"
    path = tmp_path / "last.pt"
    torch.save({"format": 1, "config": {"method": "x"}, "extra": _Payload(marker)}, path)
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(path)
    assert not marker.exists()
    # control: an unsafe load does run the payload, so the refusal above is what protected us
    torch.load(path, weights_only=False)
    assert marker.exists()


def _calls(tree: ast.AST) -> list[tuple[str, ast.Call]]:
    """``(dotted name, node)`` of every call in a module, e.g. ``("yaml.load", node)``."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            parts, f = [], node.func
            while isinstance(f, ast.Attribute):
                parts.append(f.attr)
                f = f.value
            if isinstance(f, ast.Name):
                parts.append(f.id)
            out.append((".".join(reversed(parts)), node))
    return out


def _kw(node: ast.Call, name: str) -> Any:
    for kw in node.keywords:
        if kw.arg == name and isinstance(kw.value, ast.Constant):
            return kw.value.value
    return "<missing>"


def test_package_loads_nothing_unsafely() -> None:
    problems = []
    sources = sorted(PACKAGE.rglob("*.py"))
    assert len(sources) > 20
    for src in sources:
        text = src.read_text()
        for bad in ("FullLoader", "UnsafeLoader", "unsafe_load", "yaml.Loader", "read_pickle", "import pickle",
                    "cloudpickle.load", "joblib.load"):  # fmt: skip
            if bad in text:
                problems.append(f"{src}: {bad}")
        for name, node in _calls(ast.parse(text)):
            where = f"{src.relative_to(PACKAGE)}:{node.lineno} {name}"
            if name in (
                "yaml.load",
                "yaml.load_all",
                "pickle.load",
                "pickle.loads",
                "marshal.loads",
                "eval",
                "exec",
            ):
                problems.append(where)
            elif name == "torch.load" and _kw(node, "weights_only") is not True:
                problems.append(where + " without weights_only=True")
            elif name in ("np.load", "numpy.load") and _kw(node, "allow_pickle") is not False:
                problems.append(where + " without allow_pickle=False")
    assert problems == []


def test_the_scan_would_catch_an_unsafe_load(tmp_path: Path) -> None:
    calls = dict(
        _calls(ast.parse("import torch, yaml\ntorch.load(p)\nyaml.load(s)\nnp.load(p, allow_pickle=True)"))
    )
    assert set(calls) == {"torch.load", "yaml.load", "np.load"}
    assert _kw(calls["torch.load"], "weights_only") == "<missing>"
    assert _kw(calls["np.load"], "allow_pickle") is True


TAGGED = 'lr: !!python/object/apply:os.system ["touch {marker}"]\n'


def test_config_file_with_python_tag_is_one_sentence(tmp_path: Path) -> None:
    from dmlbench.engine.resolve import read_config_file

    path = tmp_path / "cfg.yaml"
    path.write_text(TAGGED.format(marker=tmp_path / "PWNED"))
    with pytest.raises(ConfigError) as info:
        read_config_file(path)
    assert "\n" not in str(info.value) and "not valid YAML" in str(info.value)
    assert not (tmp_path / "PWNED").exists()


def test_search_space_with_python_tag_is_one_sentence(tmp_path: Path) -> None:
    from dmlbench.search_spaces.loader import load_space_file

    path = tmp_path / "space.yaml"
    path.write_text("method: triplet\nparams:\n  - " + TAGGED.format(marker=tmp_path / "PWNED"))
    with pytest.raises(ConfigError, match="safe loading refuses") as info:
        load_space_file(path)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "PWNED").exists()


def test_trial_config_from_yaml_with_python_tag_is_a_config_error(tmp_path: Path) -> None:
    from dmlbench.config import TrialConfig

    with pytest.raises(ConfigError, match="cannot be read safely") as info:
        TrialConfig.from_yaml(TAGGED.format(marker=tmp_path / "PWNED"))
    assert "\n" not in str(info.value)
    assert not (tmp_path / "PWNED").exists()


# ---- Ray dashboard -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("host", "dashboard"),
    [(None, False), ("127.0.0.1", False), ("0.0.0.0", True)],
    ids=["default", "localhost", "asked-for-all-interfaces"],
)
def test_local_ray_dashboard_binds_to_localhost_unless_asked(
    host: str | None, dashboard: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ray

    from dmlbench.orchestrator import cluster
    from dmlbench.orchestrator.sweep import build_spec

    seen: dict[str, Any] = {}
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: seen.update(kw))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    spec = build_spec(methods="triplet", datasets="digits", dashboard_host=host)
    assert cluster.connect(spec) is True
    assert seen["dashboard_host"] == (host or "127.0.0.1")
    assert seen["include_dashboard"] is dashboard
    assert seen["address"] == "local"  # a private local Ray, never one found through Ray's pointer file


# ---- dmlbench submit -------------------------------------------------------------------------------
UPLOADED = ["pyproject.toml", "dmlbench/__init__.py", "dmlbench/cli/sweep.py", "README.md", "docs/cluster.md",
            "dmlbench/results/schema.py", "dmlbench/datasets/embedded.py", "tests/fixtures/data/x.txt"]  # fmt: skip
NEVER = [
    "results/sw1/rows/a.parquet", "results/leaderboard.parquet", "data/CUB_200_2011/images.txt",
    "datasets_cache/cub200-224/index.npy", ".env", ".env.local", "deploy/.env", "server.pem", "tls/server.key",
    "id_rsa", "id_ed25519.pub", "credentials.json", ".aws/credentials", ".netrc", ".git/config",
    ".venv/bin/python", "runs/ccp/checkpoints/last.pt", "model.ckpt", "notes/extra.parquet",
]  # fmt: skip


def test_submit_never_uploads_data_results_or_secrets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    from dmlbench.orchestrator import jobs

    for rel in UPLOADED + NEVER:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    submitted: dict[str, Any] = {}

    class FakeClient:
        def __init__(self, address: str, headers: dict[str, str]):
            submitted["address"] = address

        def submit_job(self, **kw: Any) -> str:
            submitted.update(kw)
            return "job-1"

    monkeypatch.setattr(jobs, "package_root", lambda: tmp_path)
    monkeypatch.setattr(jobs.cluster, "probe", lambda address: None)
    monkeypatch.setattr("ray.job_submission.JobSubmissionClient", FakeClient)
    args = ["sweep", "--methods", "triplet", "--datasets", "digits", "--preset", "smoke", "--output", "/srv/out"]
    result = CliRunner().invoke(app, ["submit", "--address", "http://head:8265", "--", *args])
    assert result.exit_code == 0, result.output
    assert "job-1" in result.output
    env = submitted["runtime_env"]
    assert Path(env["working_dir"]) == tmp_path
    assert submitted["entrypoint"].endswith("dmlbench.cli " + " ".join(args))

    uploaded: list[str] = []

    def keep(p: Path) -> None:
        if p.is_file():
            uploaded.append(str(p.relative_to(tmp_path)))

    # Ray's own matcher, with .gitignore files ignored: the excludes alone must keep everything out
    _dir_travel(tmp_path, [_get_excludes(tmp_path, env["excludes"])], keep, include_gitignore=False)
    assert sorted(uploaded) == sorted(UPLOADED)
