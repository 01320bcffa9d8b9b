"""Whisper speed, side by side in one run: qbench numpy (float32 and packed quantized) beside
faster-whisper (CTranslate2 float32 and int8), same machine, same utterances, same weights.

Every system runs in its own subprocess (so peak RSS is that system's own: `ru_maxrss` of the
child), loads the same CTranslate2 directory (qbench through `load_model`, faster-whisper
directly), transcribes one utterance untimed (warm-up: the float32 weight caches, CT2's
allocator), then the timed utterances. Greedy, no timestamps, `cpu_threads` = the machine's
cores for CTranslate2, BLAS threads pinned with threadpoolctl for numpy.

    python benchmarks/whisper_speed.py [--limit 200] [--json out.json] [--profile]

Run it on a quiet machine. Under load from other processes a threaded engine suffers most:
CTranslate2 float32 with cpu_threads=2 ran 11x slower than with cpu_threads=1 (10 utterances,
load average ~3), which is why `--systems ... fw-f32-1thread` exists; qbench's thread count is
`--threads` here, `QBENCH_THREADS` elsewhere (see `qbench.models.parallel`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

MB = 1024 * 1024
MODEL = "whisper-tiny.en"

#: name -> (kind, settings); quantized rows run from their packed form (PackedWeightStore)
SYSTEMS: dict[str, dict[str, Any]] = {
    "qbench-f32": {"engine": "numpy"},
    "fw-f32": {"engine": "ct2", "compute_type": "float32"},
    "fw-int8": {"engine": "ct2", "compute_type": "int8"},
    # not in the default set: CT2 on one thread, to tell engine speed from threading behaviour
    "fw-f32-1thread": {"engine": "ct2", "compute_type": "float32", "threads": 1, "optional": True},
    "qbench-rtn8": {"engine": "numpy", "plugin": "rtn", "settings": ["bits=8", "group_size=null"]},
    "qbench-rtn4-g128": {"engine": "numpy", "plugin": "rtn", "settings": ["bits=4", "group_size=128"]},
    "qbench-rtn4-g128-cached": {"engine": "numpy", "plugin": "rtn", "settings": ["bits=4", "group_size=128"], "cache": "all"},
    "qbench-ternary": {"engine": "numpy", "plugin": "ternary", "settings": []},
}
REFERENCE = "fw-f32"


# ----------------------------------------------------------------------------------------------
# Worker: one system in this process
# ----------------------------------------------------------------------------------------------
def _vm_hwm_bytes() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_vm_hwm() -> bool:
    # Linux >= 4.0: "5" resets the resident-set high-water mark, so the peak of the timed
    # phase can be read apart from the peak of loading/quantizing
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _numpy_model(spec: dict[str, Any]):  # -> (SpeechModel, extra info)
    from qbench.checkpoints.loader import load_model

    loaded = load_model(MODEL)
    model = loaded.model
    info: dict[str, Any] = {"weights": str(loaded.path)}
    if "plugin" in spec:
        from qbench.plugin_manager import get_quantizer
        from qbench.quant.apply import quantize_model
        from qbench.quant.settings import parse_settings

        cls = get_quantizer(spec["plugin"])
        quantizer = cls(parse_settings(spec["settings"], cls.Config, spec["plugin"]))
        cache = 0
        if spec.get("cache") == "all":
            # every quantizable layer's float32 size: nothing is ever evicted
            cache = sum(4 * w.numel for w in model.quantizable_weights())
        model, report = quantize_model(model, quantizer, cache_bytes=cache)
        del loaded
        info.update(cache_bytes=cache, mean_bits_per_weight=report.mean_bits_per_weight,
                    quantize_seconds=report.seconds)
    return model, info


def run_worker(system: str, limit: int, threads: int, batch_size: int, data_dir: str | None,
               profile: int, out: Path, mel_padding: str | None = None) -> None:
    from threadpoolctl import threadpool_info, threadpool_limits

    from qbench.data.audio import load_audio
    from qbench.data.librispeech import find_data_dir, list_utterances
    from qbench.data.scoring import ErrorCounts, corpus_rate
    from qbench.evaluate import score_utterance

    spec = SYSTEMS[system]
    threadpool_limits(threads)
    os.environ["QBENCH_THREADS"] = str(threads)  # qbench's encoder threads and decoder BLAS
    utts = list_utterances(find_data_dir(data_dir), "test-clean", limit)
    audios = [load_audio(u.path) for u in utts]
    result: dict[str, Any] = {"system": system, "engine": spec["engine"]}

    if spec["engine"] == "ct2":
        from qbench.checkpoints.registry import get_card, resolve_weights
        from qbench.peers.faster_whisper import FasterWhisper

        path = resolve_weights(get_card(MODEL))[0]  # the directory load_model reads
        threads = spec.get("threads", threads)
        engine = FasterWhisper(path, compute_type=spec["compute_type"], cpu_threads=threads)
        transcribe: Callable[[list], list[str]] = engine.transcribe
        result.update(model_bytes=(Path(path) / "model.bin").stat().st_size, model_bytes_note="model.bin on disk",
                      threads=f"cpu_threads={threads}", weights=str(path))
        batch_size = 1  # faster-whisper's transcribe takes one audio at a time
    else:
        from qbench.models import whisper as W

        model, info = _numpy_model(spec)
        if mel_padding:
            model.mel_padding = mel_padding
        info["mel_padding"] = getattr(model, "mel_padding", None)
        transcribe = model.transcribe
        result.update(info)
        result.update(model_bytes=model.store.stored_bytes(), model_bytes_note="stored parameters",
                      threads=f"{W.compute_threads()} (encoder windows in threads, BLAS {threads} in the decoder)")
    result["blas"] = [{k: lib.get(k) for k in ("internal_api", "version", "architecture", "num_threads", "filepath")}
                      for lib in threadpool_info() if lib.get("user_api") == "blas"]

    transcribe(audios[:1])  # warm-up, untimed
    hwm_reset = _reset_vm_hwm()
    texts: list[str] = []
    wall = 0.0
    for start in range(0, len(audios), batch_size):
        t0 = time.perf_counter()
        texts += transcribe(audios[start : start + batch_size])
        wall += time.perf_counter() - t0
    scored = [score_utterance(u, len(a) / 16000, t) for u, a, t in zip(utts, audios, texts)]
    audio_seconds = sum(s.duration for s in scored)
    words = [ErrorCounts(substitutions=s.word_errors, deletions=0, insertions=0, reference_length=s.words) for s in scored]
    result.update(
        utterances=len(utts), batch_size=batch_size, audio_seconds=audio_seconds, wall_seconds=wall,
        rtfx=audio_seconds / wall, wer=corpus_rate(words),
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        peak_rss_timed_bytes=_vm_hwm_bytes() if hwm_reset else None,
        hypotheses={s.id: s.hypothesis_normalized for s in scored},
    )
    if profile and spec["engine"] == "numpy":
        result["profile"] = profile_numpy(model, audios[:profile], batch_size)
    out.write_text(json.dumps(result))


# ----------------------------------------------------------------------------------------------
# Profile of the numpy path: exclusive wall time per category, by wrapping the model's
# module-level functions and the store's `linear` (nothing in the model code is instrumented)
# ----------------------------------------------------------------------------------------------
_LINEAR_CATEGORY = (  # (name fragment, category); first match wins
    ("encoder.conv", "encoder conv GEMMs"),
    ("encoder.blocks", None),  # attn.* / mlp.* below
    ("cross_attn.kv", "cross-attn K/V (once per window)"),
    ("cross_attn.", "decoder cross-attention"),
    (".attn.", "decoder self-attention"),
    ("decoder.blocks", "decoder MLP"),
    ("token_embedding", "output projection"),
)


class Profiler:
    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self._stack: list[list] = []  # [category, time spent in wrapped callees]

    def inside(self, category: str) -> bool:
        return any(frame[0] == category for frame in self._stack)

    def wrap(self, fn: Callable, category: str | Callable[..., str]) -> Callable:
        def wrapper(*args, **kwargs):
            cat = category(*args, **kwargs) if callable(category) else category
            self._stack.append([cat, 0.0])
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t0
                _, child = self._stack.pop()
                self.totals[cat] += dt - child
                if self._stack:
                    self._stack[-1][1] += dt

        return wrapper


def profile_numpy(model, audios: list, batch_size: int) -> dict[str, float]:
    """Seconds per category over `audios` (a separate, untimed pass: wrappers cost a little).

    On one thread: the wrappers keep one stack of categories, which work spread over threads
    would interleave; the shares are those of the single-threaded path.
    """
    from qbench.models import attention as attention_kernel
    from qbench.models import parallel
    from qbench.models import whisper as W
    from qbench.quant.packing import PackedTensor

    prof = Profiler()
    enc = "encoder other (residuals, im2col, pos. embedding)"

    def linear_category(name: str, x) -> str:
        if name.startswith("encoder.blocks"):
            return "encoder attention QKV/out GEMMs" if ".attn." in name else "encoder MLP GEMMs"
        return next(cat for frag, cat in _LINEAR_CATEGORY if frag in name and cat)

    def attention_category(q, k, v, n_head, causal_offset=None, threads=1) -> str:
        if prof.inside(enc):
            return "encoder attention (scores, softmax, PV)"
        return "decoder self-attention" if causal_offset is not None else "decoder cross-attention"

    def in_encoder(label_enc: str, label_dec: str) -> Callable[..., str]:
        return lambda *a, **k: label_enc if prof.inside(enc) else label_dec

    originals = {name: getattr(W, name) for name in
                 ("log_mel_spectrogram", "encode", "start_decoder", "decode_step", "output_logits", "gelu", "layer_norm")}
    # the models reach the kernel through `store.attention`, which looks it up on every call
    original_attention = attention_kernel.attention
    original_select, original_dequantize = W.DecoderState.compact, PackedTensor.dequantize
    store = model.store
    one_thread = contextlib.ExitStack()
    one_thread.enter_context(parallel.using_threads(1))
    try:
        W.log_mel_spectrogram = prof.wrap(originals["log_mel_spectrogram"], "mel")
        W.encode = prof.wrap(originals["encode"], enc)
        W.start_decoder = prof.wrap(originals["start_decoder"], "cross-attn K/V (once per window)")
        W.decode_step = prof.wrap(originals["decode_step"], "decoder other (embedding, residuals, KV-cache writes)")
        W.output_logits = prof.wrap(originals["output_logits"], "output projection")
        attention_kernel.attention = prof.wrap(original_attention, attention_category)
        W.gelu = prof.wrap(originals["gelu"], in_encoder("encoder GELU", "decoder MLP"))
        W.layer_norm = prof.wrap(originals["layer_norm"], in_encoder("encoder layer norm", "decoder layer norm"))
        W.DecoderState.compact = prof.wrap(original_select, "decoder batch shrink (finished rows)")
        PackedTensor.dequantize = prof.wrap(original_dequantize, "dequantization")
        store.linear = prof.wrap(store.linear, linear_category)
        transcribe = prof.wrap(model.transcribe, "Python overhead (decode loop, argmax, suppress, stop checks)")
        t0 = time.perf_counter()
        for start in range(0, len(audios), batch_size):
            transcribe(audios[start : start + batch_size])
        total = time.perf_counter() - t0
    finally:
        for name, fn in originals.items():
            setattr(W, name, fn)
        W.DecoderState.compact, PackedTensor.dequantize = original_select, original_dequantize
        attention_kernel.attention = original_attention
        del store.linear
        one_thread.close()
    shares = dict(sorted(prof.totals.items(), key=lambda kv: -kv[1]))
    shares["total"] = total
    return shares


# ----------------------------------------------------------------------------------------------
# Parent: run every system, print the table, write the JSON
# ----------------------------------------------------------------------------------------------
def _machine() -> dict[str, Any]:
    import numpy as np
    from threadpoolctl import threadpool_info

    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        import ctranslate2
        import faster_whisper

        peers = {"ctranslate2": ctranslate2.__version__, "faster_whisper": faster_whisper.__version__}
    except ImportError:
        peers = {}
    return {
        "cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__,
        "numpy_blas": [{k: lib.get(k) for k in ("internal_api", "version", "architecture", "num_threads")}
                       for lib in threadpool_info() if lib.get("user_api") == "blas"],
        "env": {k: v for k, v in os.environ.items() if k.startswith(("OPENBLAS", "OMP_", "MKL_", "CT2_"))},
        **peers,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=200, help="first N sorted test-clean ids (default 200)")
    parser.add_argument("--systems", nargs="+", default=[k for k, v in SYSTEMS.items() if not v.get("optional")],
                        choices=list(SYSTEMS))
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    # 4, measured: within 7 % of 8 windows per call in throughput, but 400 MB peak RSS instead of
    # 507 MB (each decoding window holds 18 MB of cross-attention K/V)
    parser.add_argument("--batch-size", type=int, default=4, help="utterances per numpy transcribe call")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--mel-padding", choices=["audio", "zeros"], default=None,
                        help="qbench's mel padding (default: the model's, 'audio'; 'zeros' is faster-whisper's)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--profile", nargs="?", type=int, const=16, default=0,
                        help="profile the numpy systems on the first N utterances (default 16)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run_worker(args.worker, args.limit, args.threads, args.batch_size, args.data_dir, args.profile, args.out,
                   args.mel_padding)
        return

    from rich.console import Console
    from rich.table import Table

    console = Console(width=160)
    machine = _machine()
    machine["loadavg_start"] = os.getloadavg()
    console.print(f"[bold]{MODEL}[/], first {args.limit} test-clean utterances; {machine['cpu']}, "
                  f"{machine['cores']} cores; numpy {machine['numpy']} on {machine['numpy_blas']}; "
                  f"threads: numpy BLAS {args.threads} (threadpoolctl), CT2 cpu_threads={args.threads}; "
                  f"env {machine['env'] or '{}'}; load average {machine['loadavg_start']}")
    console.print("Warm-up: one untimed utterance per system before the timed ones; audio loading "
                  "and scoring are outside the timed region.")
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for system in args.systems:
            out = Path(tmp) / f"{system}.json"
            cmd = [sys.executable, __file__, "--worker", system, "--out", str(out), "--limit", str(args.limit),
                   "--threads", str(args.threads), "--batch-size", str(args.batch_size), "--profile", str(args.profile)]
            if args.data_dir:
                cmd += ["--data-dir", args.data_dir]
            if args.mel_padding:
                cmd += ["--mel-padding", args.mel_padding]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                console.print(f"[red]{system} failed[/]:\n{proc.stderr[-2000:]}")
                continue
            results[system] = json.loads(out.read_text())
            r = results[system]
            console.print(f"  {system}: {r['wall_seconds']:.1f} s timed, RTFx {r['rtfx']:.2f} "
                          f"({time.perf_counter() - t0:.0f} s with loading)")
    machine["loadavg_end"] = os.getloadavg()

    ref = results.get(REFERENCE)
    table = Table(title=f"{MODEL}: {args.limit} test-clean utterances, one run "
                        f"(load average {machine['loadavg_start'][0]:.1f} -> {machine['loadavg_end'][0]:.1f})")
    for col in ("system", "WER %", "wall s", "RTFx", f"RTFx / {REFERENCE}", "peak RSS MB", "timed-phase RSS MB",
                "model MB", "same text as qbench-f32", "threads"):
        table.add_column(col, justify="left" if col in ("system", "threads") else "right")
    base_hyps = results.get("qbench-f32", {}).get("hypotheses")
    for system, r in results.items():
        if ref:
            r["rtfx_vs_reference"] = r["rtfx"] / ref["rtfx"]
        same = "-"
        if base_hyps:
            n_same = sum(r["hypotheses"].get(k) == v for k, v in base_hyps.items())
            r["identical_to_qbench_f32"] = n_same
            same = f"{n_same}/{len(base_hyps)}"
        timed = r.get("peak_rss_timed_bytes")
        table.add_row(system, f"{100 * r['wer']:.2f}", f"{r['wall_seconds']:.1f}", f"{r['rtfx']:.2f}",
                      f"{r['rtfx_vs_reference']:.2f}" if ref else "-", f"{r['peak_rss_bytes'] / MB:.0f}",
                      f"{timed / MB:.0f}" if timed else "-", f"{r['model_bytes'] / MB:.1f}", same, r["threads"])
    console.print(table)
    console.print("peak RSS: ru_maxrss of the system's own subprocess (loading and quantizing included); "
                  "timed-phase RSS: the high-water mark reset after warm-up. model MB: qbench's stored "
                  "parameters (packed layers + the rest at stored precision); faster-whisper: model.bin on disk.")
    for system, r in results.items():
        if "profile" not in r:
            continue
        prof = dict(r["profile"])
        total = prof.pop("total")
        t = Table(title=f"profile of {system} ({args.profile} utterances, one thread, exclusive wall time)")
        t.add_column("category")
        t.add_column("s", justify="right")
        t.add_column("share", justify="right")
        for cat, sec in prof.items():
            t.add_row(cat, f"{sec:.2f}", f"{100 * sec / total:.1f} %")
        t.add_row("total", f"{total:.2f}", "100 %")
        console.print(t)
    if args.json:
        args.json.write_text(json.dumps({"model": MODEL, "limit": args.limit, "machine": machine,
                                         "warmup": "one untimed utterance per system", "systems": results}, indent=1))
        console.print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
