"""Per-layer sensitivity: the damage of quantizing one layer (or one group of layers) alone.

For each candidate (a plugin with its settings) the whole model is quantized once, every layer
including the embedding, in the plugin's own process and calibrated as that plugin wants. Then
each layer in turn is swapped into the otherwise float model, and the damage is the mean KL
divergence `KL(p_float || p_quantized)` of the output distribution over every scored position
of a few dev-clean utterances, teacher-forced (`SpeechModel.output_log_probs`: Whisper on its
own float transcript, wav2vec2 on every CTC frame). Groups (encoder, decoder, attention, MLP,
embedding) are measured the same way with all their layers swapped at once, which shows how
far damage adds up.

Everything is measured on dev-clean, never on the evaluation set: the calibration audio of a
calibrated candidate is the rest of dev-clean, disjoint from the measured utterances. The
result is cached per model weights, candidate and utterances (`SensitivityTable`), so
`qbench optimize` can allocate bits from it without measuring again; HAWQ-V3 (arXiv 2011.10680)
and most mixed-precision work allocate from exactly such additive per-layer costs.

Each candidate's uniform dev WER on the measured utterances is recorded too: it is what turns
summed KL into a predicted WER for a plan (`qbench.quant.allocation.predict_wer`).
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from qbench.errors import QBenchError
from qbench.models.speech_model import SpeechModel
from qbench.models.weight_store import WeightStore
from qbench.quant.apply import (
    PackedWeightStore,
    QuantizationPolicy,
    QuantizerIdentity,
    quantize_model,
    quantizer_identity,
)
from qbench.results import write_atomically

#: layer groups measured as a whole, by fnmatch globs on layer names (a group with no layer in
#: the model is skipped)
GROUPS: dict[str, tuple[str, ...]] = {
    "encoder": ("encoder.*", "feature_encoder.*"),
    "decoder": ("decoder.blocks.*",),
    "attention": ("*.attn.*", "*.cross_attn.*", "*.attention.*"),
    "mlp": ("*.mlp.*", "*.fc1", "*.fc2"),
    "embedding": ("decoder.token_embedding",),
}

Progress = Callable[[str], None]


class SensitivityError(QBenchError, ValueError):
    """A sensitivity table that does not belong to the model, or a candidate that is malformed."""


class Candidate(BaseModel):
    """One way to quantize a layer: a plugin and its settings."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    plugin: str
    config: dict[str, Any] = Field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.plugin + "".join(f"-{k}{json.dumps(v) if not isinstance(v, str) else v}" for k, v in sorted(self.config.items()))


class LayerDamage(BaseModel):
    kl: float = Field(description="mean KL(p_float || p_quantized) per scored position, nats")
    bytes: int = Field(description="the layer's packed bytes with this candidate")


class CandidateSensitivity(BaseModel):
    candidate: Candidate
    identity: QuantizerIdentity
    layers: dict[str, LayerDamage]
    groups: dict[str, float] = Field(description="KL with every layer of the group quantized at once")
    uniform_kl: float = Field(description="KL with every layer quantized (embedding included)")
    uniform_wer: float = Field(description="WER of the uniformly quantized model on the measured utterances")


class SensitivityTable(BaseModel):
    """What `qbench sensitivity` measured; `qbench optimize` reads it."""

    format: str = "qbench-sensitivity"
    model: str
    model_sha256: str
    subset: str
    utterance_ids: list[str]
    calibration_ids: list[str]
    positions: int = Field(description="scored positions (tokens or CTC frames) the KL is averaged over")
    float_wer: float
    #: each layer's bytes kept float, and the bytes of everything that is never quantized
    float_bytes: dict[str, int]
    fixed_bytes: int
    candidates: list[CandidateSensitivity]

    def candidate(self, label: str) -> CandidateSensitivity:
        for c in self.candidates:
            if c.candidate.label == label:
                return c
        raise SensitivityError(f"no candidate {label} in the sensitivity table (it has {', '.join(self.labels())})")

    def labels(self) -> list[str]:
        return [c.candidate.label for c in self.candidates]


