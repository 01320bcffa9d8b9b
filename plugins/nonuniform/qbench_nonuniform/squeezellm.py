"""SqueezeLLM's dense non-uniform quantization: a sensitivity-weighted k-means codebook per row.

Kim et al., "SqueezeLLM: Dense-and-Sparse Quantization" (arXiv 2306.07629), section 3.
Written after the reference `quantization/nuq.py` (SqueezeAILab/SqueezeLLM): for every output
row, scikit-learn's `KMeans(n_clusters=2^bits, max_iter=50, random_state=0)` is fitted to the
row's weights with `sample_weight` = the row's squared gradients (the diagonal Fisher
information), exact-zero weights getting weight 0 and an all-zero weighting replaced by ones;
the row's codebook is the cluster centres and its codes the cluster labels. The optional
dense-and-sparse outlier split is not implemented.

Sensitivity without gradients. The harness has no loss gradients, only each layer's input
statistics `X^T X`, so every weight `w[r, c]` is weighted by `diag(X^T X)[c] / n_rows`, the mean
squared input of column `c`: the diagonal of the layer's Hessian proxy, the same per-column
importance GPTQ's Hessian `2 X^T X / n` gives. It is the Fisher diagonal under the usual
factorisation `E[g_r^2 x_c^2] ~ E[g_r^2] E[x_c^2]` (`g_r` the gradient of the row's output):
the row factor `E[g_r^2]` scales a whole row's weights alike and cannot move that row's
centroids, so only the column factor matters. It also is what the layer's output error
weighs: rounding `w[r, c]` by `e` adds `e^2 E[x_c^2]` to the row output's expected squared
error (ignoring cross terms). `weighted=false` gives plain k-means (unit weights), and so do
layers quantized without statistics.

The clustering differs from scikit-learn's in its initialisation, not its objective. The
weights are one-dimensional, so Lloyd's algorithm runs on all rows at once, each sorted once.
Clusters are then contiguous runs of the sorted row; the assignment step is a search of
the centroid midpoints in it and the update step differences of prefix sums of `h` and `h w`.
The initialisation is deterministic instead of k-means++ with a seed: plain (unit-weight)
k-means starts at the row's quantiles `(j + 1/2) / K`, and the weighted k-means starts at plain
k-means' centroids. Lloyd never raises its objective, so the weighted error of the result is
never above plain k-means' (before the float16 rounding below). Started at the quantiles
instead, weighted Lloyd stalled in poor local minima: on whisper-tiny.en's dev-clean statistics
its weighted error was above plain k-means' in 19 of 46 layers at 4 bits, and on heavy-tailed
synthetic rows with spread-out column weights the warm start cut it 1.25-3x.

Each Lloyd run stops when no assignment in its chunk of `ROW_CHUNK` rows changes (an exact
fixed point: further rounds would change nothing, so the result does not depend on the
chunking) or after `iterations` centroid updates (the reference's `max_iter` is 50). A cluster
holding no sample weight keeps its centroid.

The harness stores a per-row codebook at the scale dtype (float16), so the final centroids are
rounded to float16 and the codes are the nearest of those rounded values: the codes are exactly
nearest-centroid for the codebook the model runs with. Scales are a single 1 (`[1, 1]`).
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from qbench import LayerStats, QuantizedTensor, Quantizer, QuantizerConfig, hookimpl

#: rows clustered together: bounds the working memory (about ten float64 arrays of
#: `rows x in_features`) while keeping numpy's per-call overhead negligible
ROW_CHUNK = 2048


def float32_keys(x: np.ndarray) -> np.ndarray:
    """int64 keys ordered like the float32 values `x` (and -0.0 == +0.0): float32's bit pattern
    is sign-magnitude, so negative values are flipped to count down."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.int32).astype(np.int64)
    return np.where(bits < 0, -(bits & 0x7FFFFFFF), bits)


