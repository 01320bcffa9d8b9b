"""A checkpoint's pickle can build tensors and containers, and nothing else.

Every malicious pickle here is built by the test and would create a marker file if unpickled
the ordinary way; each test reads it through qbench first (refused, one line naming the file
and the global, no marker), then through `pickle.loads` or `torch.load` to prove the payload
was live (the marker appears). The allowlist itself is checked against what torch really
writes, so it can neither miss a global real checkpoints use nor keep one they do not.
"""

from __future__ import annotations

import collections
import json
import pickle
import pickletools
import shlex
import struct
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from qbench.checkpoints.errors import CheckpointError
from qbench.checkpoints.hf_wav2vec2 import load_hf_wav2vec2
from qbench.checkpoints.hf_whisper import load_hf_whisper
from qbench.checkpoints.openai_whisper import load_openai_whisper
from qbench.checkpoints.torch_pickle import ALLOWED_GLOBALS, load_torch_checkpoint

FIXTURES = Path(__file__).parent / "fixtures" / "wav2vec2"


# --------------------------------------------------------------------------------------------
# Hand-assembled pickles: a callable reached by GLOBAL, STACK_GLOBAL or INST, then called
# --------------------------------------------------------------------------------------------
def _unicode(text: str) -> bytes:
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw  # BINUNICODE


def _argument(value: str | list[str]) -> bytes:
    if isinstance(value, list):
        return b"](" + b"".join(_unicode(v) for v in value) + b"e"  # EMPTY_LIST MARK ... APPENDS
    return _unicode(value)


def call_pickle(module: str, name: str, args: tuple, opcode: str) -> bytes:
    """`{"encoder.conv1.weight": module.name(*args)}` as a pickle, the call made the `opcode` way."""
    arguments = b"(" + b"".join(_argument(a) for a in args)  # MARK args...
    if opcode == "GLOBAL":  # protocol 2, what torch.save writes
        head, call = b"\x80\x02", b"c" + f"{module}\n{name}\n".encode() + arguments + b"tR"
    elif opcode == "STACK_GLOBAL":  # protocol 4
        head, call = b"\x80\x04", _unicode(module) + _unicode(name) + b"\x93" + arguments + b"tR"
    else:  # INST, protocol 0: looks the callable up and calls it in one opcode
        head, call = b"", arguments + b"i" + f"{module}\n{name}\n".encode()
    return head + b"}" + _unicode("encoder.conv1.weight") + call + b"s."


