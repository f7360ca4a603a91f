"""Run ``dmlbench <args>`` (the real CLI) with a fake, fast train function: the subprocess driver of
the interrupt and cluster tests (``python tests/sweep_driver.py sweep --methods ...``).

The fake train function sleeps ``$SWEEP_EPOCH_S`` seconds per epoch (default 1), saves a resumable
checkpoint every epoch, reports a quality derived from the sampled parameters, and logs
``start|epoch|end <dataset> <trial id> <epoch> <unix time>`` lines (start: the epoch of the
checkpoint it resumes from, 0 for none) to ``$SWEEP_LOG`` (when set), so a
test can tell which cells started, when, and whether a trial resumed from its checkpoint.

This file runs as ``__main__``, so cloudpickle ships the train function by value to the Ray
workers (of a local Ray or of a ``ray start`` cluster) and nothing needs installing there.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any


def _log(what: str, cfg: Any, epoch: int) -> None:
    path = os.environ.get("SWEEP_LOG")
    if not path:
        return
    trial = Path(cfg.output_dir).parent.name.split("_")[2]  # run_trial_<id>_...
    with open(path, "a") as fh:
        fh.write(f"{what} {cfg.dataset} {trial} {epoch} {time.time():.3f}\n")


def fake_train(cfg: Any, report: Any) -> Any:
    ck = Path(cfg.output_dir) / "checkpoints"
    start = int((ck / "last.pt").read_text()) if (ck / "last.pt").exists() else 0
    _log("start", cfg, start)
    digest = hashlib.sha256(repr(sorted(cfg.params.items())).encode()).digest()
    quality = 0.1 + 0.8 * digest[0] / 255
    for epoch in range(start + 1, cfg.epochs + 1):
        time.sleep(float(os.environ.get("SWEEP_EPOCH_S", "1")))
        ck.mkdir(parents=True, exist_ok=True)
        (ck / "last.pt").write_text(str(epoch))
        report(epoch, {"map_at_r": quality}, str(ck))
        _log("epoch", cfg, epoch)
    _log("end", cfg, cfg.epochs)
    if os.environ.get("SWEEP_FAIL"):  # every trial fails (a job whose trials all fail)
        raise RuntimeError("fake training failure")
    return SimpleNamespace(metrics={"map_at_r": quality}, eval_split="val", best_epoch=cfg.epochs,
                           epochs_run=cfg.epochs, steps=cfg.epochs, wall_time_s=1.0, split_hash="h",
                           pretrained_id="none", test_metrics={"map_at_r": quality})  # fmt: skip


def main(argv: list[str]) -> None:
    from dmlbench.orchestrator import sweep

    sweep.run = functools.partial(sweep.run, train_fn=fake_train)  # the CLI looks it up at call time
    from dmlbench.cli import main as cli_main

    sys.argv = ["dmlbench", *argv]
    cli_main()


if __name__ == "__main__":
    main(sys.argv[1:])
