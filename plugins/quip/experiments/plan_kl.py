"""How far a quantization plan's model is from float on dev-clean, teacher-forced: a dev signal
for choices at 2 bits, where the tune split's word error rate (22 utterances, 449 words) is
decided by whether one or two hypotheses loop.

The plan's quantizers run in this process and are calibrated on `splits/dev-clean-calibrate.txt`;
the float model's own greedy transcripts of `splits/dev-clean-tune.txt` are teacher-forced through
both models, and the script prints the mean KL(float || quantized) per predicted token and how
often the quantized model's top token is the float one's. Never test-clean.

    python plugins/quip/experiments/plan_kl.py plans/tiny-en-2-bits.json|PLUGIN [--without-padding] [--set KEY=VALUE ...]
        [--calibration-utterances N] [--speed F ...] [--only-bits B]

`--set` overrides a setting in every rule of the plan (e.g. `asym_alpha=0.1`), or with
`--only-bits` in the rules at that many bits only (e.g. `--only-bits 2 --set codebook=d4 --set mse=false`);
`--calibration-utterances` calibrates on the split's first N only, and each `--speed` adds a
speed-perturbed copy of every calibration utterance (`qbench run --calibration-speeds`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from qbench.checkpoints.loader import load_model
from qbench.data.audio import load_audio
from qbench.data.calibration import speed_perturbed
from qbench.data.librispeech import find_data_dir, list_utterances
from qbench.plugin_manager import get_quantizer
from qbench.quant.apply import QuantizationPolicy, quantize_layers
from qbench.quant.plan import PlanRule, QuantizationPlan, read_plan

SPLITS = Path(__file__).resolve().parents[3] / "splits"


def split_audio(root: Path, name: str) -> list[np.ndarray]:
    wanted = set((SPLITS / name).read_text().split())
    return [load_audio(u.path) for u in list_utterances(root, "dev-clean") if u.id in wanted]


def json_or_text(value: str) -> object:
    """`--set` values as `qbench run --set` reads them: JSON where they parse (0.25, true, null), else text (d4)."""
    try:
        return json.loads(value)
    except ValueError:
        return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("plan", help="a plan file, or a plugin name: that plugin on every layer but the embedding (fp16)")
    parser.add_argument("--without-padding", action="store_true", help="count only the decoder rows inference feeds")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--only-bits", type=int, help="apply --set only to the rules with this many bits")
    parser.add_argument("--calibration-utterances", type=int, help="calibrate on only the first N of the split")
    parser.add_argument("--speed", action="append", type=float, default=[],
                        help="add a speed-perturbed copy of every calibration utterance (e.g. 0.9)")
    args = parser.parse_args()
    overrides = {k: json_or_text(v) for k, v in (s.split("=", 1) for s in args.set)}

    model = load_model("whisper-tiny.en").model
    root = find_data_dir(None, "dev-clean")
    tune, calibrate = split_audio(root, "dev-clean-tune.txt"), split_audio(root, "dev-clean-calibrate.txt")
    calibrate = calibrate[: args.calibration_utterances]
    calibrate = calibrate + [speed_perturbed(a, f) for f in args.speed for a in calibrate]
    plan = read_plan(Path(args.plan)) if Path(args.plan).is_file() else QuantizationPlan(name=args.plan, rules=[
        PlanRule(match=("encoder.*", "decoder.blocks.*"), plugin=args.plan), PlanRule(match=("decoder.token_embedding",))])
    quantizers = {}
    assignment = {}
    for layer, rule in plan.assign(model.quantizable_weights()).items():
        if rule.plugin is None:
            continue
        config = dict(rule.config)
        if args.only_bits is None or config.get("bits") == args.only_bits:
            config |= overrides
        key = (rule.plugin, json.dumps(config, sort_keys=True))
        if key not in quantizers:
            quantizers[key] = get_quantizer(rule.plugin)(config)
        assignment[layer] = quantizers[key]
    targets = model.teacher_forcing_targets(tune)
    reference = model.output_log_probs(tune, targets)
    quantized, report = quantize_layers(model, assignment, QuantizationPolicy(), calibrate, count_padding=not args.without_padding)
    other = quantized.output_log_probs(tune, targets)
    kl = float(np.mean(np.sum(np.exp(reference) * (reference - other), axis=1)))
    agree = float(np.mean(reference.argmax(axis=1) == other.argmax(axis=1)))
    print(json.dumps({"plan": plan.name, "count_padding": not args.without_padding, "overrides": overrides, "only_bits": args.only_bits,
                      "calibration_utterances": len(calibrate), "speed": args.speed,
                      "positions": int(reference.shape[0]), "mean_kl": round(kl, 5), "top1_agreement": round(agree, 5),
                      "bits_per_weight": round(report.mean_bits_per_weight, 4)}))


if __name__ == "__main__":
    main()
