"""The quantized-model artifact: one safetensors file a quantizer's run leaves behind.

It holds every packed layer's buffers (codes, scales, zeros, codebook, input scales, transform
signs, low-rank factors: `PackedTensor.BUFFERS`) as tensors named
`<layer>.codes` etc., and, in the safetensors metadata under "qbench", a manifest: the float
model it applies to (name and weights sha256), the quantizer (name, version, distribution and
its version, full config), the policy, the scale dtype, the calibration utterances, the
layout of every layer, and the artifact's own digest. The float parameters are not in it: they
come from the model's weights, which the sha256 pins. A layer's layout names `vector_dim` only
for a vector-codebook layer, so a scalar layer's layout, and the digest, are as they were
before vector codebooks existed.

The digest is a sha256 over the manifest (without the digest itself) as canonical JSON and
every tensor (name, dtype, shape, bytes) in name order. It depends on nothing but what the
quantizer produced, so quantizing again with the same code, settings, weights and calibration
audio gives the same digest: that is how `qbench verify` checks an entry's quantization, and
how a reader of the file checks it was not edited.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError, model_serializer

from qbench.errors import QBenchError, one_line
from qbench.quant.activation_scheme import ActivationRecord
from qbench.quant.apply import QuantizationPolicy, QuantizerIdentity
from qbench.quant.packing import PackedTensor, check_packed_layout, packed_code_bytes

FORMAT = "qbench-quantized-model"
FORMAT_VERSION = 1
_BUFFERS = PackedTensor.BUFFERS


class ArtifactError(QBenchError, ValueError):
    """An artifact file that cannot be read, does not match its digest, or fits another model."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LayerLayout(_Strict):
    """How one layer's buffers are read (see `qbench.quant.packing.PackedTensor`)."""

    name: str
    shape: tuple[int, int]
    code_bits: int
    packing: Literal["int", "trit5"]
    group_size: int | None
    offset: int
    buffers: list[Literal["codes", "scales", "zeros", "codebook", "input_scales", "hadamard_signs",
                          "lowrank_u", "lowrank_v", "lowrank_u_scales", "lowrank_v_scales"]]
    #: weights per code: 1 for scalar codes, d for a vector codebook (`[out, in / d]` codes)
    vector_dim: int = 1

    @model_serializer(mode="wrap")
    def _without_scalar_vector_dim(self, handler: Any) -> dict[str, Any]:
        # a scalar layer serializes as before vector codebooks existed: its artifact's digest holds
        data = handler(self)
        if data.get("vector_dim") == 1:
            data.pop("vector_dim")
        return data


class ArtifactCalibration(_Strict):
    subset: str
    utterance_ids: list[str]
    utterance_ids_sha256: str
    #: the pass counted padded rows as calibration data (`SpeechModel.calibration_forward`): the
    #: default, and what every calibration did before the field existed
    counts_padding: bool = True
    #: speed-perturbed copies of every utterance, one per speed (`RunSpec.calibration_speeds`)
    speeds: list[float] = []

    @model_serializer(mode="wrap")
    def _without_default_choices(self, handler: Any) -> dict[str, Any]:
        # an artifact calibrated the default way serializes as before the fields: its digest holds
        data = handler(self)
        if data.get("counts_padding") is True:
            data.pop("counts_padding")
        if data.get("speeds") == []:
            data.pop("speeds")
        return data


class ArtifactManifest(_Strict):
    format: Literal["qbench-quantized-model"] = FORMAT
    format_version: Literal[1] = FORMAT_VERSION
    model: str
    model_sha256: str
    quantizer: QuantizerIdentity
    policy: QuantizationPolicy
    scale_dtype: str
    calibration: ArtifactCalibration | None = None
    layers: list[LayerLayout]
    #: for a plan (`quantizer.name == "plan"`, its config the plan): every quantizer it ran
    plan_quantizers: list[QuantizerIdentity] | None = None
    #: the activation scheme the model runs with, static scales included (None: float activations)
    activations: ActivationRecord | None = None
    digest: str = ""

    @model_serializer(mode="wrap")
    def _without_unset_plan(self, handler: Any) -> dict[str, Any]:
        # a manifest of a single quantizer with float activations serializes as before plans
        # and activation schemes existed: its digest holds
        data = handler(self)
        for key in ("plan_quantizers", "activations"):
            if data.get(key) is None:
                data.pop(key, None)
        return data


def _tensors(packed: dict[str, PackedTensor]) -> dict[str, np.ndarray]:
    out = {}
    for name, pt in packed.items():
        for buffer in _BUFFERS:
            value = getattr(pt, buffer)
            if value is not None:
                out[f"{name}.{buffer}"] = np.ascontiguousarray(value)
    return out


