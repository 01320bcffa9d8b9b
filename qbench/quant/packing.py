"""Bit-exact storage of quantized weights: what would be flashed onto a device.

The harness packs, not the plugin, so every quantizer's size is measured with the same layout:

* `pack_bits`: unsigned codes of 2..8 bits as one contiguous little-endian bit stream (code `i`
  occupies bits `[i*b, (i+1)*b)`; 8 bits is one byte per code, 4 bits two per byte, low nibble
  first), `ceil(n * b / 8)` bytes.
* `pack_trits`: ternary codes five per byte (`sum(t_j * 3^j)`, `3^5 = 243 <= 256`), i.e.
  1.6 bits per weight, `ceil(n / 5)` bytes.

A vector-codebook layer (`vector_dim = d > 1`) stores `out * in / d` codes, one per `d`
weights, with `pack_bits`: its codes cost `code_bits / d` bits per weight.

`PackedTensor` is the stored form of a layer; `.nbytes` is the sum of its real buffers.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from qbench.quant.contract import (
    LowRankDtype,
    Packing,
    QuantizedTensor,
    apply_scales,
    codebook_values,
    to_original_space,
)
from qbench.quant.hadamard import hadamard_transform

# Eight codes of at most 8 bits fill at most one uint64: the unit of the vectorized packer.
_CODES_PER_WORD = 8
# Codes handled per vectorized step (a multiple of 8): bounds the uint64 temporaries to ~16 MB
# even for a 66M-weight embedding table.
_CHUNK_CODES = 1 << 20
_TRITS_PER_BYTE = 5
_POW3 = 3 ** np.arange(_TRITS_PER_BYTE, dtype=np.int64)
# Every byte value 0..242 decoded to its five trits (as -1/0/1); built once at import.
_TRIT_TABLE = ((np.arange(243)[:, None] // _POW3[None, :]) % 3 - 1).astype(np.int8)
_TRIT_TABLE_F32 = _TRIT_TABLE.astype(np.float32)


@lru_cache(maxsize=16)
def _byte_table(bits: int, offset: int) -> np.ndarray:
    """`[256, 8 // bits]` float32: the codes (minus `offset`) one byte holds, low bits first."""
    per_byte = 8 // bits
    shifts = np.arange(per_byte) * bits
    codes = (np.arange(256)[:, None] >> shifts[None, :]) & ((1 << bits) - 1)
    return (codes - offset).astype(np.float32)


def packed_code_bytes(n: int, bits: int, packing: Packing = "int") -> int:
    """Exact size of the code buffer for `n` codes."""
    if packing == "trit5":
        return -(-n // _TRITS_PER_BYTE)
    return -(-n * bits // 8)


def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned codes in `[0, 2^bits)` (any shape, C order) into `ceil(n*bits/8)` bytes."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    flat = np.asarray(codes).reshape(-1)
    n = flat.size
    if n and (int(flat.min()) < 0 or int(flat.max()) >= 1 << bits):
        raise ValueError(f"codes outside [0, {(1 << bits) - 1}] cannot be packed in {bits} bits")
    if bits == 8:
        return flat.astype(np.uint8)
    out = np.empty(packed_code_bytes(n, bits), dtype=np.uint8)
    shifts = (np.arange(_CODES_PER_WORD, dtype=np.uint64) * np.uint64(bits))[None, :]
    for start in range(0, n, _CHUNK_CODES):
        part = flat[start : start + _CHUNK_CODES]
        n_words = -(-part.size // _CODES_PER_WORD)
        padded = np.zeros(n_words * _CODES_PER_WORD, dtype=np.uint64)
        padded[: part.size] = part
        words = np.bitwise_or.reduce(padded.reshape(n_words, _CODES_PER_WORD) << shifts, axis=1).astype("<u8")
        # Eight b-bit codes use exactly the low b bytes of their word.
        stream = words.view(np.uint8).reshape(n_words, 8)[:, :bits].reshape(-1)
        lo = start * bits // 8
        out[lo : lo + min(stream.size, out.size - lo)] = stream[: out.size - lo]
    return out


def unpack_bits(buf: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Inverse of `pack_bits`: the first `n` codes as uint8."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    buf = np.asarray(buf, dtype=np.uint8).reshape(-1)
    need = packed_code_bytes(n, bits)
    if buf.size < need:
        raise ValueError(f"{n} codes of {bits} bits need {need} bytes, buffer has {buf.size}")
    if bits == 8:
        return buf[:n].copy()
    out = np.empty(n, dtype=np.uint8)
    shifts = (np.arange(_CODES_PER_WORD, dtype=np.uint64) * np.uint64(bits))[None, :]
    mask = np.uint64((1 << bits) - 1)
    for start in range(0, n, _CHUNK_CODES):
        count = min(_CHUNK_CODES, n - start)
        n_words = -(-count // _CODES_PER_WORD)
        lo = start * bits // 8
        chunk = np.zeros(n_words * bits, dtype=np.uint8)
        avail = buf[lo : min(lo + n_words * bits, need)]
        chunk[: avail.size] = avail
        raw = np.zeros((n_words, 8), dtype=np.uint8)
        raw[:, :bits] = chunk.reshape(n_words, bits)
        words = raw.reshape(-1).view("<u8")
        out[start : start + count] = ((words[:, None] >> shifts) & mask).reshape(-1)[:count]
    return out


def pack_trits(codes: np.ndarray) -> np.ndarray:
    """Pack codes in {-1, 0, 1} five per byte: `ceil(n/5)` bytes."""
    flat = np.asarray(codes).reshape(-1)
    n = flat.size
    if n and (int(flat.min()) < -1 or int(flat.max()) > 1):
        raise ValueError("trit packing needs codes in {-1, 0, 1}")
    n_bytes = packed_code_bytes(n, 2, "trit5")
    padded = np.zeros(n_bytes * _TRITS_PER_BYTE, dtype=np.int64)
    padded[:n] = flat.astype(np.int64) + 1
    return (padded.reshape(n_bytes, _TRITS_PER_BYTE) @ _POW3).astype(np.uint8)


def unpack_trits(buf: np.ndarray, n: int) -> np.ndarray:
    """Inverse of `pack_trits`: the first `n` codes as int8 in {-1, 0, 1}."""
    buf = np.asarray(buf, dtype=np.uint8).reshape(-1)
    need = packed_code_bytes(n, 2, "trit5")
    if buf.size < need:
        raise ValueError(f"{n} trits need {need} bytes, buffer has {buf.size}")
    if need and int(buf[:need].max()) >= 243:
        raise ValueError("corrupt trit buffer: byte value >= 243")
    return _TRIT_TABLE[buf[:need]].reshape(-1)[:n].copy()


@dataclass
class PackedTensor:
    """One quantized layer as stored: packed codes plus scales/zeros at storage precision.

    `codes` is the packed uint8 buffer; stored (unsigned) codes are the plugin's codes plus
    `offset` (`2^(bits-1)` for signed int codes, else 0). `zeros` is uint8 when it holds
    integer zero points (the usual asymmetric layout), else the scale dtype. A one-per-tensor
    codebook is float32, one per row or group is at the scale dtype (it is a per-row cost, like
    scales). `input_scales` are float32 (in_features floats), `hadamard_signs` int8, and the
    low-rank factors float16, or int8 with float16 absmax scales per row of U (`lowrank_u_scales`)
    and of V (`lowrank_v_scales`).

    `shape` is always the weight's `[out, in]`. With `vector_dim = d > 1` the buffer holds
    `code_shape = [out, in / d]` codes, each indexing a row of the `[K, d]` float32 codebook (one
    for the tensor, a constant like a `[K]` one); every reader below goes through
    `code_shape` / `n_codes`, so row ranges of codes and of weights stay apart.
    """

    codes: np.ndarray
    code_bits: int
    packing: Packing
    shape: tuple[int, int]
    scales: np.ndarray
    group_size: int | None = None
    zeros: np.ndarray | None = None
    codebook: np.ndarray | None = None
    offset: int = 0
    input_scales: np.ndarray | None = None
    hadamard_signs: np.ndarray | None = None
    lowrank_u: np.ndarray | None = None
    lowrank_v: np.ndarray | None = None
    lowrank_u_scales: np.ndarray | None = None
    lowrank_v_scales: np.ndarray | None = None
    vector_dim: int = 1

    #: every buffer a layer may hold, in the order artifacts list them
    BUFFERS = ("codes", "scales", "zeros", "codebook", "input_scales", "hadamard_signs",
               "lowrank_u", "lowrank_v", "lowrank_u_scales", "lowrank_v_scales")

    @property
    def numel(self) -> int:
        """Weights the layer stands for (`out * in`)."""
        return self.shape[0] * self.shape[1]

    @property
    def code_shape(self) -> tuple[int, int]:
        """`[out, in / vector_dim]`: the codes the buffer holds, as rows."""
        return self.shape[0], self.shape[1] // self.vector_dim

    @property
    def n_codes(self) -> int:
        """Codes in the buffer: `numel` for a scalar layer, `numel / vector_dim` for a vector one."""
        rows, per_row = self.code_shape
        return rows * per_row

    @property
    def code_nbytes(self) -> int:
        return int(self.codes.nbytes)

    @property
    def nbytes(self) -> int:
        """Every buffer this layer needs at run time: codes, scales, zeros, codebook, input
        scales, transform signs and low-rank factors."""
        return int(sum(getattr(self, b).nbytes for b in self.BUFFERS if getattr(self, b) is not None))

    @property
    def lowrank_dtype(self) -> LowRankDtype | None:
        if self.lowrank_u is None:
            return None
        return "int8" if self.lowrank_u.dtype == np.int8 else "float16"

    @property
    def lowrank_rank(self) -> int:
        return 0 if self.lowrank_u is None else int(self.lowrank_u.shape[1])

    @property
    def transforms_input(self) -> bool:
        """True if the layer's input is rescaled or rotated before its quantized product."""
        return self.input_scales is not None or self.hadamard_signs is not None

    def transform_input(self, x: np.ndarray) -> np.ndarray:
        """`(x / input_scales) H`: the input the quantized product is taken of (float32)."""
        x = np.asarray(x, dtype=np.float32)
        if self.input_scales is not None:
            x = x / self.input_scales
        if self.hadamard_signs is not None:
            x = hadamard_transform(x, self.hadamard_signs)
        return x

    def lowrank_factors(self) -> tuple[np.ndarray, np.ndarray] | None:
        """float32 `(U, V)` as stored (int8 factors rescaled), or None."""
        if self.lowrank_u is None:
            return None
        u = self.lowrank_u.astype(np.float32)
        v = self.lowrank_v.astype(np.float32)
        if self.lowrank_u_scales is not None:
            u *= self.lowrank_u_scales.astype(np.float32)[:, None]
            v *= self.lowrank_v_scales.astype(np.float32)[:, None]
        return u, v

    def lowrank_product(self, x: np.ndarray) -> np.ndarray | None:
        """`(x V^T) U^T` over the last axis of the layer's original input, or None."""
        factors = self.lowrank_factors()
        if factors is None:
            return None
        u, v = factors
        return (np.asarray(x, dtype=np.float32) @ v.T) @ u.T

    def to_original(self, q: np.ndarray, rows: np.ndarray | slice | None = None) -> np.ndarray:
        """Dequantized code rows (`rows` of the tensor; None = all) as rows of the weight."""
        w = to_original_space(q, self.input_scales, self.hadamard_signs)
        factors = self.lowrank_factors()
        if factors is not None:
            u, v = factors
            w = w + (u if rows is None else u[rows]) @ v
        return np.asarray(w, dtype=np.float32)

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / self.numel

    def _codes_range(self, start: int, stop: int) -> np.ndarray:
        """Stored codes `[start, stop)` of the flattened tensor, as signed-offset-removed int16."""
        if self.packing == "trit5":
            first = start // _TRITS_PER_BYTE
            last = -(-stop // _TRITS_PER_BYTE)
            vals = unpack_trits(self.codes[first:last], (last - first) * _TRITS_PER_BYTE)
            return vals[start - first * _TRITS_PER_BYTE : stop - first * _TRITS_PER_BYTE].astype(np.int16)
        if self.code_bits == 8:
            vals = self.codes[start:stop]
        else:
            # Whole 8-code words are byte-aligned, so a range can be read without the rest.
            first = start // _CODES_PER_WORD
            last = -(-stop // _CODES_PER_WORD)
            lo_byte = first * self.code_bits
            hi_byte = min(last * self.code_bits, self.codes.size)
            n = min(last * _CODES_PER_WORD, self.n_codes) - first * _CODES_PER_WORD
            vals = unpack_bits(self.codes[lo_byte:hi_byte], self.code_bits, n)
            vals = vals[start - first * _CODES_PER_WORD : stop - first * _CODES_PER_WORD]
        return vals.astype(np.int16) - self.offset

    def _values(self, codes: np.ndarray, rows: np.ndarray | slice | None = None) -> np.ndarray:
        """Code values of a block of rows (`rows` of the tensor, for per-row codebooks)."""
        if self.codebook is not None:
            return codebook_values(self.codebook.astype(np.float32, copy=False), codes, self.group_size, rows,
                                   self.vector_dim)
        return codes.astype(np.float32)

    def dequantize(self) -> np.ndarray:
        """The float32 `[out, in]` weight the layer stands for, every declared part applied,
        built fresh on every call (nothing is cached)."""
        q = self.dequantize_codes()
        if self.transforms_input or self.lowrank_u is not None:
            return self.to_original(q)
        return q

    def dequantize_codes(self) -> np.ndarray:
        """float32 `(v - zeros) * scales` `[out, in]`: what the transformed input is multiplied by."""
        if self.codebook is None:
            values = self._code_values_f32()
            if values is not None:
                scaled = self._scale_in_place(values.reshape(self.shape))
                if scaled is not None:
                    return scaled
        codes = self._codes_range(0, self.n_codes).reshape(self.code_shape)
        return apply_scales(self._values(codes), self.scales, self.zeros, self.group_size)

    def code_rows(self, start: int, stop: int) -> np.ndarray:
        """float32 rows `[start, stop)` of `dequantize_codes()`, unpacking only those."""
        per_row = self.code_shape[1]
        codes = self._codes_range(start * per_row, stop * per_row).reshape(stop - start, per_row)
        scales = self.scales if self.scales.shape[0] == 1 else self.scales[start:stop]
        zeros = None if self.zeros is None else (self.zeros if self.zeros.shape[0] == 1 else self.zeros[start:stop])
        return apply_scales(self._values(codes, slice(start, stop)), scales, zeros, self.group_size)

    def _code_values_f32(self) -> np.ndarray | None:
        """All codes minus `offset` as a flat float32 array, by one table lookup per byte.

        The fast path of `dequantize` (run for every packed layer on every use): the generic
        `unpack_bits` widens to uint64 words and shifts eight ways, then int16, then float32;
        here each stored byte indexes a `[256, codes per byte]` float32 table. Returns None
        for widths whose codes straddle bytes (3, 5, 6, 7 bits).
        """
        n = self.numel
        if self.packing != "trit5" and self.code_bits == 8:
            values = self.codes[:n].astype(np.float32)  # one code per byte: a plain widening
            if self.offset:
                values -= self.offset
            return values
        if self.packing == "trit5":
            table = _TRIT_TABLE_F32
        elif 8 % self.code_bits == 0:
            table = _byte_table(self.code_bits, self.offset)
        else:
            return None
        need = packed_code_bytes(n, self.code_bits, self.packing)
        buf = self.codes[:need]
        if self.packing == "trit5" and need and int(buf.max()) >= 243:
            raise ValueError("corrupt trit buffer: byte value >= 243")
        values = np.take(table, buf, axis=0).reshape(-1)
        return values if values.size == n else values[:n]

    def _scale_in_place(self, values: np.ndarray) -> np.ndarray | None:
        """`apply_scales` on float32 `values` it may overwrite: the same float32 operations
        (subtract zeros, multiply scales), so bit-identical, without its temporaries. None for
        groups that do not tile the row (left to `apply_scales`)."""
        scales = np.asarray(self.scales, dtype=np.float32)
        zeros = None if self.zeros is None else np.asarray(self.zeros, dtype=np.float32)
        if self.group_size is None or scales.shape[1] == 1:
            if zeros is not None:
                values -= zeros
            values *= scales
            return values
        rows, in_f = values.shape
        n_groups = scales.shape[1]
        if n_groups * self.group_size != in_f:
            return None
        grouped = values.reshape(rows, n_groups, self.group_size)
        if zeros is not None:
            grouped -= zeros[:, :, None]
        grouped *= scales[:, :, None]
        return values

    def dequantize_rows(self, rows: np.ndarray) -> np.ndarray:
        """Float32 rows of the weight (embedding lookups) without unpacking the whole table."""
        rows = np.asarray(rows).reshape(-1)
        uniq, inverse = np.unique(rows, return_inverse=True)
        per_row = self.code_shape[1]
        codes = (np.stack([self._codes_range(int(r) * per_row, (int(r) + 1) * per_row) for r in uniq]) if uniq.size
                 else np.zeros((0, per_row), np.int16))
        scales = self.scales if self.scales.shape[0] == 1 else self.scales[uniq]
        zeros = None if self.zeros is None else (self.zeros if self.zeros.shape[0] == 1 else self.zeros[uniq])
        out = apply_scales(self._values(codes, uniq), scales, zeros, self.group_size)
        if self.transforms_input or self.lowrank_u is not None:
            out = self.to_original(out, uniq)
        return out[inverse]


def _stored_zeros(zeros: np.ndarray | None, scale_dtype: np.dtype) -> np.ndarray | None:
    if zeros is None:
        return None
    if np.all(zeros == np.round(zeros)) and zeros.min() >= 0 and zeros.max() <= 255:
        return zeros.astype(np.uint8)
    return zeros.astype(scale_dtype)


def _check_underflow(qt: QuantizedTensor, stored: np.ndarray, zeros: np.ndarray | None) -> None:
    """A nonzero scale stored as 0 silently deletes the weights it scales: an error, like an
    overflow. A subnormal is kept: it loses relative precision, but it scales weights that
    small (8-bit RTN of a near-zero group of conv weights gives 5e-6), and refusing it would
    refuse ordinary models.

    A scale flushed to 0 whose group holds only zero values (`code - zero == 0`, e.g. an
    all-zero row that a plugin gave an epsilon scale) changes nothing and is let through.
    """
    wanted = np.asarray(qt.scales, dtype=np.float64)
    flushed = (wanted != 0) & (stored == 0)
    if not flushed.any():
        return
    values = (codebook_values(qt.codebook, qt.codes, qt.group_size, vector_dim=qt.vector_dim) if qt.codebook is not None
              else qt.codes.astype(np.float32))
    # dequantize with 1 for each flushed scale and 0 elsewhere: nonzero where one is used
    touched = apply_scales(values, flushed.astype(np.float32), zeros, qt.group_size)
    if not np.any(touched):
        return
    smallest = float(np.abs(wanted[flushed]).min())
    raise ValueError(f"scales underflow {stored.dtype.name} ({int(flushed.sum())} nonzero scale(s) would be stored as 0, "
                     f"min |scale| {smallest:.3g}; its smallest subnormal is {float(np.finfo(stored.dtype).smallest_subnormal):.3g})")


def pack_quantized(qt: QuantizedTensor, scale_dtype: np.dtype | type = np.float16) -> PackedTensor:
    """Store a validated `QuantizedTensor`: pack its codes, cast its scales to `scale_dtype`."""
    scale_dtype = np.dtype(scale_dtype)
    shape = qt.shape  # the weight's; a vector layer's codes are [out, in / vector_dim]
    offset = 0
    if qt.packing == "trit5":
        buf = pack_trits(qt.codes)
    else:
        offset = 1 << (qt.code_bits - 1) if qt.signed else 0
        buf = pack_bits(qt.codes.astype(np.int16) + offset, qt.code_bits)
    with np.errstate(over="ignore", under="ignore"):
        scales = qt.scales.astype(scale_dtype)
    if not np.all(np.isfinite(scales)):
        raise ValueError(f"scales overflow {scale_dtype.name} (max |scale| {float(np.abs(qt.scales).max()):.3g})")
    zeros = _stored_zeros(qt.zeros, scale_dtype)
    _check_underflow(qt, scales, zeros)
    if zeros is not None and not np.all(np.isfinite(zeros.astype(np.float32))):
        raise ValueError(f"zero points overflow {scale_dtype.name}")
    codebook = None
    if qt.codebook is not None:
        # one codebook for the tensor ([K], or a vector codebook's [K, d]) is a constant; one per
        # row/group costs like scales
        per_tensor = qt.codebook.ndim == 1 or qt.vector_dim > 1
        codebook = qt.codebook.astype(np.float32 if per_tensor else scale_dtype)
        if not np.all(np.isfinite(codebook.astype(np.float32))):
            raise ValueError(f"codebook overflows {codebook.dtype.name} (max |value| {float(np.abs(qt.codebook).max()):.3g})")
    lowrank = _stored_lowrank(qt)
    return PackedTensor(
        codes=buf,
        code_bits=qt.code_bits,
        packing=qt.packing,
        shape=shape,
        scales=scales,
        group_size=qt.group_size,
        zeros=zeros,
        codebook=codebook,
        offset=offset,
        input_scales=None if qt.input_scales is None else qt.input_scales.astype(np.float32),
        hadamard_signs=None if qt.hadamard_signs is None else qt.hadamard_signs.astype(np.int8),
        vector_dim=qt.vector_dim,
        **lowrank,
    )


def check_packed_layout(pt: PackedTensor) -> None:
    """Raise ValueError unless every buffer of `pt` has the shape and dtype its layout needs
    (what an artifact read from disk must prove before any of it is used)."""
    out_f, in_f = pt.shape
    n_groups = 1 if pt.group_size is None else -(-in_f // pt.group_size)
    if pt.group_size is not None and pt.group_size < 1:
        raise ValueError(f"group_size {pt.group_size} is not positive")
    if isinstance(pt.vector_dim, bool) or not isinstance(pt.vector_dim, (int, np.integer)) or pt.vector_dim < 1:
        raise ValueError(f"vector_dim {pt.vector_dim!r} is not a positive int")
    if pt.vector_dim > 1:
        _check_vector_layout(pt)
    if pt.scales.ndim != 2 or pt.scales.shape[0] not in (1, out_f) or pt.scales.shape[1] != n_groups:
        raise ValueError(f"scales shape {pt.scales.shape} does not fit [{out_f}, {in_f}] with group_size={pt.group_size}")
    if pt.zeros is not None and pt.zeros.shape != pt.scales.shape:
        raise ValueError(f"zeros shape {pt.zeros.shape} != scales shape {pt.scales.shape}")
    for name in ("scales", "zeros", "codebook", "input_scales", "lowrank_u_scales", "lowrank_v_scales"):
        a = getattr(pt, name)
        if a is not None and not np.issubdtype(a.dtype, np.floating) and not (name == "zeros" and a.dtype == np.uint8):
            raise ValueError(f"{name} must be floating point, got {a.dtype.name}")
    if pt.codebook is not None and pt.vector_dim == 1:
        cb = pt.codebook
        ok = (cb.ndim == 1 or (cb.ndim == 2 and cb.shape[0] in (1, out_f))
              or (cb.ndim == 3 and cb.shape[0] in (1, out_f) and cb.shape[1] == n_groups))
        if not ok or not 1 <= cb.shape[-1] <= 1 << pt.code_bits:
            raise ValueError(f"codebook shape {cb.shape} does not fit [{out_f}, {in_f}] at {pt.code_bits} bits")
        if cb.shape[-1] < 1 << pt.code_bits and pt.numel:
            top = int(pt._codes_range(0, pt.numel).max())
            if top >= cb.shape[-1]:
                raise ValueError(f"code {top} indexes past the codebook's {cb.shape[-1]} entries")
    if pt.input_scales is not None:
        s = pt.input_scales.astype(np.float32)
        if s.shape != (in_f,) or not np.all(np.isfinite(s)) or not np.all(s > 0):
            raise ValueError(f"input_scales must be {in_f} finite positive floats")
    if pt.hadamard_signs is not None:
        d = pt.hadamard_signs
        if d.shape != (in_f,) or d.dtype != np.int8 or not np.all(np.abs(d) == 1):
            raise ValueError(f"hadamard_signs must be {in_f} int8 values of +-1")
    u, v = pt.lowrank_u, pt.lowrank_v
    if (u is None) != (v is None):
        raise ValueError("lowrank_u and lowrank_v come together")
    if u is not None:
        if u.ndim != 2 or v.ndim != 2 or u.shape[0] != out_f or v.shape[1] != in_f or u.shape[1] != v.shape[0]:
            raise ValueError(f"low-rank factors {u.shape} x {v.shape} do not make a [{out_f}, {in_f}] correction")
        if u.dtype != v.dtype or u.dtype not in (np.float16, np.int8):
            raise ValueError(f"low-rank factors must both be float16 or int8, got {u.dtype.name}, {v.dtype.name}")
        quantized = u.dtype == np.int8
        us, vs = pt.lowrank_u_scales, pt.lowrank_v_scales
        if quantized != (us is not None) or quantized != (vs is not None):
            raise ValueError("int8 low-rank factors need their row scales (and float16 ones have none)")
        if quantized and (us.shape != (u.shape[0],) or vs.shape != (v.shape[0],)):
            raise ValueError("low-rank row scales do not match the factors' rows")


def _check_vector_layout(pt: PackedTensor) -> None:
    """The layout rules of a vector-codebook layer (`vector_dim > 1`), as `QuantizedTensor` has them."""
    d, in_f = pt.vector_dim, pt.shape[1]
    if in_f % d:
        raise ValueError(f"vector_dim {d} does not divide in_features {in_f}")
    if pt.packing != "int" or pt.offset != 0 or pt.zeros is not None:
        raise ValueError(f"vector_dim {d} needs int packing, unsigned codes (offset 0) and no zeros")
    if pt.group_size is not None and pt.group_size % d:
        raise ValueError(f"group_size {pt.group_size} is not a multiple of vector_dim {d}")
    cb = pt.codebook
    if cb is None or cb.ndim != 2 or cb.shape[1] != d or not 1 <= cb.shape[0] <= 1 << pt.code_bits or cb.dtype != np.float32:
        shown = None if cb is None else f"{cb.dtype.name} {cb.shape}"
        raise ValueError(f"vector_dim {d} needs a float32 [K, {d}] codebook with 1 <= K <= {1 << pt.code_bits}, got {shown}")
    if not np.all(np.isfinite(cb)):
        raise ValueError("codebook contains NaN or inf")
    need = packed_code_bytes(pt.n_codes, pt.code_bits)
    if pt.codes.dtype != np.uint8 or pt.codes.ndim != 1 or pt.codes.size != need:
        raise ValueError(f"code buffer does not hold {pt.n_codes} {pt.code_bits}-bit codes ({need} bytes)")
    if cb.shape[0] < 1 << pt.code_bits and pt.n_codes:
        top = int(pt._codes_range(0, pt.n_codes).max())
        if top >= cb.shape[0]:
            raise ValueError(f"code {top} indexes past the vector codebook's {cb.shape[0]} entries")


def quantize_int8_rows(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric absmax int8 per row: `(codes int8, scales float16)` with `a ~ codes * scales`."""
    a = np.asarray(a, dtype=np.float32)
    scale = (np.abs(a).max(axis=1) / 127.0).astype(np.float16)
    scale[scale == 0] = 1.0
    codes = np.clip(np.rint(a / scale.astype(np.float32)[:, None]), -127, 127).astype(np.int8)
    return codes, scale


def _stored_lowrank(qt: QuantizedTensor) -> dict[str, np.ndarray | None]:
    if qt.lowrank_u is None:
        return {}
    if qt.lowrank_dtype == "int8":
        u, us = quantize_int8_rows(qt.lowrank_u)
        v, vs = quantize_int8_rows(qt.lowrank_v)
        return {"lowrank_u": u, "lowrank_v": v, "lowrank_u_scales": us, "lowrank_v_scales": vs}
    with np.errstate(over="ignore"):
        u, v = qt.lowrank_u.astype(np.float16), qt.lowrank_v.astype(np.float16)
    if not (np.all(np.isfinite(u)) and np.all(np.isfinite(v))):
        raise ValueError("low-rank factors overflow float16")
    return {"lowrank_u": u, "lowrank_v": v}
