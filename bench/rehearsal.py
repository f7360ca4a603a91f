"""Full-size rehearsal on generated stand-ins: the data the preflight needs, then the preflight.

No benchmark can be downloaded on the machines dmlbench is tested on, so this proves the
full-size path on stand-ins (``tests/fixtures/standins.py``: the four benchmarks in their official
layouts with the real numbers of classes and images, 16x16 JPEGs):

1. builds the stand-ins once under ``--standins`` (reused while ``standins.json`` matches);
2. checks them like ``dmlbench datasets check all`` (full-size counts asserted at ``--scale 1``);
3. builds the decoded-image cache of each dataset for each ``--cache-sizes`` (what a trial's
   ``cached_table`` builds; reused by later trials and sweeps with the same cache folder) and prints
   build time and size on disk;
4. unless ``--data-only``: runs ``dmlbench sweep --methods nivmf,ccp,diva --datasets all --data-root
   <stand-ins> --preset smoke --allow-cpu --preflight`` (``--datasets`` as given; ``--subset`` below
   scale 1) with the same cache folder and prints its total time.

Run from the repository root::

    python bench/rehearsal.py --data-only                      # steps 1-3 at full size
    python bench/rehearsal.py --cache-sizes 224 --datasets cub200,cars196 --data-only
    python bench/rehearsal.py                                  # all four steps
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dmlbench.datasets import DATASETS  # noqa: E402
from dmlbench.datasets.cache import ensure_cache, stored_side  # noqa: E402
from dmlbench.datasets.checks import check_datasets  # noqa: E402
from tests.fixtures.standins import build, du  # noqa: E402

#: the smoke preset trains on CPU, which a benchmark sweep refuses without --allow-cpu (the preflight
#: applies the sweep's own resource checks)
PREFLIGHT = ["sweep", "--methods", "nivmf,ccp,diva", "--preset", "smoke", "--allow-cpu", "--preflight"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--standins", type=Path, default=Path("/work/standins"), help="stand-in data root (built if absent)")
    ap.add_argument("--scale", type=float, default=1.0, help="stand-in scale (1.0 = full size)")
    ap.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="writer processes / decoding threads")
    ap.add_argument("--datasets", default="cub200,cars196,sop,inshop")
    ap.add_argument("--cache-sizes", default="32", help="image sizes to build caches for (the smoke preset: 32)")
    ap.add_argument("--cache-dir", type=Path, default=None, help="default: <standins>/../<name>-cache")
    ap.add_argument("--data-only", action="store_true", help="stop after the caches (no preflight sweep)")
    args = ap.parse_args()
    names = [n for n in args.datasets.split(",") if n]
    cache_dir = args.cache_dir or args.standins.parent / f"{args.standins.name}-cache"

    start = time.perf_counter()
    manifest = build(args.standins, args.scale, workers=args.workers, names=names)
    print(f"[1] stand-ins in {args.standins} (scale {args.scale}; written once, then reused):")
    for name in names:
        info = manifest["datasets"][name]  # type: ignore[index]
        c = info["counts"]
        print(f"    {name:8s} {c['images']:>8,} images {c['classes']:>7,} classes   written in {info['seconds']:6.1f} s"
              f"   {info['disk_bytes'] / 2**20:7.1f} MiB on disk")

    t = time.perf_counter()
    checks = check_datasets(names, str(args.standins), expect_full=args.scale == 1.0)
    print(f"[2] datasets check ({time.perf_counter() - t:.1f} s):")
    for ch in checks:
        print(f"    {ch.name:8s} {ch.status:9s} {ch.message}  [{ch.path}, layout {ch.layout}]")
    if not all(ch.usable for ch in checks):
        return 1

    sizes = [int(s) for s in args.cache_sizes.split(",") if s]
    print(f"[3] decoded-image cache in {cache_dir}:")
    print(f"    {'dataset':8s} {'size':>4s} {'side':>4s} {'images':>8s} {'build s':>8s} {'MiB':>9s}  bytes/image")
    for name in names:
        table = DATASETS.get(name)(str(args.standins), expect_full=args.scale == 1.0).table()
        for size in sizes:
            t = time.perf_counter()
            folder, built = ensure_cache(table, name, size, cache_dir, workers=args.workers)
            secs = time.perf_counter() - t
            nbytes = du(folder)
            note = "" if built else "  (already built: reused)"
            print(f"    {name:8s} {size:4d} {stored_side(size):4d} {len(table):8,} {secs:8.1f} {nbytes / 2**20:9.1f}"
                  f"  {nbytes / len(table):,.0f}{note}")
    if args.data_only:
        print(f"total {time.perf_counter() - start:.1f} s")
        return 0

    every = set(names) == {"cub200", "cars196", "sop", "inshop"}
    cmd = [sys.executable, "-m", "dmlbench.cli", *PREFLIGHT, "--datasets", "all" if every else ",".join(names),
           "--data-root", str(args.standins), "--wide"]  # fmt: skip
    if args.scale != 1.0:
        cmd.append("--subset")  # a scaled set does not have the full-size counts
    out = Path(tempfile.mkdtemp(prefix="dmlbench-rehearsal-"))  # the preflight writes no rows; nothing lands in results/
    cmd += ["--output", str(out)]
    env = {**os.environ, "DMLBENCH_CACHE": str(cache_dir), "PYTHONPATH": str(ROOT)}
    print(f"[4] {' '.join(cmd[2:])}")
    t = time.perf_counter()
    rc = subprocess.call(cmd, cwd=ROOT, env={**env, "COLUMNS": env.get("COLUMNS", "200")})
    left = [p for p in out.rglob("*") if p.is_file()]
    shutil.rmtree(out, ignore_errors=True)
    if left:
        print(f"    the preflight wrote {len(left)} file(s) under its --output ({left[0]}); it must write none")
        rc = rc or 1
    print(f"    exit {rc} after {time.perf_counter() - t:.1f} s; total {time.perf_counter() - start:.1f} s")
    return rc


if __name__ == "__main__":
    sys.exit(main())
