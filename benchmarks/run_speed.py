"""`qbench run` as a whole process, side by side in one run: the default device, no device, and
faster-whisper float32 on the same utterances.

What a newcomer waits for is the whole command: interpreter start, imports, loading the
weights, reading the audio, the device's checks and measurements, scoring and writing the
result. Each system runs as its own subprocess and is timed from outside (wall seconds of the
subprocess); the model's own wall time is read from what the process wrote (`metrics.wall_seconds`
of the result file for qbench, the timed transcription loop for faster-whisper). Systems:

* `default`: `qbench run --limit N` (device pi-zero-2w, the batch size the device chooses);
* `none`: `qbench run --limit N --device none` (batch 8, no budget);
* `fw-f32`: faster-whisper / CTranslate2 float32 (`qbench.peers.faster_whisper`) on the same
  CTranslate2 directory, the same audio loader and the same scoring, cpu_threads = the cores.

    python benchmarks/run_speed.py [--limits 20 200] [--rounds 1] [--json out.json]

Run it on a quiet machine: the load average is printed before and after, and each run's
"others' CPU s" says how much CPU the rest of the machine used meanwhile (the load average
also counts the benchmark's own threads; this does not). With `--rounds R`
the systems run R times in turn (default, none, fw-f32, default, ...) and the table shows each
system's median.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MODEL = "whisper-tiny.en"
SYSTEMS = ("default", "none", "fw-f32")
REFERENCE = "fw-f32"


def _busy_seconds() -> float:
    """CPU seconds every process on the machine has used since boot (/proc/stat), 0 elsewhere."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _children_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


# ----------------------------------------------------------------------------------------------
# Worker: faster-whisper over the first N utterances, as a whole process
# ----------------------------------------------------------------------------------------------
def run_fw_worker(limit: int, data_dir: str | None, out: Path) -> None:
    from qbench.checkpoints.registry import get_card, resolve_weights
    from qbench.data.audio import load_audio
    from qbench.data.librispeech import find_data_dir, list_utterances
    from qbench.data.scoring import ErrorCounts, corpus_rate
    from qbench.evaluate import score_utterance, split_unscorable
    from qbench.peers.faster_whisper import FasterWhisper
    from qbench.results import hypotheses_digest

    utts, _ = split_unscorable(list(list_utterances(find_data_dir(data_dir, "test-clean"), "test-clean"))[:limit])
    path = resolve_weights(get_card(MODEL))[0]  # the directory `qbench run` loads
    engine = FasterWhisper(path, compute_type="float32", cpu_threads=os.cpu_count() or 1)
    wall, scored = 0.0, []
    for u in utts:
        # audio is read outside the timed region, as `qbench.evaluate` does
        audio = load_audio(u.path, expected_rate=16000)
        t0 = time.perf_counter()
        (text,) = engine.transcribe([audio])
        wall += time.perf_counter() - t0
        scored.append(score_utterance(u, len(audio) / 16000, text))
    words = [ErrorCounts(substitutions=s.word_errors, deletions=0, insertions=0, reference_length=s.words) for s in scored]
    out.write_text(json.dumps({
        "metrics": {"wall_seconds": wall, "wer": corpus_rate(words), "utterances": len(scored),
                    "audio_seconds": sum(s.duration for s in scored)},
        "hypotheses_sha256": hypotheses_digest((s.id, s.hypothesis_normalized) for s in scored),
        "utterances": [{"id": s.id, "hypothesis_normalized": s.hypothesis_normalized} for s in scored],
    }))


# ----------------------------------------------------------------------------------------------
# Parent: every system as a subprocess, timed from outside
# ----------------------------------------------------------------------------------------------
def command(system: str, limit: int, out: Path, data_dir: str | None) -> list[str]:
    if system == "fw-f32":
        cmd = [sys.executable, __file__, "--fw-worker", "--limit", str(limit), "--out", str(out)]
    else:
        cmd = [sys.executable, "-c", "import sys; from qbench.cli import main; sys.exit(main())",
               "run", "--limit", str(limit), "-o", str(out), "-q"]
        if system == "none":
            cmd += ["--device", "none"]
    if data_dir:
        cmd += ["--data-dir", data_dir]
    return cmd