class SortedRows:
    """The rows of a float32 matrix `[R, n]`, each sorted once, searchable all at once.

    `count_below` is one exact `searchsorted` for every row: each row's keys are offset by
    `row * 2^33` (float32 keys span less than 2^32), so the concatenated rows are one sorted
    array, and its keys are built here once rather than at every Lloyd round.
    """

    def __init__(self, x: np.ndarray):
        x = np.asarray(x, dtype=np.float32)
        self.order = np.argsort(x, axis=1, kind="stable")
        self.values = np.take_along_axis(x, self.order, axis=1)
        self.shape = self.values.shape
        self._offset = (np.arange(self.shape[0], dtype=np.int64) << 33)[:, None]
        self._keys = (float32_keys(self.values) + self._offset).reshape(-1)

    def count_below(self, thresholds: np.ndarray) -> np.ndarray:
        """`out[r, j]` = how many values of row `r` are `< thresholds[r, j]` (float64).

        A float64 threshold `t` is replaced by the smallest float32 `>= t`: a float32 value is
        below that exactly when it is below `t`.
        """
        thresholds = np.asarray(thresholds, dtype=np.float64)
        t32 = thresholds.astype(np.float32)
        t32 = np.where(t32 < thresholds, np.nextafter(t32, np.float32(np.inf)), t32)
        found = np.searchsorted(self._keys, (float32_keys(t32) + self._offset).reshape(-1), side="left")
        return found.reshape(thresholds.shape) - (np.arange(self.shape[0]) * self.shape[1])[:, None]

    def cluster_starts(self, centroids: np.ndarray) -> np.ndarray:
        """`[R, K + 1]`: where each nearest-centroid cluster of the sorted centroids `[R, K]`
        starts in the sorted rows (a value exactly between two goes to the upper one), then `n`."""
        n_rows, n = self.shape
        inner = self.count_below((centroids[:, 1:] + centroids[:, :-1]) / 2)
        return np.concatenate([np.zeros((n_rows, 1), np.int64), inner, np.full((n_rows, 1), n, np.int64)], axis=1)

    def nearest_codes(self, codebook: np.ndarray) -> np.ndarray:
        """uint8 index (in the original column order) of each value's nearest entry of its
        row's sorted `codebook` `[R, K]`."""
        n_rows, n = self.shape
        starts = self.cluster_starts(codebook.astype(np.float64))[:, 1:-1]
        # the code at a sorted position is the number of cluster starts at or before it
        marks = np.zeros((n_rows, n + 1), np.int16)
        np.add.at(marks, (np.arange(n_rows)[:, None], starts), 1)
        codes = np.empty((n_rows, n), np.int16)
        np.put_along_axis(codes, self.order, np.cumsum(marks[:, :-1], axis=1), axis=1)
        return codes.astype(np.uint8)


