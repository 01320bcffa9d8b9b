"""Wall time and peak memory of the numpy wav2vec2-base forward beside PyTorch, in one run.

Both run the real facebook/wav2vec2-base-960h config with the same seeded random weights (no
Hub access needed) on real LibriSpeech test-clean audio (utterances concatenated to 10 s and
35 s), with the same thread count (torch.set_num_threads; numpy's BLAS and qbench's own
threads). Warm-up runs (which also build the store's transposed weight cache) are excluded;
time is the best of `--repeats` runs, numpy and PyTorch interleaved. Peak memory comes from a
separate, instrumented run: tracemalloc peak (numpy's own allocations) and the peak RSS increase sampled
every 2 ms (both libraries; torch's allocator is invisible to tracemalloc).

    python benchmarks/wav2vec2_forward.py [--threads N] [--repeats R]
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import psutil
import soundfile as sf
from rich.console import Console
from rich.table import Table

from qbench.checkpoints.hf_wav2vec2 import hf_to_canonical
from qbench.models.wav2vec2 import Wav2Vec2, Wav2Vec2Config

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "wav2vec2" / "wav2vec2-base-960h"
MB = 1024 * 1024


def librispeech_audio(seconds: float) -> np.ndarray:
    base = Path(os.environ.get("QBENCH_DATA_DIR", REPO.parent / "shared" / "librispeech"))
    files = sorted((base / "LibriSpeech" / "test-clean").rglob("*.flac"))
    if not files:
        raise SystemExit(f"no LibriSpeech test-clean under {base} (set QBENCH_DATA_DIR)")
    pieces, total = [], 0
    for f in files:
        audio, _ = sf.read(f, dtype="float32")
        pieces.append(audio)
        total += len(audio)
        if total >= seconds * 16000:
            break
    return np.concatenate(pieces)[: int(seconds * 16000)]


class PeakRSS:
    """Peak resident-set increase over a block, sampled by a thread (RSS has no peak counter
    that can be reset between measurements)."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.process = psutil.Process()

    def __enter__(self) -> PeakRSS:
        self.base = self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)

    @property
    def delta_mb(self) -> float:
        return (self.peak - self.base) / MB


def best_times(fns: list[Callable[[], object]], repeats: int) -> list[float]:
    """Best wall time of each function, the runs interleaved (a, b, a, b, ...) so that a slow
    stretch of a shared machine does not fall on one side only."""
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return [min(ts) for ts in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seconds", type=float, nargs="+", default=[10.0, 35.0])
    args = parser.parse_args()

    import torch
    import transformers
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(args.threads)
    threadpool_limits(args.threads)
    os.environ["QBENCH_THREADS"] = str(args.threads)

    hf_config = json.loads((FIXTURE / "config.json").read_text())
    torch.manual_seed(0)
    reference = transformers.Wav2Vec2ForCTC(transformers.Wav2Vec2Config(**hf_config)).eval()
    config = Wav2Vec2Config.from_hf(hf_config)
    vocab = [t for t, _ in sorted(json.loads((FIXTURE / "vocab.json").read_text()).items(), key=lambda kv: kv[1])]
    state = {k: v.detach().numpy().copy() for k, v in reference.state_dict().items()}
    model = Wav2Vec2.from_params(config, hf_to_canonical(state, config), vocab, "wav2vec2-base-960h")
    extractor = transformers.Wav2Vec2FeatureExtractor(do_normalize=True)

    def torch_logits(audio: np.ndarray) -> np.ndarray:
        inputs = extractor(audio, sampling_rate=16000, return_tensors="pt").input_values
        with torch.inference_mode():
            return reference(inputs).logits[0].numpy()

    warm = librispeech_audio(2.0)
    model.logits(warm), torch_logits(warm)

    table = Table(title=f"wav2vec2-base forward, numpy vs PyTorch {torch.__version__} ({args.threads} threads)")
    for col in ("input", "numpy s", "torch s", "time np/torch", "np tracemalloc peak MB",
                "np RSS +peak MB", "torch RSS +peak MB", "RSS np/torch", "max|Δlogit|/max|logit|"):
        table.add_column(col, justify="right")
    for seconds in args.seconds:
        audio = librispeech_audio(seconds)
        t_np, t_torch = best_times([lambda: model.logits(audio), lambda: torch_logits(audio)], args.repeats)
        tracemalloc.start()
        with PeakRSS() as rss_np:
            got = model.logits(audio)
        traced_peak = tracemalloc.get_traced_memory()[1] / MB
        tracemalloc.stop()
        with PeakRSS() as rss_torch:
            expected = torch_logits(audio)
        rel = np.abs(got - expected).max() / np.abs(expected).max()
        table.add_row(f"{seconds:g} s", f"{t_np:.2f}", f"{t_torch:.2f}", f"{t_np / t_torch:.2f}x",
                      f"{traced_peak:.0f}", f"{rss_np.delta_mb:.0f}", f"{rss_torch.delta_mb:.0f}",
                      f"{rss_np.delta_mb / max(rss_torch.delta_mb, 1e-9):.2f}x", f"{rel:.1e}")
    Console(width=150).print(table)
    # the 1-minute load average beside the CPU count says whether other processes competed
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs at the end of the run")
    print("RSS +peak: resident-set growth above the steady state (weights already loaded), "
          "sampled every 2 ms; allocator caching from earlier runs can hide part of it.")


if __name__ == "__main__":
    main()