def torch_zip(path: Path, data_pkl: bytes) -> Path:
    """The zip layout torch.save writes around `data.pkl`."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", data_pkl)
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")
    return path


PAYLOADS: dict[str, tuple[str, str, Callable[[Path], tuple]]] = {
    "os.system": ("os", "system", lambda m: (f"touch {shlex.quote(str(m))}",)),
    "builtins.eval": ("builtins", "eval", lambda m: (f"open({str(m)!r}, 'w').close()",)),
    "subprocess.Popen": ("subprocess", "Popen", lambda m: (["touch", str(m)],)),
    "__builtin__.exec": ("__builtin__", "exec", lambda m: (f"open({str(m)!r}, 'w').close()",)),
}


def run_control(data_pkl: bytes) -> None:
    """Unpickle the ordinary way, waiting for a Popen: the payload must really act."""
    value = pickle.loads(data_pkl)["encoder.conv1.weight"]
    if isinstance(value, subprocess.Popen):
        value.wait()


@pytest.mark.parametrize(("payload", "opcode"), [
    (payload, opcode) for payload in sorted(PAYLOADS) for opcode in ("GLOBAL", "STACK_GLOBAL", "INST")
    # Python 2's module names are mapped to Python 3's only in protocols 0-2
    if not (payload.startswith("__builtin__") and opcode == "STACK_GLOBAL")
])
def test_code_execution_globals_are_refused_and_run_nothing(tmp_path: Path, payload: str, opcode: str) -> None:
    module, name, make_args = PAYLOADS[payload]
    marker = tmp_path / "pwned"
    data_pkl = call_pickle(module, name, make_args(marker), opcode)

    zipped = torch_zip(tmp_path / "evil.pt", data_pkl)
    with pytest.raises(CheckpointError) as refused:
        load_torch_checkpoint(zipped)
    message = str(refused.value)
    assert message.startswith(f"{zipped}: refusing to unpickle {module}.{name}: ") and "\n" not in message

    # the same stream as a bare file (the pre-1.6 layout) is refused without being unpickled
    bare = tmp_path / "bare.pt"
    bare.write_bytes(data_pkl)
    never_unpickled = "never unpickled" if data_pkl[:1] == b"\x80" else "not a PyTorch checkpoint"
    with pytest.raises(CheckpointError, match=f"bare.pt: .*{never_unpickled}"):
        load_torch_checkpoint(bare)
    assert not marker.exists()

    run_control(data_pkl)
    assert marker.exists()


ALLOWED_LOOKING = [
    ("torch._utils", "_rebuild_tensor"),  # v1: torch.save has not written it since 2018
    ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch._utils", "_rebuild_device_tensor_from_numpy"),
    ("torch.storage", "_load_from_bytes"),  # calls torch.load on embedded bytes
    ("torch", "UntypedStorage"),
    ("torch", "Tensor"),
    ("torch", "load"),
    ("collections", "defaultdict"),
    ("collections", "OrderedDict.fromkeys"),  # protocol 4 resolves dotted names
    ("numpy.core.multiarray", "_reconstruct"),
    ("_codecs", "encode"),
    ("builtins", "getattr"),
    ("builtins", "set"),
]


@pytest.mark.parametrize(("module", "name"), ALLOWED_LOOKING)
def test_globals_that_look_allowed_but_are_not_on_the_list_are_refused(tmp_path: Path, module: str,
                                                                       name: str) -> None:
    path = torch_zip(tmp_path / "odd.pt", call_pickle(module, name, (), "STACK_GLOBAL"))
    with pytest.raises(CheckpointError, match=rf"odd\.pt: refusing to unpickle {module}\.{name}: "):
        load_torch_checkpoint(path)


def test_a_refused_module_is_not_even_imported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "imported"
    (tmp_path / "qbench_side_effect.py").write_text(f"open({str(marker)!r}, 'w').close()\ndef f(): pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    data_pkl = call_pickle("qbench_side_effect", "f", (), "GLOBAL")
    with pytest.raises(CheckpointError, match=r"refusing to unpickle qbench_side_effect\.f"):
        load_torch_checkpoint(torch_zip(tmp_path / "evil.pt", data_pkl))
    assert not marker.exists() and "qbench_side_effect" not in sys.modules

    monkeypatch.delitem(sys.modules, "qbench_side_effect", raising=False)
    pickle.loads(data_pkl)
    assert marker.exists()


def test_build_cannot_alter_an_allowed_global(tmp_path: Path) -> None:
    """BUILD sets attributes on the object below it; on a storage type it must fail, not stick."""
    build = (b"\x80\x02ctorch\nFloatStorage\n}" + _unicode("dtype") + _unicode("O") + b"sb.")
    with pytest.raises(CheckpointError, match=r"build\.pt: corrupt pickle stream"):
        load_torch_checkpoint(torch_zip(tmp_path / "build.pt", build))
    assert ALLOWED_GLOBALS["torch", "FloatStorage"].dtype == np.dtype("<f4")


def test_persistent_ids_other_than_storages_are_refused(tmp_path: Path) -> None:
    # ("storage", collections.OrderedDict, "0", "cpu", 1): right shape, a type that is no storage
    pid = (b"(" + _unicode("storage") + b"ccollections\nOrderedDict\n" + _unicode("0") + _unicode("cpu")
           + b"K\x01tQ")
    with pytest.raises(CheckpointError, match=r"pid\.pt: unsupported persistent id"):
        load_torch_checkpoint(torch_zip(tmp_path / "pid.pt", b"\x80\x02" + pid + b"."))


# --------------------------------------------------------------------------------------------
# Through each loader, and with files written by torch itself
# --------------------------------------------------------------------------------------------
def _evil_bin(tmp_path: Path, marker: Path) -> bytes:
    data_pkl = call_pickle("os", "system", (f"touch {shlex.quote(str(marker))}",), "GLOBAL")
    return torch_zip(tmp_path / "payload.zip", data_pkl).read_bytes()


HF_WHISPER_CONFIG = {"model_type": "whisper", "num_mel_bins": 4, "max_source_positions": 6, "d_model": 8,
                     "encoder_attention_heads": 2, "encoder_layers": 1, "vocab_size": 16,
                     "max_target_positions": 5, "decoder_attention_heads": 2, "decoder_layers": 1}


@pytest.mark.parametrize("loader", ["openai-pt", "hf-whisper", "hf-wav2vec2"])
def test_every_pickle_reading_loader_refuses_a_payload(tmp_path: Path, loader: str) -> None:
    marker = tmp_path / "pwned"
    evil = _evil_bin(tmp_path, marker)
    directory = tmp_path / "model"
    directory.mkdir()
    if loader == "openai-pt":
        (directory / "tiny.pt").write_bytes(evil)
        load, target = load_openai_whisper, directory / "tiny.pt"
    elif loader == "hf-whisper":
        (directory / "config.json").write_text(json.dumps(HF_WHISPER_CONFIG))
        (directory / "pytorch_model.bin").write_bytes(evil)
        load, target = load_hf_whisper, directory
    else:
        for name in ("config.json", "vocab.json"):
            (directory / name).write_bytes((FIXTURES / "wav2vec2-base-960h" / name).read_bytes())
        (directory / "pytorch_model.bin").write_bytes(evil)
        load, target = load_hf_wav2vec2, directory
    with pytest.raises(CheckpointError, match=r"(tiny\.pt|pytorch_model\.bin): refusing to unpickle os\.system"):
        load(target)
    assert not marker.exists()


class _Payload:
    """What an attacker puts in a real checkpoint: an object whose pickle calls os.system."""

    def __init__(self, marker: Path) -> None:
        self.command = f"touch {shlex.quote(str(marker))}"

    def __reduce__(self):
        import os

        return os.system, (self.command,)


def test_a_real_torch_save_with_a_payload_among_tensors(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    marker = tmp_path / "pwned"
    path = tmp_path / "pytorch_model.bin"
    torch.save(collections.OrderedDict(weight=torch.ones(3), bias=_Payload(marker)), path)
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: refusing to unpickle posix\.system"):
        load_torch_checkpoint(path)
    assert not marker.exists()

    torch.load(path, weights_only=False)  # what the file does to a reader that trusts it
    assert marker.exists()


def _globals_in(path: Path) -> set[tuple[str, str]]:
    """The globals a torch zip's data.pkl names, read with pickletools (which runs nothing)."""
    with zipfile.ZipFile(path) as z:
        data = z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))
    found, strings = set(), []
    for opcode, arg, _ in pickletools.genops(data):
        if opcode.name == "GLOBAL":
            found.add(tuple(arg.split(" ", 1)))
        elif opcode.name == "STACK_GLOBAL":
            found.add((strings[-2], strings[-1]))
        elif isinstance(arg, str):
            strings.append(arg)
    return found


