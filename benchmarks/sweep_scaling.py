"""`qbench sweep` scaling, side by side in one run: 1 local worker against 2, and a local Ray
cluster against the local pool, on the same grid and utterances.

The grid is rtn at 8 and 4 bits x groups of 64 and 128 (`--points K` takes the first K), on the
first N sorted test-clean utterances (`--utterances N`, default 200), without a device budget
(batches of 8), two shards per point in every configuration (the same tasks everywhere), one
thread per task. The points are quantized once, up front (timed on its own and printed); each
configuration then sweeps the quantized models (`RunSpec(artifact=...)`: the prepare task
reads the artifact, no plugin runs) into a fresh folder of its own, so nothing is resumed from
another configuration. A configuration's wall time is the whole sweep: starting the workers,
loading the weights, preparing, evaluating and merging. The Ray cluster is started before its
timing begins (the engine a cluster user already runs); its workers are not.

    python benchmarks/sweep_scaling.py [--utterances 200] [--points 4] [--no-ray]

Targets (issue 15): 2 workers at least 1.7x faster than 1 on a 2-core machine; Ray within 10 %
of the local pool. Run it on a quiet machine: `uptime`'s load average is printed before and
after. Every configuration must give the same hypotheses (checked, and printed).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from qbench.run import RunSpec, quantize_to_artifact
from qbench.sweep.local import LocalExecutor
from qbench.sweep.progress import SilentSweepProgress
from qbench.sweep.runner import SweepOutcome, run_sweep

GRID = [{"bits": 8, "group_size": 64}, {"bits": 8, "group_size": 128}, {"bits": 4, "group_size": 64},
        {"bits": 4, "group_size": 128}]
SHARDS = 2


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError) as exc:
        return f"(uptime unavailable: {exc})"


def quantize(points: int, folder: Path) -> tuple[list[Path], float]:
    """The grid's first `points` quantized once, on one thread; their artifacts and the seconds."""
    t0 = time.perf_counter()
    paths = []
    for config in GRID[:points]:
        spec = RunSpec(plugin="rtn", config=config, threads=1)
        path, _ = quantize_to_artifact(spec, folder / f"{spec.label}.safetensors")
        paths.append(path)
    return paths, time.perf_counter() - t0


def sweep(name: str, artifacts: list[Path], utterances: int, executor, root: Path) -> tuple[SweepOutcome, float]:
    out = root / name  # a fresh folder per configuration: nothing resumed
    specs = [RunSpec(artifact=str(a), limit=utterances, device="none", threads=1,
                     output=str(out / "points" / f"{a.stem}.json")) for a in artifacts]
    t0 = time.perf_counter()
    try:
        outcome = run_sweep(name, specs, out, executor, SHARDS, 1, SilentSweepProgress())
    finally:
        executor.close()
    wall = time.perf_counter() - t0
    failed = outcome.failed
    if failed:
        raise SystemExit(f"{name}: {len(failed)} points failed, the first: {failed[0].record.reason}")
    return outcome, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--utterances", type=int, default=200, help="first N sorted test-clean utterances")
    parser.add_argument("--points", type=int, default=4, choices=range(1, len(GRID) + 1), help="grid points (rtn)")
    parser.add_argument("--no-ray", action="store_true", help="leave out the Ray configuration")
    args = parser.parse_args()

    print(f"load at start: {uptime()}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        artifacts, quantize_seconds = quantize(args.points, root / "artifacts")
        runs: list[tuple[str, int, SweepOutcome, float]] = []
        for workers in (1, 2):
            outcome, wall = sweep(f"local-{workers}", artifacts, args.utterances, LocalExecutor(workers), root)
            runs.append((f"local pool, {workers} worker{'s' if workers > 1 else ''}", workers, outcome, wall))
        if not args.no_ray:
            import ray

            from qbench.sweep.ray_executor import RayExecutor

            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
            try:
                outcome, wall = sweep("ray-2", artifacts, args.utterances, RayExecutor(), root)
            finally:
                ray.shutdown()
            runs.append(("local Ray cluster, 2 CPUs", 2, outcome, wall))

    base = runs[0][3]
    labels = ", ".join(f"{c['bits']}b g{c['group_size']}" for c in GRID[: args.points])
    print(f"\n{args.points} points (rtn {labels}) x "
          f"{args.utterances} test-clean utterances, up to {SHARDS} shards per point (whole batches of 8: one shard for "
          "8 utterances or fewer), 1 thread per task, device none")
    print(f"quantized once up front (not in the times below; artifacts reused by every configuration): "
          f"{quantize_seconds:.1f} s for {args.points} points")
    header = f"{'configuration':<28} {'tasks at once':>13} {'wall s':>8} {'utt/s':>7} {'model s/utt':>11} {'vs 1 worker':>11}"
    print(header)
    print("-" * len(header))
    for label, workers, outcome, wall in runs:
        results = [p.result for p in outcome.points]
        n = sum(len(r.utterances) for r in results)
        model = sum(r.metrics.wall_seconds for r in results)
        print(f"{label:<28} {workers:>13} {wall:>8.1f} {n / wall:>7.2f} {model / n:>11.3f} {base / wall:>10.2f}x")
    local2 = runs[1][3]
    print(f"\nspeedup, 2 local workers against 1: {base / local2:.2f}x (target >= 1.7x)")
    if not args.no_ray:
        ray_wall = runs[2][3]
        print(f"Ray overhead against the 2-worker local pool: {100 * (ray_wall / local2 - 1):+.1f} % (target within 10 %)")
    digests = {tuple(p.result.hypotheses_sha256 for p in outcome.points) for _, _, outcome, _ in runs}
    print(f"same hypotheses in every configuration: {'yes' if len(digests) == 1 else 'NO'}")
    one = runs[0][2].points
    audio = sum(p.result.metrics.audio_seconds for p in one)
    model = sum(p.result.metrics.wall_seconds for p in one)
    print(f"1-worker model time: {model / sum(len(p.result.utterances) for p in one):.3f} s per utterance, "
          f"{model / audio:.4f} s per audio second (RTFx {audio / model:.1f}) on 1 thread")
    print(f"load at end: {uptime()}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