def weighted_kmeans_rows(x: np.ndarray | SortedRows, h: np.ndarray, k: int, iterations: int,
                         init: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """Sorted centroids `[R, k]` of weighted 1-D k-means (Lloyd) on each row of `x` `[R, n]` with
    non-negative sample weights `h` `[R, n]` (each row's sum > 0), and the centroid updates run.

    Starts from the sorted centroids `init` `[R, k]`, or else at each row's quantiles.
    """
    rows = x if isinstance(x, SortedRows) else SortedRows(x)
    xs = rows.values
    hs = np.take_along_axis(np.asarray(h, dtype=np.float64), rows.order, axis=1)
    pad = np.zeros((xs.shape[0], 1))
    cum_h = np.concatenate([pad, np.cumsum(hs, axis=1)], axis=1)
    cum_hx = np.concatenate([pad, np.cumsum(hs * xs, axis=1)], axis=1)

    if init is None:
        # the row's (unweighted) quantiles: distinct whenever the row has K distinct values,
        # even when one column carries nearly all the sample weight
        n = xs.shape[1]
        centroids = xs[:, np.minimum(((np.arange(k) + 0.5) * n / k).astype(np.int64), n - 1)].astype(np.float64)
    else:
        centroids = np.sort(np.asarray(init, dtype=np.float64), axis=1)

    bounds = rows.cluster_starts(centroids)
    rounds = 0
    while rounds < iterations:
        mass = np.diff(np.take_along_axis(cum_h, bounds, axis=1), axis=1)
        moment = np.diff(np.take_along_axis(cum_hx, bounds, axis=1), axis=1)
        # sorting keeps the order if a weightless cluster's stale centroid falls out of place
        centroids = np.sort(np.where(mass > 0, moment / np.where(mass > 0, mass, 1.0), centroids), axis=1)
        rounds += 1
        new_bounds = rows.cluster_starts(centroids)
        if np.array_equal(new_bounds, bounds):
            break  # no weight changed cluster: the centroids are a fixed point
        bounds = new_bounds
    return centroids, rounds


def sensitivity(weight: np.ndarray, stats: LayerStats | None, weighted: bool) -> np.ndarray:
    """SqueezeLLM's `sample_weight` with `diag(X^T X) / n_rows` standing in for the squared
    gradients (see the module docstring); exact-zero weights weigh 0, as in `nuq.py`, and a
    row left with no weight at all is weighted uniformly."""
    if weighted and stats is not None:
        column = np.clip(np.diag(stats.xtx) / max(stats.n_rows, 1), 0.0, None)
    else:
        column = np.ones(weight.shape[1])
    h = np.where(weight != 0, column[None, :], 0.0)
    return np.where(h.sum(axis=1, keepdims=True) > 0, h, 1.0)


class SqueezeLLMQuantizer(Quantizer):
    name = "squeezellm"
    description = "SqueezeLLM: per-row k-means codebook weighted by input energy (diag X^T X)"
    needs_calibration = True

    class Config(QuantizerConfig):
        bits: int = Field(4, ge=2, le=8, description="bits per code: 2^bits centroids in each row's codebook")
        iterations: int = Field(50, ge=1, le=1000, description="at most this many Lloyd rounds per k-means run (plain, then weighted from it); stops earlier at a fixed point; the reference's max_iter is 50")
        weighted: bool = Field(
            True, description="weight each weight by its input column's mean squared activation, diag(X^T X)/n (SqueezeLLM's sensitivity); false = plain k-means"
        )

    config: Config

    def quantize(self, weight: np.ndarray, stats: LayerStats | None) -> QuantizedTensor:
        k = 1 << self.config.bits
        w = np.asarray(weight, dtype=np.float32)
        plain = sensitivity(w, None, weighted=False)
        weighted = self.config.weighted and stats is not None
        h = sensitivity(w, stats, weighted=True) if weighted else plain
        codebook = np.empty((w.shape[0], k), np.float32)
        codes = np.empty(w.shape, np.uint8)
        for start in range(0, w.shape[0], ROW_CHUNK):
            block = slice(start, start + ROW_CHUNK)
            rows = SortedRows(w[block])
            centroids, _ = weighted_kmeans_rows(rows, plain[block], k, self.config.iterations)
            if weighted:
                # warm start at plain k-means: Lloyd never raises its objective, so the weighted
                # error ends no higher than plain k-means' (from the quantiles it often did)
                centroids, _ = weighted_kmeans_rows(rows, h[block], k, self.config.iterations, init=centroids)
            # the codebook the harness stores (float16, sorted), and the codes nearest in it
            stored = np.sort(centroids.astype(np.float16).astype(np.float32), axis=1)
            codebook[block] = stored
            codes[block] = rows.nearest_codes(stored)
        return QuantizedTensor(codes=codes, code_bits=self.config.bits, scales=np.ones((1, 1), np.float32),
                               group_size=None, codebook=codebook, signed=False)


@hookimpl
def qbench_register_quantizers() -> list[type[Quantizer]]:
    return [SqueezeLLMQuantizer]