def run_once(system: str, limit: int, tmp: Path, data_dir: str | None, round_: int) -> dict[str, Any]:
    out = tmp / f"{system}-{limit}-{round_}.json"  # a fresh file: `qbench run` would reuse a complete one
    load_before = os.getloadavg()[0]
    busy0, own0 = _busy_seconds(), _children_seconds()
    t0 = time.perf_counter()
    proc = subprocess.run(command(system, limit, out, data_dir), capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    # CPU the rest of the machine used meanwhile: near 0 on a quiet machine
    others = max(0.0, (_busy_seconds() - busy0) - (_children_seconds() - own0))
    if proc.returncode != 0:
        raise SystemExit(f"{system} --limit {limit} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    r = json.loads(out.read_text())
    device = r.get("device") or {}
    return {
        "system": system, "limit": limit, "process_seconds": wall, "model_seconds": r["metrics"]["wall_seconds"],
        "wer": r["metrics"]["wer"], "utterances": r["metrics"]["utterances"], "hypotheses_sha256": r["hypotheses_sha256"],
        "hypotheses": {u["id"]: u["hypothesis_normalized"] for u in r["utterances"]},
        "batch_size": device.get("batch_size", 8 if system == "none" else 1),
        "device": (device.get("profile") or {}).get("name", "-"), "measured_batches": device.get("measured_batches"),
        "batches": device.get("batches"), "load_1min_before": load_before, "other_cpu_seconds": others,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limits", type=int, nargs="+", default=[20, 200], help="first N sorted test-clean ids")
    parser.add_argument("--rounds", type=int, default=1, help="runs of every system (the table shows medians)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--fw-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--limit", type=int, default=20, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.fw_worker:
        run_fw_worker(args.limit, args.data_dir, args.out)
        return

    from rich.console import Console
    from rich.table import Table

    console = Console(width=190)
    start_load = _load()
    console.print(f"[bold]{MODEL}[/]: `qbench run` (default device / --device none) and faster-whisper float32, "
                  f"each a whole subprocess; {os.cpu_count()} cores; env QBENCH_THREADS="
                  f"{os.environ.get('QBENCH_THREADS', '-')}; load average {start_load} (1/5/15 min)")
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for limit in args.limits:
            for round_ in range(args.rounds):
                for system in SYSTEMS:
                    r = run_once(system, limit, Path(tmp), args.data_dir, round_)
                    runs.append(r)
                    console.print(f"  --limit {limit} {system}: {r['process_seconds']:.1f} s process, "
                                  f"{r['model_seconds']:.1f} s model (load {r['load_1min_before']:.2f}, "
                                  f"{r['other_cpu_seconds']:.1f} CPU s used by other processes meanwhile)")
    end_load = _load()

    def median(limit: int, system: str, key: str) -> float:
        return statistics.median(r[key] for r in runs if r["limit"] == limit and r["system"] == system)

    table = Table(title=f"{MODEL}, whole processes side by side, {args.rounds} round(s) "
                        f"(load average {start_load} -> {end_load})")
    for col in ("utterances", "system", "device / batch", "process s", "model s", f"process / {REFERENCE}",
                f"speed vs {REFERENCE}", "model / none", "WER %", "same text as none", "measured batches",
                "others' CPU s"):
        table.add_column(col, justify="left" if col in ("system", "device / batch", "measured batches") else "right")
    summary: dict[str, Any] = {}
    for limit in args.limits:
        ref = median(limit, REFERENCE, "process_seconds")
        none_model = median(limit, "none", "model_seconds")
        none_hyps = next(r["hypotheses"] for r in runs if r["limit"] == limit and r["system"] == "none")
        for system in SYSTEMS:
            last = [r for r in runs if r["limit"] == limit and r["system"] == system][-1]
            proc, model = median(limit, system, "process_seconds"), median(limit, system, "model_seconds")
            same = sum(last["hypotheses"].get(k) == v for k, v in none_hyps.items())
            measured = "-" if last["measured_batches"] is None else f"{last['measured_batches']} of {last['batches']}"
            table.add_row(str(last["utterances"]), system, f"{last['device']} / {last['batch_size']}", f"{proc:.1f}",
                          f"{model:.1f}", f"{proc / ref:.2f}", f"{ref / proc:.2f}x",
                          f"{model / none_model:.2f}" if system != REFERENCE else "-", f"{100 * last['wer']:.2f}",
                          f"{same}/{len(none_hyps)}", measured, f"{last['other_cpu_seconds']:.1f}")
            summary[f"{limit}/{system}"] = {"process_seconds": proc, "model_seconds": model,
                                            "process_vs_reference": proc / ref, "model_vs_none": model / none_model}
    console.print(table)
    console.print("process s: wall time of the subprocess (start, imports, loading, audio, checks, scoring, writing); "
                  "model s: the transcription the process timed itself. speed vs fw-f32 > 1: faster than the peer. "
                  "others' CPU s: CPU time the rest of the machine used during that run (/proc/stat minus the run's "
                  "own; the load average counts the benchmark's own threads too, this does not).")
    if args.json:
        args.json.write_text(json.dumps({"model": MODEL, "load_start": start_load, "load_end": end_load,
                                         "summary": summary, "runs": runs}, indent=1))
        console.print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