def artifact_digest(manifest: ArtifactManifest, tensors: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(manifest.model_dump(mode="json", exclude={"digest"}), sort_keys=True).encode("utf-8"))
    for name in sorted(tensors):
        a = tensors[name]
        h.update(f"\n{name}\t{a.dtype.name}\t{list(a.shape)}\n".encode())
        h.update(memoryview(np.ascontiguousarray(a)).cast("B"))
    return h.hexdigest()


def build_manifest(model: str, model_sha256: str, identity: QuantizerIdentity, policy: QuantizationPolicy,
                   scale_dtype: str, packed: dict[str, PackedTensor],
                   calibration: dict[str, Any] | None = None,
                   plan_quantizers: list[QuantizerIdentity] | None = None,
                   activations: ActivationRecord | None = None) -> ArtifactManifest:
    """The manifest of `packed`, digest included."""
    layers = [LayerLayout(name=name, shape=pt.shape, code_bits=pt.code_bits, packing=pt.packing, group_size=pt.group_size,
                          offset=pt.offset, buffers=[b for b in _BUFFERS if getattr(pt, b) is not None],
                          vector_dim=pt.vector_dim)
              for name, pt in packed.items()]
    cal = None
    if calibration is not None:
        cal = ArtifactCalibration(subset=calibration["subset"], utterance_ids=list(calibration["utterance_ids"]),
                                  utterance_ids_sha256=calibration["utterance_ids_sha256"],
                                  counts_padding=calibration.get("counts_padding", True),
                                  speeds=calibration.get("speeds", []))
    manifest = ArtifactManifest(model=model, model_sha256=model_sha256, quantizer=identity, policy=policy,
                                scale_dtype=scale_dtype, calibration=cal, layers=layers, plan_quantizers=plan_quantizers,
                                activations=activations)
    manifest.digest = artifact_digest(manifest, _tensors(packed))
    return manifest


def write_artifact(path: Path, manifest: ArtifactManifest, packed: dict[str, PackedTensor]) -> Path:
    """Write the artifact atomically (temporary file, then rename)."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(_tensors(packed), str(tmp), metadata={"qbench": manifest.model_dump_json()})
    tmp.replace(path)
    return path


def read_artifact(path: Path) -> tuple[ArtifactManifest, dict[str, PackedTensor]]:
    """The manifest and packed layers of the artifact at `path`, checked against its digest."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="numpy") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except FileNotFoundError:
        raise ArtifactError(f"{path}: no such artifact file") from None
    except Exception as exc:  # safetensors raises its own error types for a corrupt header
        raise ArtifactError(f"{path}: not a safetensors file ({one_line(exc)})") from None
    if "qbench" not in metadata:
        raise ArtifactError(f"{path}: a safetensors file without a qbench manifest")
    try:
        manifest = ArtifactManifest.model_validate_json(metadata["qbench"])
    except ValidationError as exc:
        err = exc.errors()[0]
        raise ArtifactError(f"{path}: malformed manifest ({'.'.join(map(str, err['loc']))}: {err['msg']})") from None
    if artifact_digest(manifest, tensors) != manifest.digest:
        raise ArtifactError(f"{path}: contents do not match the manifest's digest (edited or corrupt)")
    expected = {f"{layer.name}.{b}" for layer in manifest.layers for b in layer.buffers}
    if expected != set(tensors):
        raise ArtifactError(f"{path}: tensors do not match the manifest's layers")
    packed = {}
    for layer in manifest.layers:
        buffers = {b: tensors[f"{layer.name}.{b}"] for b in layer.buffers}
        codes = buffers["codes"]
        if layer.vector_dim < 1 or layer.shape[1] % layer.vector_dim:
            raise ArtifactError(f"{path}: layer {layer.name}: vector_dim {layer.vector_dim} does not divide "
                                f"in_features {layer.shape[1]}")
        # a vector layer stores one code per vector_dim weights
        n = layer.shape[0] * (layer.shape[1] // layer.vector_dim)
        if codes.dtype != np.uint8 or codes.ndim != 1 or codes.size != packed_code_bytes(n, layer.code_bits, layer.packing):
            raise ArtifactError(f"{path}: layer {layer.name}: code buffer does not hold {n} {layer.packing} codes")
        extras = {b: buffers.get(b) for b in PackedTensor.BUFFERS if b not in ("codes", "scales")}
        try:
            pt = PackedTensor(codes=codes, code_bits=layer.code_bits, packing=layer.packing, shape=layer.shape,
                              scales=buffers["scales"], group_size=layer.group_size, offset=layer.offset,
                              vector_dim=layer.vector_dim, **extras)
            check_packed_layout(pt)
        except ValueError as exc:
            raise ArtifactError(f"{path}: layer {layer.name}: {one_line(exc)}") from None
        packed[layer.name] = pt
    return manifest, packed