def parse_candidate(text: str) -> Candidate:
    """`"gptq bits=3 group_size=64"` -> `Candidate(plugin="gptq", config={"bits": 3, "group_size": 64})`."""
    from qbench.quant.settings import parse_setting_values

    parts = text.split()
    if not parts:
        raise SensitivityError("an empty candidate: give a plugin name and its settings, e.g. 'rtn bits=4'")
    return Candidate(plugin=parts[0], config=parse_setting_values(parts[1:], parts[0]))


def kl_divergence(reference: np.ndarray, other: np.ndarray) -> float:
    """Mean over positions of `KL(p || q)` from log-probabilities `[positions, vocab]`."""
    ref = reference.astype(np.float64)
    return float(np.mean(np.sum(np.exp(ref) * (ref - other.astype(np.float64)), axis=1)))


def group_members(names: list[str]) -> dict[str, list[str]]:
    """The layers of each group in `GROUPS` (groups with none left out)."""
    out = {g: [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in pats)] for g, pats in GROUPS.items()}
    return {g: members for g, members in out.items() if members}


def layer_float_bytes(store: WeightStore, name: str) -> int:
    return int(np.asarray(store.params[name + ".weight"]).nbytes)


def measure_candidate(model: SpeechModel, candidate: Candidate, quantizer: Any, audios: list[np.ndarray],
                      targets: list[Any], reference: np.ndarray, references: list[str],
                      calibration_audios: list[np.ndarray] | None, progress: Progress | None = None) -> CandidateSensitivity:
    """One candidate's damage per layer and per group (see the module docstring)."""
    from qbench.data.scoring import corpus_rate, normalize, word_errors

    float_store = model.store
    infos = float_store.weight_infos()
    policy = QuantizationPolicy(quantize_embeddings=True)
    quantized, _ = quantize_model(model, quantizer, policy, calibration_audios)
    packed = quantized.store.packed

    cache: dict = {}

    def damage(names: list[str]) -> float:
        store = PackedWeightStore(float_store.params, infos, {n: packed[n] for n in names})
        return kl_divergence(reference, model.with_store(store).output_log_probs(audios, targets, cache))

    layers = {}
    for i, name in enumerate(packed):
        layers[name] = LayerDamage(kl=damage([name]), bytes=packed[name].nbytes)
        if progress is not None:
            progress(f"{candidate.label}: layer {i + 1}/{len(packed)} {name}")
    groups = {g: damage(members) for g, members in group_members(list(packed)).items()}
    uniform_kl = kl_divergence(reference, quantized.output_log_probs(audios, targets))
    hyps = quantized.transcribe(audios)
    wer = corpus_rate([word_errors(ref, normalize(h)) for ref, h in zip(references, hyps)])
    return CandidateSensitivity(candidate=candidate, identity=quantizer_identity(quantizer), layers=layers, groups=groups,
                                uniform_kl=uniform_kl, uniform_wer=wer)


def read_table(path: Path) -> SensitivityTable:
    try:
        return SensitivityTable.model_validate_json(Path(path).read_text())
    except FileNotFoundError:
        raise SensitivityError(f"{path}: no sensitivity table (run qbench sensitivity first)") from None
    except ValueError as exc:
        raise SensitivityError(f"{path}: not a sensitivity table ({str(exc).splitlines()[0]})") from None


def write_table(table: SensitivityTable, path: Path) -> Path:
    return write_atomically(path, table.model_dump_json(indent=1) + "\n")


