"""`qbench verify ENTRY`: rerun an entry exactly as it was produced and compare.

The rerun goes through `qbench run` itself with the entry's own model, subset, utterance count,
quantizer, config, policy, calibration set, device and batch size. It reproduces when the model
weights and the utterance set are the same (sha256s), the hypotheses digest is the same (on the
same qbench version: another version may legitimately change transcripts) and the WER is equal.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel

from qbench import __version__
from qbench.leaderboard.entry import LeaderboardEntry, read_entry
from qbench.results import RunResult


class VerifyReport(BaseModel):
    entry: str
    reproduced: bool
    problems: list[str]
    wer_entry: float
    wer_rerun: float | None
    hypotheses_match: bool | None


def rerun_argv(entry: LeaderboardEntry, output: Path, data_dir: str | None) -> list[str]:
    """The `qbench run` arguments that produce `entry` again."""
    # the entry's own utterance ids, so a full official download reruns the same utterances
    ids_file = output.with_suffix(".ids")
    ids_file.write_text("".join(u.id + "\n" for u in entry.utterances))
    argv = ["run", "--model", entry.model.name, "--subset", entry.dataset.subset, "-o", str(output), "-q",
            "--utterance-ids", str(ids_file)]
    if data_dir:
        argv += ["--data-dir", data_dir]
    if entry.device is not None:
        argv += ["--device", entry.device.name, "--batch-size", str(entry.device.batch_size)]
    else:
        argv += ["--device", "none"]
    q = entry.quantizer
    if q is not None:
        argv += ["--plugin", q.name]
        for key, value in sorted(q.config.items()):
            argv += ["--set", f"{key}={json.dumps(value)}"]
        if q.policy.get("quantize_embeddings"):
            argv.append("--quantize-embeddings")
    if entry.calibration is not None:
        calibration_file = output.with_suffix(".calibration-ids")
        calibration_file.write_text("".join(i + "\n" for i in entry.calibration.utterance_ids))
        argv += ["--calibration-subset", entry.calibration.subset, "--calibration-ids", str(calibration_file)]
    return argv


def verify_entry(path: Path, data_dir: str | None, run: Callable[[list[str]], int]) -> VerifyReport:
    """Rerun the entry at `path` with `run` (the CLI's main) and compare with what it claims."""
    entry = read_entry(path)
    problems: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        output = Path(tmp) / "rerun.json"
        status = run(rerun_argv(entry, output, data_dir))
        if not output.is_file():
            return VerifyReport(entry=str(path), reproduced=False, problems=[f"rerun failed (exit {status}) before writing a result"],
                                wer_entry=entry.wer, wer_rerun=None, hypotheses_match=None)
        result = RunResult.model_validate_json(output.read_text())
    if result.status != "complete":
        problems.append(f"rerun did not complete: {result.error}")
    if result.model.sha256 != entry.model.sha256:
        problems.append(f"weights differ: sha256 {result.model.sha256[:12]}… here, {entry.model.sha256[:12]}… in the entry")
    if result.dataset.utterance_ids_sha256 != entry.dataset.utterance_ids_sha256:
        problems.append("the utterances present here differ from the entry's (ids digest)")
    if entry.quantizer is not None and result.quantization is not None:
        here = result.quantization.get("distribution_version")
        if here != entry.quantizer.distribution_version:
            problems.append(f"{entry.quantizer.distribution} {here} installed, the entry used {entry.quantizer.distribution_version}")
    hyp_match = result.hypotheses_sha256 == entry.hypotheses_sha256
    wer = result.metrics.wer if result.metrics else None
    if entry.qbench_version == __version__ and not hyp_match:
        problems.append("hypotheses differ from the entry's on the same qbench version")
    if wer is None or abs(wer - entry.wer) > 1e-9:
        problems.append(f"WER {100 * (wer or float('nan')):.3f} % on rerun, entry says {100 * entry.wer:.3f} %")
    return VerifyReport(entry=str(path), reproduced=not problems, problems=problems, wer_entry=entry.wer,
                        wer_rerun=wer, hypotheses_match=hyp_match)
