"""Would a vector codebook rescue 2 bits? The layer-output error of 2-bit scalar quip against
2-bit vector quantization, with 3-bit quip as the yardstick that works.

QuIP# (arXiv:2402.04396) gets its 2-bit results from two things this plugin lacks: E8-lattice
vector codebooks and fine-tuning. Before building a vector-codebook part into the contract,
this measures what vector quantization would buy on whisper-tiny.en's own layers, on the same
rotated weights and Hessians quip quantizes:

- the statistics are the ones `qbench run --plugin quip --set bits=3 --set mse=true` sees,
  calibrated sequentially on `splits/dev-clean-calibrate.txt` (never test-clean);
- every layer is rotated exactly as quip rotates it (`random_signs(in, 0)`, `rotate_hessian`);
- error = tr(dW H dW^T) / tr(W H W^T), the relative error of the layer's output that GPTQ
  minimises;
- scalar: quip's full-range grid in groups of 128, with and without MSE clipping (2.14 bits per
  weight), and 3-bit with clipping (3.14);
- vector: a k-means codebook of the unit Gaussian (the distribution incoherence processing
  aims for) of d=2 (16 entries) or d=4 (256 entries), both exactly 2 bits per weight plus one
  scale per row, scaled by c times the row's RMS, rounded with block LDLQ (GPTQ's feedback,
  one d-column block at a time: `W[:, later] -= E U_bb^-1 U_b,later` with `U` the upper
  Cholesky factor of `H^-1`; `qbench_quip.lattice.vector_error_feedback`, the sweep quip's
  `codebook=d4` uses).

    python plugins/quip/experiments/two_bit_codebooks.py [--every 5]

Prints one row per measured layer and the median ratio to 3-bit. Needs the shared dev-clean.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from qbench_quip import QuIPQuantizer, rotate_hessian
from qbench_quip.lattice import codeword_values, nearest_codewords, vector_error_feedback

from qbench.checkpoints.loader import load_model
from qbench.data.calibration import load_calibration
from qbench.data.librispeech import find_data_dir
from qbench.quant.apply import quantize_model
from qbench.quant.contract import apply_scales
from qbench.quant.error_feedback import (
    MSEClip,
    UniformGrid,
    error_feedback_quantize,
    gptq_hessian,
)
from qbench.quant.hadamard import hadamard_transform, random_signs

REPO = Path(__file__).resolve().parents[3]


def gaussian_codebook(d: int, k: int, samples: int = 200_000, iterations: int = 60, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((samples, d))
    c = x[rng.choice(samples, k, replace=False)].copy()
    for _ in range(iterations):
        nearest = nearest_codewords(x, c)
        for j in range(k):
            members = nearest == j
            if members.any():
                c[j] = x[members].mean(0)
    return c


def lattice_ldlq(w: np.ndarray, h: np.ndarray, codebook: np.ndarray, c: float) -> np.ndarray:
    """Block LDLQ onto `codebook` scaled per row by c times the row's RMS (quip's `codebook=d4` sweep)."""
    codes, scales = vector_error_feedback(w, h, codebook, group_size=None, scale_multiplier=c)
    return codeword_values(codes, codebook) * scales


def output_error(w: np.ndarray, q: np.ndarray, h: np.ndarray) -> float:
    dw = w - q
    return float(np.trace(dw @ h @ dw.T) / np.trace(w @ h @ w.T))


def scalar_quip(w: np.ndarray, h: np.ndarray, bits: int, mse: bool) -> np.ndarray:
    grid = UniformGrid(bits, symmetric=True, full_range=True, mse=MSEClip() if mse else None)
    r = error_feedback_quantize(w, h, grid, group_size=128)
    return apply_scales(r.codes.astype(np.float32), r.scales, r.zeros, r.group_size).astype(np.float64)


def layer_statistics() -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, weight, H = 2 X^T X / n) of every layer, as quip 3-bit + MSE calibrates them."""
    ids = (REPO / "splits" / "dev-clean-calibrate.txt").read_text().split()
    audios, _ = load_calibration(find_data_dir(None, "dev-clean"), "dev-clean", None, set(), ids)
    seen: list[tuple[np.ndarray, np.ndarray]] = []

    class Recording(QuIPQuantizer):
        def quantize(self, weight, stats):
            seen.append((weight.astype(np.float64), gptq_hessian(stats)))
            return super().quantize(weight, stats)

    model = load_model("whisper-tiny.en").model
    # layers are quantized in execution order, the order quantizable_weights lists them in
    names = [info.name for info in model.quantizable_weights() if info.kind != "embedding"]
    quantize_model(model, Recording({"bits": 3, "mse": True}), None, audios)
    return [(name, w, h) for name, (w, h) in zip(names, seen, strict=True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--every", type=int, default=5, help="measure every k-th layer")
    args = parser.parse_args()
    codebooks = {f"vq d={d}": gaussian_codebook(d, k) for d, k in ((2, 16), (4, 256))}
    columns = ["3-bit mse", "2-bit", "2-bit mse"] + [f"{n} c={c}" for n in codebooks for c in (0.9, 1.1, 1.3)]
    print(f"{'layer':32s} " + " ".join(f"{c:>13s}" for c in columns))
    ratios = []
    for name, w, h in layer_statistics()[:: args.every]:
        signs = random_signs(w.shape[1], 0)
        wr, hr = hadamard_transform(w, signs), rotate_hessian(h, signs)
        errors = [output_error(wr, scalar_quip(wr, hr, b, m), hr) for b, m in ((3, True), (2, False), (2, True))]
        errors += [output_error(wr, lattice_ldlq(wr, hr, cb, c), hr) for cb in codebooks.values() for c in (0.9, 1.1, 1.3)]
        ratios.append([e / errors[0] for e in errors])
        print(f"{name:32s} " + " ".join(f"{e:13.4f}" for e in errors), flush=True)
    print(f"{'median / 3-bit mse':32s} " + " ".join(f"{r:13.2f}" for r in np.median(ratios, axis=0)))


if __name__ == "__main__":
    main()
