"""``--storage s3://...`` end to end against a local S3-compatible server (moto's server mode on a
loopback port, fake credentials in the driver's environment only): a sweep writes Tune's state and
checkpoints to the bucket, the driver is killed mid-trial (SIGKILL of its process group) at the worst
moment (the state in the bucket names a checkpoint Tune has already replaced and deleted), and the
same command resumes from the bucket: the half-trained trial continues after its newest checkpoint,
no finished trial runs again, no row is duplicated.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from dmlbench.methods.base import Method, MethodParams
from tests.fixtures import fake_trials
from tests.fixtures.fake_trials import fold_test_embedding

pytestmark = pytest.mark.slow
moto_server = pytest.importorskip("moto.server")
EPOCHS = 4


class S3Params(MethodParams):
    quality: float = 0.5


class S3Method(Method):
    name = "fake_s3"
    Params = S3Params


def register() -> None:
    from dmlbench.methods.base import METHODS

    if "fake_s3" not in METHODS:
        METHODS.register("fake_s3")(S3Method)


def s3_train(cfg: Any, report: Any) -> Any:
    from ray import tune

    ck = Path(cfg.output_dir) / "checkpoints"
    start = int((ck / "last.pt").read_text()) if (ck / "last.pt").exists() else 0
    with Path(os.environ["S3_LOG"]).open("a") as fh:
        fh.write(f"start {tune.get_context().get_trial_id()} {start + 1}\n")
    hold = Path(os.environ["S3_LOG"]).with_name("hold")
    for epoch in range(start + 1, cfg.epochs + 1):
        time.sleep(1.5)
        while epoch == 2 and hold.exists():  # the test holds a trial after its first checkpoint
            time.sleep(0.1)
        ck.mkdir(parents=True, exist_ok=True)
        (ck / "last.pt").write_text(str(epoch))
        report(epoch, {"map_at_r": float(cfg.params["quality"]) * epoch / cfg.epochs}, str(ck))
    q = float(cfg.params["quality"])
    return SimpleNamespace(metrics={"map_at_r": q}, test_metrics={"map_at_r": q} if cfg.phase == "final" else None,
                           eval_split="test" if cfg.phase == "final" else "val", best_epoch=cfg.epochs,
                           epochs_run=cfg.epochs, steps=cfg.epochs, wall_time_s=1.0, split_hash="h",
                           pretrained_id="none",
                           test_embedding=fold_test_embedding(cfg) if cfg.phase == "final" else None)  # fmt: skip


def make_spec(out: str) -> Any:
    from dmlbench.orchestrator.spec import SweepSpec

    return SweepSpec(methods=("fake_s3",), datasets=("digits",), backbones=("tiny",), trials=3, epochs=EPOCHS,
                     grace_period=EPOCHS, final_seeds=1, folds=2, search_folds=1, max_concurrent=1, output=out, name="s3",
                     storage="s3://dml-bucket/sweeps", trial_base={"pretrained": False},
                     checkpoint_every_epochs=1)  # fmt: skip


def _starts(log: Path) -> list[tuple[str, int]]:
    if not log.exists():
        return []
    return [(ln.split()[1], int(ln.split()[2])) for ln in log.read_text().splitlines() if ln.startswith("start")]


def test_s3_storage_sweep_kill_resume(tmp_path: Path) -> None:
    import boto3

    from dmlbench.orchestrator.spec import experiment_name, sweep_experiment_name
    from dmlbench.orchestrator.sweepdir import read_progress
    from dmlbench.results import schema, store

    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    creds = {"AWS_ACCESS_KEY_ID": "dmlbench-test", "AWS_SECRET_ACCESS_KEY": "dmlbench-test-secret",
             "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1",
             "AWS_ENDPOINT_URL": f"http://{host}:{port}"}  # fmt: skip
    s3 = boto3.client("s3", endpoint_url=creds["AWS_ENDPOINT_URL"], region_name="us-east-1",
                      aws_access_key_id=creds["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=creds["AWS_SECRET_ACCESS_KEY"])  # fmt: skip
    s3.create_bucket(Bucket="dml-bucket")
    spaces = tmp_path / "spaces"
    spaces.mkdir()
    (spaces / "fake_s3.yaml").write_text("method: fake_s3\nparams:\n  - {name: quality, type: float, low: 0.1, high: 0.9}\n")
    out, log = tmp_path / "out", tmp_path / "starts.log"
    path = os.pathsep.join([str(Path(__file__).parent), str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, **creds, "S3_LOG": str(log),
           "PYTHONPATH": path}  # fmt: skip
    temps = [tempfile.mkdtemp(prefix="r3", dir="/tmp") for _ in range(2)]
    cmd = [sys.executable, __file__, str(out), str(spaces)]
    try:
        first = tmp_path / "driver1.log"
        with first.open("w") as fh:
            proc = subprocess.Popen([*cmd, temps[0]], env=env, start_new_session=True, stdout=fh,
                                    stderr=subprocess.STDOUT)  # fmt: skip
        spec = make_spec(str(out))
        from dmlbench.search_spaces import loader

        old_spaces, loader.SPACES_DIR = loader.SPACES_DIR, spaces  # the spaces are part of the sweep id
        try:
            exp = experiment_name(spec, spec.cells()[0])  # the search's progress file
            prefix = f"sweeps/s3/tune/{sweep_experiment_name(spec)}/"  # the sweep's Tune experiment
        finally:
            loader.SPACES_DIR = old_spaces
        rows = out / "s3" / "rows"

        def objects() -> dict[str, Any]:
            return {o["Key"]: o for o in s3.list_objects_v2(Bucket="dml-bucket", Prefix=prefix).get("Contents", [])}

        def checkpoints_of(trial: str, objs: dict[str, Any]) -> list[str]:
            return sorted({k.split("/")[-2] for k in objs if f"_{trial}_" in k and "/checkpoint_" in k})

        def names(state: bytes, trial: str, checkpoint: str) -> bool:
            """Whether an experiment state (JSON with Tune's objects as hex of their pickles) names
            the trial's checkpoint."""
            needle = f"_{trial}_".encode(), f"/{checkpoint}".encode()
            blobs = [bytes.fromhex(h.decode()) for h in re.findall(rb"[0-9a-f]{64,}", state) if len(h) % 2 == 0]
            return any(all(n in b for n in needle) and b.find(needle[1], b.find(needle[0])) > 0 for b in blobs)

        # The unlucky moment of a real kill, made certain: the experiment state in the bucket still
        # names a trial's previous checkpoint, which Tune deleted when it registered the next one (the
        # worker uploads a checkpoint before the driver hears of it; the driver syncs its state every
        # ~2 s). Once a search trial has ended, the next one is held at its epoch 2 until the state
        # in the bucket names its first checkpoint; that state is kept, the trial goes on to its
        # second checkpoint (the first deleted; a slow driver may let a third land too), the driver
        # is killed, the kept state put back.
        hold = log.with_name("hold")
        half, stale = None, None
        deadline = time.time() + 300
        try:
            while time.time() < deadline and proc.poll() is None:
                objs = objects()
                if half is None:
                    if list(rows.glob("*.parquet")):
                        hold.touch()
                    running = read_progress(out / "s3", exp).get("running") or {}
                    mid = [t for t, r in running.items() if r.get("epoch", 0) == 1]
                    state = [k for k in objs if "/experiment_state-" in k]
                    if hold.exists() and mid and checkpoints_of(mid[0], objs) == ["checkpoint_000000"] and state:
                        body = s3.get_object(Bucket="dml-bucket", Key=state[0])["Body"].read()
                        if names(body, mid[0], "checkpoint_000000"):
                            half, stale = mid[0], (state[0], body)
                            hold.unlink()
                elif checkpoints_of(half, objs)[:1] not in ([], ["checkpoint_000000"]):  # the first one deleted
                    break
                time.sleep(0.2)
            assert stale is not None and checkpoints_of(half, objects())[:1] not in ([], ["checkpoint_000000"]), (
                f"no half-trained trial in time: {first.read_text()[-3000:]}")  # fmt: skip
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            hold.unlink(missing_ok=True)
        s3.put_object(Bucket="dml-bucket", Key=stale[0], Body=stale[1])
        killed = time.time()
        done_before = {p.stem for p in rows.glob("*.parquet") if p.stat().st_mtime < killed - 6}
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket="dml-bucket", Prefix="sweeps/s3/tune/").get("Contents", [])]
        assert any("experiment_state" in k for k in keys), keys[:20]  # Tune's state is in the bucket
        assert any("/checkpoint_" in k and k.endswith("last.pt") for k in keys), keys[:20]
        # the kill came in the search (a search trial was half-trained), so no final trial had started
        assert not any(k.endswith("best.pt") for k in keys), "best.pt left the worker in a search"

        res = subprocess.run([*cmd, temps[1]], env=env, capture_output=True, text=True, timeout=400,
                             start_new_session=True, check=False)  # fmt: skip
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    finally:
        server.stop()
        for t in temps:
            shutil.rmtree(t, ignore_errors=True)
    df, warnings = store.read_rows(out)
    assert warnings == [] and len(df) == 6 and df[schema.ROW_ID].is_unique  # 3 search, 2 fold models + concat
    assert set(df[schema.STATUS]) == {"complete"}, df.loc[df[schema.STATUS] != "complete", schema.ERROR].tolist()
    assert (df[schema.CHECKPOINT_BYTES] > 0).all()
    starts = _starts(log)
    for row_id in done_before:  # trials finished well before the kill did not run again
        trial = row_id.split("-search-")[-1]
        assert [s for s in starts if s[0] == trial] == [(trial, 1)], starts
    # the half-trained trial continued from its newest checkpoint in the bucket (epoch 2, or 3 when
    # its next one landed before the kill), not from the deleted one the state named (epoch 1)
    again = [e for t, e in starts if t == half]
    assert len(again) == 2 and again[0] == 1 and again[1] >= 3, starts


def driver(out: str, spaces: str, temp: str) -> None:
    from dmlbench.orchestrator import sweep
    from dmlbench.search_spaces import loader

    loader.SPACES_DIR = Path(spaces)
    fake_trials.start_ray(sys.modules[__name__], register, temp, env_vars={"S3_LOG": os.environ["S3_LOG"]})
    sweep.run(make_spec(out), train_fn=s3_train, echo=print)


if __name__ == "__main__":
    driver(sys.argv[1], sys.argv[2], sys.argv[3])