def draw_heatmap(table: SensitivityTable, path: Path) -> Path:
    """Layers x candidates, colour = log10 KL, one PNG (matplotlib: the `leaderboard` extra)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(table.float_bytes)
    labels = table.labels()
    grid = np.array([[max(c.layers[n].kl, 1e-7) if n in c.layers else np.nan for c in table.candidates] for n in names])
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(labels), 0.5 + 0.22 * len(names)))
    im = ax.imshow(np.log10(grid), aspect="auto", cmap="magma_r")
    ax.set_xticks(range(len(labels)), labels, rotation=35, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_title(f"{table.model}: KL of quantizing one layer alone\n({table.subset}, {len(table.utterance_ids)} utterances)",
                 fontsize=9)
    fig.colorbar(im, ax=ax, label="log10 KL (nats / position)")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)
    return path


def measurement_split(ids: list[str], count: int) -> tuple[list[str], list[str]]:
    """`count` ids spread evenly over the sorted list (so several speakers are measured), and
    the rest, which calibrate."""
    ids = sorted(ids)
    if not 1 <= count < len(ids):
        raise SensitivityError(f"measure on 1..{len(ids) - 1} of the {len(ids)} utterances (the rest calibrate), not {count}")
    step = len(ids) / count
    measured = [ids[int(i * step)] for i in range(count)]
    return measured, [i for i in ids if i not in set(measured)]


def run_sensitivity(model_name: str | None, weights: str | None, candidates: list[Candidate], data_dir: str | None,
                    output: Path, subset: str = "dev-clean", count: int = 8, plugin_timeout: float | None = None,
                    progress: Progress | None = None) -> SensitivityTable:
    """Measure every candidate not already in the table at `output` (a table for other weights
    or utterances is an error), writing the table after each candidate, so an interrupted
    measurement resumes where it stopped."""
    from qbench.checkpoints.loader import load_model
    from qbench.data.audio import load_audio
    from qbench.data.calibration import load_calibration
    from qbench.data.librispeech import find_data_dir, list_utterances
    from qbench.data.scoring import normalize
    from qbench.quant.plugin_process import PluginProcess

    say = progress or (lambda message: None)
    loaded = load_model(model_name, weights)
    model = loaded.model
    root = find_data_dir(data_dir, subset)
    present = {u.id: u for u in list_utterances(root, subset)}
    measured, calibrating = measurement_split(list(present), count)
    table = read_table(output) if Path(output).exists() else None
    if table is not None and (table.model_sha256 != loaded.sha256 or table.utterance_ids != measured):
        raise SensitivityError(f"{output}: measured on other weights or utterances; choose another output")
    audios = [load_audio(present[i].path) for i in measured]
    targets = model.teacher_forcing_targets(audios)
    reference = model.output_log_probs(audios, targets)
    refs = [normalize(present[i].transcript) for i in measured]
    if table is None:
        from qbench.data.scoring import corpus_rate, word_errors

        float_wer = corpus_rate([word_errors(r, normalize(h)) for r, h in zip(refs, model.transcribe(audios))])
        names = [info.name for info in model.quantizable_weights()]
        float_bytes = {n: layer_float_bytes(model.store, n) for n in names}
        table = SensitivityTable(model=loaded.name, model_sha256=loaded.sha256, subset=subset, utterance_ids=measured,
                                 calibration_ids=calibrating, positions=int(reference.shape[0]), float_wer=float_wer,
                                 float_bytes=float_bytes, fixed_bytes=model.store.stored_bytes() - sum(float_bytes.values()),
                                 candidates=[])
    cal_audios = None
    for candidate in candidates:
        if candidate.label in table.labels():
            say(f"{candidate.label}: measured already in {output}")
            continue
        with PluginProcess(candidate.plugin, candidate.config, plugin_timeout) as quantizer:
            if quantizer.needs_calibration and cal_audios is None:
                cal_audios, _ = load_calibration(root, subset, None, set(measured), calibrating)
            result = measure_candidate(model, candidate, quantizer, audios, targets, reference, refs,
                                       cal_audios if quantizer.needs_calibration else None, say)
        table.candidates.append(result)
        write_table(table, output)
        say(f"{candidate.label}: uniform KL {result.uniform_kl:.4f}, dev WER {100 * result.uniform_wer:.2f} %")
    return table
