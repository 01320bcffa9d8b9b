"""Quantized activations on whisper-tiny.en: what the integer emulation costs, and what memory holds.

Measured side by side in one run (quote the ratios, not the seconds: the machine is shared):

1. speed: each encoder and decoder linear of block 0 on one 30 s window's rows (encoder) or a
   batch of 8 decode rows (decoder), float32 activations on the packed rtn 8-bit store against
   A8 (absmax per token) with the exact integer product, best of 5;
2. memory, float32: the numpy implementation's accountant against tracemalloc for one 30 s
   window encoded and 4 tokens decoded at batch 1 (the tests hold it within 5 %);
3. memory, at stored precision: the lean embedded runtime's working peak (A32, A8, A8 + KV8,
   A4 + KV4; 30 s and 10 s windows) against the numpy implementation's.

    python benchmarks/activation_quantization.py
"""

from __future__ import annotations

import time

import numpy as np
from rich.console import Console
from rich.table import Table

from qbench.checkpoints.loader import load_model
from qbench.embedded.device_store import DeviceWeightStore
from qbench.embedded.memory import measure_peak
from qbench.embedded.session import estimate_memory
from qbench.models import whisper as W
from qbench.models.parallel import using_threads
from qbench.plugin_manager import get_quantizer
from qbench.quant.activation_scheme import ActivationRecord, ActivationScheme
from qbench.quant.activation_store import ActivationQuantizingStore
from qbench.quant.apply import quantize_model

MiB = 2**20


def best_of(fn, n: int = 5) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    console = Console()
    model = load_model("whisper-tiny.en").model
    rtn = get_quantizer("rtn")
    packed, _ = quantize_model(model, rtn(rtn.Config(bits=8)))
    record = ActivationRecord(name="absmax", version="1.0", config={"bits": 8},
                              scheme=ActivationScheme(bits=8, granularity="token"), kv_cache=True)
    a8 = ActivationQuantizingStore(packed.store, record)
    rng = np.random.default_rng(0)

    speed = Table(title="linear layers: A8 integer emulation against float32 activations (rtn 8-bit weights, 1 thread)")
    for col in ("layer", "rows", "float32 ms", "A8 ms", "A8 / float32"):
        speed.add_column(col, justify="right" if col != "layer" else "left")
    with using_threads(1):
        for name, rows in (("encoder.blocks.0.attn.qkv", 1500), ("encoder.blocks.0.mlp.fc1", 1500),
                           ("encoder.blocks.0.mlp.fc2", 1500), ("decoder.blocks.0.mlp.fc1", 8),
                           ("decoder.blocks.0.mlp.fc2", 8)):
            x = rng.standard_normal((1, rows, packed.store.infos[name].shape[1])).astype(np.float32)
            packed.store.linear(name, x)
            a8.linear(name, x)  # fills the integer-code cache
            t_float = best_of(lambda: packed.store.linear(name, x))
            t_a8 = best_of(lambda: a8.linear(name, x))
            speed.add_row(name, str(rows), f"{1e3 * t_float:.1f}", f"{1e3 * t_a8:.1f}", f"{t_a8 / t_float:.2f}")
    console.print(speed)

    audio = (0.05 * rng.standard_normal(30 * 16000)).astype(np.float32)
    store = DeviceWeightStore.from_store(model.store)
    with using_threads(1):
        _, peak = measure_peak(lambda: W.greedy_decode(store, model.dims, model.vocab, np.stack(W.audio_windows(audio)),
                                                       max_new_tokens=4))
        estimate = estimate_memory(model, store, None, 1, 30.0)  # at the measurement's thread count
    measured = peak + audio.nbytes
    acc = Table(title="float32: the numpy implementation's accountant against tracemalloc (one 30 s window, batch 1)")
    for col in ("tracemalloc MiB", "accountant MiB", "accountant / measured", "peak phase"):
        acc.add_column(col, justify="right")
    acc.add_row(f"{measured / MiB:.1f}", f"{estimate.working_peak_bytes / MiB:.1f}",
                f"{estimate.working_peak_bytes / measured:.3f}", estimate.peak_phase)
    console.print(acc)

    lean = Table(title="working peak at stored precision: the lean embedded runtime against the numpy implementation")
    for col in ("window", "activations", "KV cache", "lean MiB", "peak phase", "numpy MiB", "lean / numpy"):
        lean.add_column(col, justify="right")
    for seconds in (None, 10.0):
        m = model.with_encoder_seconds(seconds)
        s = DeviceWeightStore.from_store(m.store)
        numpy_peak = m.working_memory(s, 1, m.fit_audio_seconds).peak.total_bytes
        for act, kv in ((4.0, 4.0), (1.0, 4.0), (1.0, 1.0), (0.5, 0.5)):
            w = m.lean_memory(s, 1, m.fit_audio_seconds, act, kv)
            lean.add_row(f"{m.fit_audio_seconds:g} s", f"{8 * act:g} bit", f"{8 * kv:g} bit", f"{w.peak.total_bytes / MiB:.2f}",
                         w.peak_phase, f"{numpy_peak / MiB:.1f}", f"{w.peak.total_bytes / numpy_peak:.3f}")
    console.print(lean)


if __name__ == "__main__":
    main()
