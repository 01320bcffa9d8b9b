"""`qbench verify ENTRY`: rerun an entry exactly as it was produced and compare.

The rerun is `run_benchmark(RunSpec.from_entry(entry))`: the entry's own model, exact
utterances, quantizer with its full config and policy, calibration set, device and batch size.
It reproduces when the model weights and the utterance set are the same (sha256s), the
hypotheses digest is the same (on the same qbench version: another version may legitimately
change transcripts) and the WER is equal.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from pydantic import BaseModel

from qbench import __version__
from qbench.evaluate import RunFailed
from qbench.leaderboard.entry import read_entry
from qbench.run import RunProgress, RunSpec, run_benchmark


class VerifyReport(BaseModel):
    entry: str
    reproduced: bool
    problems: list[str]
    wer_entry: float
    wer_rerun: float | None
    hypotheses_match: bool | None


def verify_entry(path: Path, data_dir: str | None, progress: RunProgress | None = None) -> VerifyReport:
    """Rerun the entry at `path` and compare with what it claims."""
    entry = read_entry(path)
    problems: list[str] = []
    # the rerun's result file is scratch: the entry is the record
    with tempfile.TemporaryDirectory() as tmp:
        spec = RunSpec.from_entry(entry, data_dir=data_dir, output=str(Path(tmp) / "rerun.json"))
        try:
            result = run_benchmark(spec, progress)
        except RunFailed as exc:
            return VerifyReport(entry=str(path), reproduced=False, problems=[f"rerun failed: {exc}"],
                                wer_entry=entry.wer, wer_rerun=None, hypotheses_match=None)
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
