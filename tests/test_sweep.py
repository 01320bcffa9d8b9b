"""`qbench sweep`: a grid of runs, sharded by utterance, merged into exactly a single run's result,
resumed after a kill, failing point by point, and retried on Ray when a worker dies.

The sweeps run on copies of the six shortest shared test-clean utterances (1.4-1.9 s) with rtn,
the real tiny.en and real worker processes: what is tested is what the processes do.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from qbench.cli import main
from qbench.journal import journal_path
from qbench.results import RunResult
from qbench.run import RunSpec, run_benchmark
from qbench.sweep.local import LocalExecutor, pool_size
from qbench.sweep.progress import SilentSweepProgress
from qbench.sweep.runner import journal_records, run_sweep
from qbench.sweep.spec import SweepSpec, SweepSpecError, parse_grid, read_sweep
from qbench.sweep.state import SweepLayout, SweepManifest, cut_shards
from tests.test_hostile_plugins import _plugin
from tests.test_resume import REPO, SHORT_IDS, copy_utterances, same_result


@pytest.fixture(scope="module")
def short_data(data_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("short")
    copy_utterances(data_dir, root, SHORT_IDS)
    return root


def single_run(spec: RunSpec, out: Path) -> dict:
    """What `qbench run --threads 1` of the point writes, run alone (the reference a merged point
    must equal). One thread, as the sweeps' tasks here: on a device the memory model counts the
    encoder windows a run works on at once, one per thread."""
    result = run_benchmark(spec.model_copy(update={"output": str(out), "threads": 1}))
    assert result.status == "complete", result.error
    return json.loads(out.read_text())


def same_point(merged: dict, single: dict) -> None:
    """A merged point equals the single run but for timing and memory measurements and the
    artifact's path (each writes its own, with the same digest)."""
    same_result(merged, single)
    skip = {"artifact_path", "seconds"}
    assert {k: v for k, v in merged["quantization"].items() if k not in skip} == \
           {k: v for k, v in single["quantization"].items() if k not in skip}
    for key in ("model", "dataset", "calibration", "activations", "warnings", "unscored", "devices_fitted", "status"):
        assert merged[key] == single[key], key


def same_device_records(merged: dict, single: dict) -> None:
    """The merged shards' device record is the single run's, but for its timing."""
    for key in ("fits", "batch_size", "batch_size_chosen", "batches", "breakdown", "profile"):
        assert merged[key] == single[key], key
    timing = {"wall_seconds", "macs_per_second"}
    assert {k: v for k, v in merged["compute"].items() if k not in timing} == \
           {k: v for k, v in single["compute"].items() if k not in timing}


# -- the grid --------------------------------------------------------------------------------------


def test_a_grid_expands_into_run_specs_one_point_per_identity(tmp_path):
    sweep = SweepSpec(name="g", base={"limit": 2, "device": "none"},
                      grid=parse_grid(["plugin=rtn,none", "bits=8,4", "policy.quantize_embeddings=false"]))
    specs = sweep.run_specs(tmp_path)
    # the float baseline takes no settings: its two combinations are one point
    assert [s.label for s in specs] == ["rtn_bits8", "rtn_bits4", "fp"]
    assert specs[0].config == {"bits": 8} and specs[2].plugin is None and specs[2].config == {}
    assert all(s.limit == 2 and s.device == "none" and not s.policy.quantize_embeddings for s in specs)
    assert [s.output_path for s in specs] == [tmp_path / f"whisper-tiny.en__test-clean__{s.label}.json" for s in specs]
    # a file says the same as the command line
    (tmp_path / "g.toml").write_text('[base]\nlimit = 2\ndevice = "none"\n[grid]\nplugin = ["rtn", "none"]\nbits = [8, 4]\n')
    assert [s.identity() for s in read_sweep(tmp_path / "g.toml").run_specs(tmp_path)] == [s.identity() for s in specs]
    # points that differ only where the file name does not show get the identity's start
    clash = SweepSpec(name="c", base={"plugin": "rtn"}, grid={"device": ["none", "pi-zero-2w"]}).run_specs(tmp_path)
    assert len({s.output_path for s in clash}) == 2 and all(s.identity()[:10] in str(s.output_path) for s in clash)
    assert parse_grid(["group_size=[64,128],null"]) == {"group_size": [[64, 128], None]}
    # README's example: 12 grid points and the float baseline
    example = read_sweep(REPO / "sweeps" / "rtn-gptq.toml").run_specs(tmp_path)
    assert len(example) == 13 and example[-1].plugin is None and {s.plugin for s in example[:-1]} == {"rtn", "gptq"}