def test_the_allowlist_is_exactly_what_real_checkpoints_use(tmp_path: Path) -> None:
    """State dicts of HF Whisper and wav2vec2 (legacy weight_g/weight_v names), an openai-style
    `.pt`, a Parameter and a tensor of every storage type: together they use every allowed
    global, and no other."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    whisper = transformers.WhisperForConditionalGeneration(transformers.WhisperConfig(
        vocab_size=16, num_mel_bins=4, d_model=8, encoder_layers=1, encoder_attention_heads=2,
        decoder_layers=1, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
        max_source_positions=6, max_target_positions=5, pad_token_id=1, bos_token_id=2, eos_token_id=3,
        decoder_start_token_id=2))
    hf_config = json.loads((FIXTURES / "wav2vec2-base-960h" / "config.json").read_text())
    hf_config.update(hidden_size=16, num_attention_heads=2, intermediate_size=32, num_hidden_layers=1,
                     conv_dim=[8] * 7, num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2)
    wav2vec2 = transformers.Wav2Vec2ForCTC(transformers.Wav2Vec2Config(**hf_config))
    legacy = {k.replace("parametrizations.weight.original0", "weight_g")
               .replace("parametrizations.weight.original1", "weight_v"): v
              for k, v in wav2vec2.state_dict().items()}
    assert any(k.endswith("weight_g") for k in legacy)
    dtypes = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32,
              torch.int16, torch.int8, torch.uint8, torch.bool]
    saved = {
        "whisper.bin": whisper.state_dict(),
        "wav2vec2.bin": legacy,
        "openai.pt": {"dims": {"n_mels": 4}, "model_state_dict": collections.OrderedDict(
            w=torch.ones(2, dtype=torch.float16))},
        "parameter.pt": {"p": torch.nn.Parameter(torch.ones(2))},
        "dtypes.pt": {str(d): torch.zeros(2, dtype=d) for d in dtypes},
    }
    used: set[tuple[str, str]] = set()
    for name, obj in saved.items():
        torch.save(obj, tmp_path / name)
        used |= _globals_in(tmp_path / name)
        load_torch_checkpoint(tmp_path / name)  # and each reads
    assert used == set(ALLOWED_GLOBALS)


# --------------------------------------------------------------------------------------------
# Safetensors wins: with both files present the pickle is not opened, nor its reader imported
# --------------------------------------------------------------------------------------------
_LOAD_IN_FRESH_PYTHON = """
import sys
from {module} import {function} as load
load(sys.argv[1])
assert "qbench.checkpoints.torch_pickle" not in sys.modules, "the unpickler was imported"
print("loaded")
"""


@pytest.mark.parametrize("architecture", ["whisper", "wav2vec2"])
def test_safetensors_is_read_and_the_pickle_never_opened(tmp_path: Path, architecture: str) -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if architecture == "whisper":
        model = transformers.WhisperForConditionalGeneration(transformers.WhisperConfig(
            vocab_size=16, num_mel_bins=4, d_model=8, encoder_layers=1, encoder_attention_heads=2,
            decoder_layers=1, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
            max_source_positions=6, max_target_positions=5, pad_token_id=1, bos_token_id=2,
            eos_token_id=3, decoder_start_token_id=2))
        module, function = "qbench.checkpoints.hf_whisper", "load_hf_whisper"
    else:
        hf_config = json.loads((FIXTURES / "wav2vec2-base-960h" / "config.json").read_text())
        hf_config.update(hidden_size=16, num_attention_heads=2, intermediate_size=32, num_hidden_layers=1,
                         conv_dim=[8] * 7, num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2)
        model = transformers.Wav2Vec2ForCTC(transformers.Wav2Vec2Config(**hf_config))
        module, function = "qbench.checkpoints.hf_wav2vec2", "load_hf_wav2vec2"
    directory = tmp_path / "model"
    model.save_pretrained(directory)
    if architecture == "wav2vec2":
        (directory / "vocab.json").write_bytes((FIXTURES / "wav2vec2-base-960h" / "vocab.json").read_bytes())
    marker = tmp_path / "pwned"
    (directory / "pytorch_model.bin").write_bytes(_evil_bin(tmp_path, marker))

    script = _LOAD_IN_FRESH_PYTHON.format(module=module, function=function)
    run = subprocess.run([sys.executable, "-c", script, str(directory)], capture_output=True, text=True,
                         check=False)
    assert run.returncode == 0 and run.stdout.strip() == "loaded", run.stderr
    assert not marker.exists()

    (directory / "model.safetensors").unlink()  # now only the pickle is left, and it is refused
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: refusing to unpickle os\.system"):
        (load_hf_whisper if architecture == "whisper" else load_hf_wav2vec2)(directory)
    assert not marker.exists()
