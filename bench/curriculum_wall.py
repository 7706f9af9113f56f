"""Wall time of the tiny curriculum, and the share of it spent outside the stage jobs.

    python bench/curriculum_wall.py [--config configs/tiny.yaml] [--set key=value ...] [--keep]

Runs ``arr-coc curriculum`` exactly as a user does (a subprocess, Prefect's embedded server,
the local MLflow sqlite store) in a fresh run root and a fresh ``PREFECT_HOME``, so no stage is
cached. The one-time creation of Prefect's database (``prefect server database upgrade``, what
a user's first run ever on a machine pays once) is done and timed first, and reported apart as
``prefect_db_setup_s``. Measured in the run itself:

* ``total_s``: the command's wall time, process start to exit (imports, Prefect server start,
  sharding, every stage job, evaluation, report, model registration);
* ``stage_jobs_s``: the sum of the stage jobs' own wall times (each a subprocess: its start-up,
  engine build, training, checkpoints, export), read from the run's ``report/summary.json``;
* ``shard_s``: writing the WebDataset shards (data work, not orchestration);
* ``outside_s = total_s - stage_jobs_s - shard_s``: Prefect, MLflow and the hand-off between
  stages; ``outside_share = outside_s / total_s``.

Targets: ``total_s <= 600`` on this 2-core machine and ``outside_share <= 0.10``. Ends with
one JSON line: figures, targets and ``pass``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET_TOTAL_S = 600.0
TARGET_OUTSIDE_SHARE = 0.10


def arr_coc_command() -> list[str]:
    """The installed console script next to this interpreter, else the module."""
    script = Path(sys.executable).with_name("arr-coc")
    return [str(script)] if script.exists() else [sys.executable, "-m", "arr_coc.cli"]


def bench_env(work: Path) -> dict[str, str]:
    env = dict(os.environ, PREFECT_HOME=str(work / "prefect"))
    env.pop("PREFECT_API_URL", None)  # the embedded server, as `make curriculum` uses
    env.pop("MLFLOW_TRACKING_URI", None)  # the run directory's sqlite store
    return env


def prefect_db_setup(work: Path) -> float:
    """Create and migrate the fresh PREFECT_HOME's database; returns the seconds it took."""
    prefect = Path(sys.executable).with_name("prefect")
    started = time.perf_counter()
    subprocess.run([str(prefect), "server", "database", "upgrade", "-y"], env=bench_env(work),
                   check=True, capture_output=True)
    return time.perf_counter() - started


def run(config: str, overrides: list[str], work: Path) -> tuple[float, list[dict]]:
    """The command's wall time and the stage rows of the run's report."""
    env = bench_env(work)
    command = [*arr_coc_command(), "curriculum", "--config", config, "--set", f"run.root={work / 'runs'}"]
    for item in overrides:
        command += ["--set", item]
    started = time.perf_counter()
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    total = time.perf_counter() - started
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"arr-coc curriculum exited {proc.returncode}")
    summaries = list((work / "runs").glob("*/report/summary.json"))
    if len(summaries) != 1:
        raise SystemExit(f"expected one report/summary.json under {work / 'runs'}, found {len(summaries)}")
    return total, json.loads(summaries[0].read_text())["stages"]


def figures(total: float, rows: list[dict]) -> dict:
    ran = [r for r in rows if r["stage"] != "shard"]
    not_ran = [r["stage"] for r in ran if r["status"] != "ran"]
    if not_ran:  # a cached stage would hide its cost and flatter the share
        raise SystemExit(f"stages did not run (status != ran): {not_ran}")
    stage_jobs = sum(float(r["wall_s"]) for r in ran)
    shard = sum(float(r["wall_s"]) for r in rows if r["stage"] == "shard")
    outside = total - stage_jobs - shard
    result = {
        "total_s": total,
        "stage_jobs_s": stage_jobs,
        "shard_s": shard,
        "outside_s": outside,
        "outside_share": outside / total,
        "per_stage_s": {r["stage"]: float(r["wall_s"]) for r in ran},
        "target_total_s": TARGET_TOTAL_S,
        "target_outside_share": TARGET_OUTSIDE_SHARE,
    }
    result["pass"] = total <= TARGET_TOTAL_S and result["outside_share"] <= TARGET_OUTSIDE_SHARE
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--keep", action="store_true", help="keep the run directory")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="curriculum-wall-"))
    try:
        setup = prefect_db_setup(work)
        result = figures(*run(args.config, args.overrides, work))
        result["prefect_db_setup_s"] = setup
    finally:
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(f"one-time Prefect database setup (not in the run): {result['prefect_db_setup_s']:.1f} s")
    print(f"{'part':<36}{'seconds':>10}{'share':>8}")
    for stage, seconds in result["per_stage_s"].items():
        print(f"{'  stage job ' + stage:<36}{seconds:>10.1f}{seconds / result['total_s']:>8.1%}")
    for name, key in (("shard", "shard_s"), ("outside (Prefect, MLflow, hand-off)", "outside_s"),
                      ("total", "total_s")):
        print(f"{name:<36}{result[key]:>10.1f}{result[key] / result['total_s']:>8.1%}")
    print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in result.items()}))


if __name__ == "__main__":
    main()