@pytest.mark.parametrize("sweep, message", [
    (SweepSpec(name="g", base={"limit": 0}), r"^sweep g: point 1 \(limit=0\): limit: Input should be greater than or equal to 1"),
    (SweepSpec(name="g", grid={"output": ["x.json"]}), r"'output' is set by the sweep"),
    (SweepSpec(name="g", grid={"bits": []}), r"grid axis 'bits' has no values"),
])
def test_a_bad_point_is_one_line_naming_it(sweep, message, tmp_path):
    with pytest.raises(SweepSpecError, match=message) as exc:
        sweep.run_specs(tmp_path)
    assert "\n" not in str(exc.value)


def test_another_runs_result_at_a_points_file_fails_that_point_and_is_kept(tiny_en, short_data, tmp_path):
    out = tmp_path / "sweep"
    (spec,) = SweepSpec(name="f", base={"data_dir": str(short_data), "device": "none"}).run_specs(out / "points")
    spec.output_path.parent.mkdir(parents=True)
    spec.output_path.write_text('{"status": "complete"}')
    executor = LocalExecutor(1)
    try:
        outcome = run_sweep("f", [spec], out, executor, 1, 1, SilentSweepProgress())
    finally:
        executor.close()
    (point,) = outcome.points
    assert point.record.status == "failed" and "\n" not in point.record.reason
    assert str(spec.output_path) in point.record.reason and "without a run identity" in point.record.reason
    assert spec.output_path.read_text() == '{"status": "complete"}'


def test_shards_are_whole_batches_of_the_single_run():
    ids = [f"u{i}" for i in range(7)]
    assert cut_shards(ids, 2, 3) == [["u0", "u1", "u2", "u3"], ["u4", "u5"], ["u6"]]
    assert cut_shards(ids, 8, 4) == [ids]  # one batch: one shard
    for batch, shards in ((1, 3), (2, 2), (3, 5)):
        cut = cut_shards(ids, batch, shards)
        assert [u for s in cut for u in s] == ids
        assert all(len(s) % batch == 0 for s in cut[:-1])  # every boundary is a batch boundary


def test_the_pool_is_sized_to_cores_and_memory():
    spec = RunSpec()
    assert pool_size([spec], cores=8, available=64 * 2**30)[0] == 8
    one_worker = pool_size([spec], cores=8, available=2**30)
    assert one_worker[0] == 1 and "8 cores" in one_worker[1]


# -- merge equals a single run ---------------------------------------------------------------------


def test_merged_shards_equal_a_single_run(tiny_en, short_data, tmp_path):
    # batches of 2 in 3 shards: each shard a batch of the single run; on a device too, where
    # the shards' device records merge into the run's
    sweep = SweepSpec(name="merge", base={"data_dir": str(short_data), "batch_size": 2, "plugin": "rtn", "bits": 4},
                      grid={"device": ["none", "pi-zero-2w"]})
    specs = sweep.run_specs(tmp_path / "sweep" / "points")
    executor = LocalExecutor(2)
    try:
        outcome = run_sweep("merge", specs, tmp_path / "sweep", executor, 3, 1, SilentSweepProgress())
    finally:
        executor.close()
    assert [p.record.status for p in outcome.points] == ["complete", "complete"]
    for n, spec in enumerate(specs):
        layout = SweepLayout(tmp_path / "sweep")
        assert len(list(layout.work(spec).glob("shard-*.json"))) == 3
        merged = json.loads(spec.output_path.read_text())
        single = single_run(spec, tmp_path / f"single{n}.json")
        same_point(merged, single)
        if spec.device != "none":
            same_device_records(merged["device"], single["device"])
        # the merged file is the point's own result: `qbench run` of the spec takes it as complete
        before = spec.output_path.read_bytes()
        assert run_benchmark(spec).hypotheses_sha256 == merged["hypotheses_sha256"]
        assert spec.output_path.read_bytes() == before


# -- resume after a kill ---------------------------------------------------------------------------


def sweep_command(data: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "qbench.cli", "sweep", "--grid", "plugin=rtn", "bits=8,4", "--data-dir", str(data),
            "--device", "none", "--batch-size", "1", "--shards", "3", "--workers", "1", "--threads", "1",
            "--out", str(out), "-q"]


def shard_complete(path: Path) -> bool:
    try:
        return json.loads(path.read_text())["status"] == "complete"
    except (OSError, ValueError):
        return False


