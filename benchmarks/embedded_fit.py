"""Whisper tiny.en on the device ladder: model bytes, measured peak working memory, what fits.

For fp32 (parameters converted to float32), fp16 (as shipped), rtn8, rtn4 g128 and ternary,
with and without the token embedding quantized: the stored bytes (sum of the real buffers),
the working-memory peak measured with tracemalloc while one 30 s window (the first test-clean
utterance zero-padded) is encoded and 8 tokens are decoded at batch 1 on the device store, the
accountant's estimate of the same peak, and the device profiles the model fits.

    python benchmarks/embedded_fit.py
"""

from __future__ import annotations

import numpy as np
from rich.console import Console
from rich.table import Table

from qbench.data.audio import load_audio
from qbench.embedded.devices import get_device_profiles
from qbench.data.librispeech import find_data_dir, list_utterances
from qbench.embedded.device_store import DeviceWeightStore
from qbench.embedded.memory import check_fit, measure_peak
from qbench.embedded.session import estimate_memory
from qbench.checkpoints.loader import load_model
from qbench.models import whisper as W
from qbench.plugin_manager import get_quantizer
from qbench.quant.apply import QuantizationPolicy, quantize_model
from qbench.models.weight_store import WeightStore

CT2_MODEL_BIN = 75_537_502  # bytes of the float16 CTranslate2 model.bin of tiny.en
DECODE_TOKENS = 8


def variants(model):
    fp32 = {k: np.asarray(v, dtype=np.float32) for k, v in model.store.params.items()}
    yield "fp32", model.with_store(WeightStore(fp32, model.store.weight_infos()))
    yield "fp16", model
    for label, plugin, settings, emb in (
        ("rtn8 g128", "rtn", {"bits": 8, "group_size": 128}, False),
        ("rtn4 g128", "rtn", {"bits": 4, "group_size": 128}, False),
        ("ternary", "ternary", {}, False),
        ("rtn4 g128 +emb", "rtn", {"bits": 4, "group_size": 128}, True),
        ("ternary +emb", "ternary", {}, True),
    ):
        cls = get_quantizer(plugin)
        quantized, _ = quantize_model(model, cls(cls.Config(**settings)), QuantizationPolicy(quantize_embeddings=emb))
        yield label, quantized


def main() -> None:
    loaded = load_model("whisper-tiny.en")
    model = loaded.model
    utt = list_utterances(find_data_dir(None, "test-clean"), "test-clean", limit=1)[0]
    audio = np.zeros(W.N_SAMPLES, dtype=np.float32)
    speech = load_audio(utt.path, expected_rate=16000)[: W.N_SAMPLES]
    audio[: speech.size] = speech
    devices = get_device_profiles()

    table = Table(title=f"whisper-tiny.en, one 30 s window ({utt.id} zero-padded), batch 1, {DECODE_TOKENS} tokens")
    for col in ("weights", "model bytes", "vs fp32", "peak measured", "peak estimated", "fits"):
        table.add_column(col, justify="left" if col in ("weights", "fits") else "right")
    sizes = {}
    for label, m in variants(model):
        store = DeviceWeightStore.from_store(m.store)
        mels = np.stack(W.audio_windows(audio))
        ids, peak = measure_peak(lambda: W.greedy_decode(store, m.dims, m.vocab, mels, max_new_tokens=DECODE_TOKENS))
        measured = peak + audio.nbytes
        estimate = estimate_memory(m, store, None)
        fits = [d.name for d in devices.values() if check_fit(estimate_memory(m, store, d), d, measured).fits]
        sizes[label] = store.stored_bytes()
        table.add_row(label, f"{sizes[label]:,}", f"{sizes[label] / sizes.get('fp32', sizes[label]):.3f}",
                      f"{measured / 2**20:.1f} MiB", f"{estimate.working_peak_bytes / 2**20:.1f} MiB", ", ".join(fits) or "none")
    console = Console(width=140)
    console.print(table)
    fp16 = sizes["fp16"] / CT2_MODEL_BIN
    console.print(f"fp16 / CTranslate2 model.bin ({CT2_MODEL_BIN:,} B) = {fp16:.4f} (within 1 %: {abs(fp16 - 1) < 0.01})")
    for label in ("rtn4 g128", "rtn4 g128 +emb"):
        ratio = sizes[label] / sizes["fp32"]
        console.print(f"{label} / fp32 = {ratio:.3f} (under 0.3: {ratio < 0.3})")


if __name__ == "__main__":
    main()