def test_a_sigkilled_sweep_resumes_without_recomputing_finished_points_or_shards(tiny_en, short_data, tmp_path):
    out = tmp_path / "sweep"
    first, second = SweepSpec(name="k", base={"data_dir": str(short_data), "device": "none", "batch_size": 1,
                                              "plugin": "rtn"}, grid={"bits": [8, 4]}).run_specs(out / "points")
    layout = SweepLayout(out)
    proc = subprocess.Popen(sweep_command(short_data, out), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    # one worker: the first point's shards, then the second point's plan and its first shard
    deadline = time.monotonic() + 240
    while not shard_complete(layout.shard(second, 0)):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the sweep never got there"
        time.sleep(0.01)
    workers = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    # the workers die with the sweep: no orphan goes on writing a shard
    gone, alive = psutil.wait_procs(workers, timeout=15)
    assert workers and not alive
    assert not shard_complete(layout.shard(second, 2))
    finished = [first.output_path, first.artifact_path, second.artifact_path, layout.plan(second),
                *[p for p in layout.work(first).glob("shard-*.json")], layout.shard(second, 0)]
    if shard_complete(layout.shard(second, 1)):
        finished.append(layout.shard(second, 1))
    stamps = {p: p.stat().st_mtime_ns for p in finished}

    rerun = subprocess.run(sweep_command(short_data, out), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming" in rerun.stderr and "1 of 2 points finished, 1 more prepared" in rerun.stderr
    assert {p: p.stat().st_mtime_ns for p in finished} == stamps  # nothing finished was written again
    manifest = SweepManifest.model_validate_json(layout.manifest.read_text())
    assert [p.status for p in manifest.points] == ["complete", "complete"]
    same_point(json.loads(second.output_path.read_text()), single_run(second, tmp_path / "single.json"))


def pool_worker() -> psutil.Process | None:
    """This process's local pool worker (a spawned interpreter that is not the resource tracker)."""
    for child in psutil.Process().children():
        cmdline = " ".join(child.cmdline())
        if "multiprocessing" in cmdline and "resource_tracker" not in cmdline:
            return child
    return None


def test_a_local_worker_killed_mid_shard_is_replaced_and_the_shard_resumes(tiny_en, short_data, tmp_path):
    out = tmp_path / "sweep"
    (spec,) = SweepSpec(name="w", base={"data_dir": str(short_data), "device": "none", "batch_size": 1, "limit": 4,
                                        "plugin": "rtn", "bits": 8}).run_specs(out / "points")
    journal = journal_path(SweepLayout(out).shard(spec, 0))
    executor = LocalExecutor(1)
    outcome: list = []
    sweep = threading.Thread(target=lambda: outcome.append(
        run_sweep("w", [spec], out, executor, 1, 1, SilentSweepProgress())), daemon=True)
    sweep.start()
    deadline = time.monotonic() + 240
    while journal_records(journal) < 1:
        assert sweep.is_alive() and time.monotonic() < deadline, "the shard never journaled"
        time.sleep(0.005)
    worker = pool_worker()
    worker.kill()
    killed_at = journal_records(journal)
    sweep.join(timeout=300)
    executor.close()
    assert not sweep.is_alive() and 1 <= killed_at < 4
    (point,) = outcome[0].points
    assert point.record.status == "complete", point.record.reason
    shard = RunResult.read(SweepLayout(out).shard(spec, 0))
    assert shard.resumed_utterances >= killed_at and len(shard.utterances) == 4


# -- failures are per point ------------------------------------------------------------------------


def test_a_crashing_hanging_or_unknown_plugin_fails_its_point_and_the_sweep_goes_on(
        tiny_en, short_data, tmp_path, install_plugin, capsys):
    _plugin(install_plugin, "broken", "import os; os._exit(3)")
    _plugin(install_plugin, "sleepy", "import time; time.sleep(600)")
    out = tmp_path / "sweep"
    code = main(["sweep", "--grid", "plugin=broken,rtn,sleepy,nosuch", "--limit", "2", "--data-dir", str(short_data),
                 "--device", "none", "--plugin-timeout", "3", "--workers", "2", "--threads", "1", "--out", str(out), "-q"])
    captured = capsys.readouterr()
    assert code == 1, captured.err
    reasons = {line.split(" failed: ")[0].removeprefix("point "): line.split(" failed: ")[1]
               for line in captured.err.splitlines() if " failed: " in line}
    assert reasons.keys() == {"whisper-tiny.en__test-clean__broken", "whisper-tiny.en__test-clean__sleepy",
                              "whisper-tiny.en__test-clean__nosuch"}, captured.err
    assert "plugin 'broken' failed on layer 'encoder.conv1'" in reasons["whisper-tiny.en__test-clean__broken"]
    assert "exited (status 3)" in reasons["whisper-tiny.en__test-clean__broken"]
    assert "did not answer within 3 s" in reasons["whisper-tiny.en__test-clean__sleepy"]
    assert "nosuch" in reasons["whisper-tiny.en__test-clean__nosuch"]
    assert "3 of 4 points failed" in captured.err
    # the summary comes before the exit status, and the finished point is whole
    assert "rtn" in captured.out and captured.out.count("failed") >= 3
    manifest = SweepManifest.model_validate_json((out / "sweep.json").read_text())
    assert {p.label: p.status for p in manifest.points} == {"broken": "failed", "rtn": "complete", "sleepy": "failed",
                                                            "nosuch": "failed"}
    assert all("\n" not in (p.reason or "") for p in manifest.points)
    rtn = RunResult.read(out / "points" / "whisper-tiny.en__test-clean__rtn.json")
    assert rtn.status == "complete" and len(rtn.utterances) == 2
    assert (out / "pareto__whisper-tiny.en__test-clean.svg").exists()


# -- Ray: a worker killed in the middle is retried ------------------------------------------------


def ray_worker(title: str) -> psutil.Process | None:
    """The Ray worker process running the task named `title` (Ray titles it `ray::<name>`)."""
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if cmdline.startswith(f"ray::{title}"):
            return proc
    return None


def test_a_ray_worker_killed_mid_shard_is_retried_and_the_result_is_the_same(tiny_en, short_data, tmp_path):
    ray = pytest.importorskip("ray")
    from qbench.sweep.ray_executor import RayExecutor

    out = tmp_path / "sweep"
    (spec,) = SweepSpec(name="ray", base={"data_dir": str(short_data), "device": "none", "batch_size": 1,
                                          "plugin": "rtn", "bits": 4}).run_specs(out / "points")
    layout = SweepLayout(out)
    journal = journal_path(layout.shard(spec, 0))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        executor = RayExecutor()
        outcome: list = []
        sweep = threading.Thread(target=lambda: outcome.append(
            run_sweep("ray", [spec], out, executor, 2, 1, SilentSweepProgress())), daemon=True)
        sweep.start()
        title = f"qbench-shard:{spec.output_path.stem}:0"
        deadline = time.monotonic() + 240
        worker = None
        while worker is None:
            assert sweep.is_alive() and time.monotonic() < deadline, "the shard never started"
            worker = ray_worker(title)
            time.sleep(0.02)
        while journal_records(journal) < 1:  # a batch is journaled: the kill lands in the middle
            assert time.monotonic() < deadline, "the shard never journaled"
            time.sleep(0.005)
        os.kill(worker.pid, signal.SIGKILL)
        killed_at = journal_records(journal)
        sweep.join(timeout=300)
        assert not sweep.is_alive()
        executor.close()
    finally:
        ray.shutdown()
    assert 1 <= killed_at < 3
    (point,) = outcome[0].points
    assert point.record.status == "complete", point.record.reason
    retried = RunResult.read(layout.shard(spec, 0))
    # the retry resumed from the journal the killed attempt left: what it had done was kept
    assert retried.status == "complete" and retried.resumed_utterances >= killed_at
    same_point(json.loads(spec.output_path.read_text()), single_run(spec, tmp_path / "single.json"))


def test_a_wav2vec2_sweep_merges_into_its_single_run(seeded_wav2vec2, data_dir, short_data, tmp_path):
    # the same sharding, merge and device records for the CTC model (seeded weights of the real
    # base-960h config, shrunk: see conftest.py), with a calibrated plugin, whose statistics
    # are gathered once in the point's preparation and never again in a shard
    sweep = SweepSpec(name="w2v2", base={"model": "wav2vec2-base-960h", "weights": str(seeded_wav2vec2),
                                         "data_dir": str(short_data), "batch_size": 2, "calibration_limit": 2,
                                         "calibration_data_dir": str(data_dir)},
                      grid={"plugin": ["rtn", "gptq"], "bits": [4], "device": ["none", "pi-zero-2w"]})
    specs = sweep.run_specs(tmp_path / "sweep" / "points")
    assert len(specs) == 4
    executor = LocalExecutor(2)
    try:
        outcome = run_sweep("w2v2", specs, tmp_path / "sweep", executor, 3, 1, SilentSweepProgress())
    finally:
        executor.close()
    assert [p.record.status for p in outcome.points] == ["complete"] * 4, [p.record.reason for p in outcome.points]
    for n, spec in enumerate(specs):
        merged = json.loads(spec.output_path.read_text())
        assert merged["model"]["architecture"] == "wav2vec2"
        assert len(list(SweepLayout(tmp_path / "sweep").work(spec).glob("shard-*.json"))) == 3
        single = single_run(spec, tmp_path / f"single{n}.json")
        same_point(merged, single)
        if spec.device != "none":
            same_device_records(merged["device"], single["device"])
