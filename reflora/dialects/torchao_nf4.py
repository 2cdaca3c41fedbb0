"""The ``torchao`` dialect: torchao 0.18's ``NF4Tensor`` (``to_nf4``), bit for bit.

torchao's NF4 shares bnb's packing (element 2j in the high nibble) and little else. Every step runs in
the *input dtype* T (float32, float16 or bfloat16): an operation on T values is computed in float32 and
rounded to T, as torch's CPU kernels do. Written ``T(...)`` below. Rules (CONFIRMED against torchao by
tests/test_dialects_torchao.py):

1. Shape: at most 2-D; numel divisible by ``blocksize`` and by ``scaler_block_size``; the number of
   blocks divisible by ``scaler_block_size`` (256 unless given; rules 3 and 5 group by it). With the
   defaults numel must be a multiple of 16384.
   torchao asserts these (AssertionError, or nothing under ``python -O``); this dialect raises ValueError.
2. Codebook ``nf4``: bnb's values rounded to 4 decimals, as float32 then T (:func:`codebook`).
3. absmax = max |x| per block, in T (exact). Double quantization is always on, and linear, not bnb's
   dynamic map: ``scaler_mean = T(f32(torch_sum(absmax) / n_blocks))``; ``c = T(absmax - scaler_mean)``;
   per group of ``scaler_block_size`` scalers ``quantization_factor = T(T(1 / T(2 * max|c|)) * 256)``
   (torch's ``256 / t`` is ``t.reciprocal() * 256``; this 256 is the int8 range);
   ``quantized_scalers = int8(clip(round_half_even(T(c * factor)), -128, 127))``, NaN -> 0.
   +max|c| lands on 128 and is clipped to 127.
4. Codes: ``scaled = T(x / absmax)``; ``code = argmin_i T(|T(scaled - nf4[i])|)``, the first index on a
   tie. An all-zero block (0/0 = NaN) gets codes 0; so does a NaN element.
5. Dequantize: ``scale = T(T(q / factor) + scaler_mean)``; ``out = T(nf4[code] * scale)``.

torchao keeps its scalers as int8 codes plus a per-group factor and a mean, which is not bnb's
NestedState, so this dialect returns a :class:`TorchaoNF4State` with torchao's own fields.
:meth:`TorchaoNF4State.to_quant_state` rebuilds the scales and gives a plain :class:`reflora.QuantState`
whose canonical dequantization equals rule 5 bit for bit (for bfloat16 and float16, a float32 product
of two T values is exact, so ``T(f32(code * absmax))`` is torch's T multiply).

NaN payload bits are not modelled here (torch's float32 -> T conversion of NaN depends on the kernel);
which outputs are NaN is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from reflora.dialects.torch_cpu import DEFAULT_HOST, Host, sum_f32
from reflora.dtypes import as_dtype, dtype_name
from reflora.nf4 import pack, unpack
from reflora.state import BLOCKSIZES, QuantState

__all__ = ["DESCRIPTION", "NAME", "TorchaoNF4State", "check_shape", "codebook", "dequantize", "quantize"]

NAME = "torchao"
DESCRIPTION = (
    "torchao 0.18 NF4Tensor (to_nf4): 4-decimal codebook, division and argmin in the input dtype, "
    "linear int8 double quantization of the scales with a mean and per-256 factor"
)

SCALER_BLOCK_SIZE = 256
_NF4_4_DECIMALS = (
    -1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0,
    0.0796, 0.1609, 0.2461, 0.3379, 0.4407, 0.5626, 0.7230, 1.0,
)  # fmt: skip
_CHUNK = 1 << 16  # elements per argmin step: bounds the (chunk, 16) temporary


def codebook(dtype: str | np.dtype) -> np.ndarray:
    """T (16,): torchao's NF4 table, the 4-decimal literals rounded to float32 and then to T."""
    return np.array(_NF4_4_DECIMALS, dtype=np.float32).astype(as_dtype(dtype))


def _t(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Round float32 results to T, as a torch operation on T tensors does."""
    with np.errstate(over="ignore", invalid="ignore"):
        return np.asarray(values, dtype=np.float32).astype(dtype)


def _f(values: np.ndarray) -> np.ndarray:
    return np.asarray(values).astype(np.float32)


@dataclass(frozen=True, eq=False)
class TorchaoNF4State:
    """torchao's NF4Tensor fields, as numpy arrays (T is the input dtype).

    quantized_data:      uint8 (numel/2,), two codes a byte, element 2j high.
    quantized_scalers:   int8 (n_blocks,), the linear 8-bit code of each block's absmax - scaler_mean.
    quantization_factor: T (n_blocks / scaler_block_size,), 256 / (2 max|absmax - mean|) per group.
    scaler_mean:         T scalar (0-d array), the mean of the absmax values.
    nf4:                 T (16,), the codebook (:func:`codebook`).
    shape, dtype, block_size, scaler_block_size: as given to ``to_nf4``.
    """

    quantized_data: np.ndarray
    quantized_scalers: np.ndarray
    quantization_factor: np.ndarray
    scaler_mean: np.ndarray
    nf4: np.ndarray
    shape: tuple[int, ...]
    dtype: np.dtype
    block_size: int
    scaler_block_size: int = SCALER_BLOCK_SIZE

    def __post_init__(self) -> None:
        for name in ("quantized_data", "quantized_scalers", "quantization_factor", "scaler_mean", "nf4"):
            a = np.array(getattr(self, name))  # a private copy, then read-only: a state is a value
            a.setflags(write=False)
            object.__setattr__(self, name, a)
        object.__setattr__(self, "dtype", np.dtype(self.dtype))
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))

    @property
    def n_blocks(self) -> int:
        return math.prod(self.shape) // self.block_size

    def scales(self) -> np.ndarray:
        """T (n_blocks,): the block scales rule 5 rebuilds, ``T(T(q / factor) + scaler_mean)``."""
        factor = np.repeat(_f(self.quantization_factor), self.scaler_block_size)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = _t(_f(self.quantized_scalers) / factor, self.dtype)
        return _t(_f(ratio) + _f(self.scaler_mean), self.dtype)

    def to_quant_state(self) -> QuantState:
        """A plain QuantState: absmax = float32 of :meth:`scales`, code = float32 of ``nf4``.

        :func:`reflora.nf4.dequantize` turns it into exactly torchao's output while every rebuilt scale
        is >= 0. A scale rebuilt below zero (rule 5: a block of absmax near zero, common in sparse
        weights) is stored here as a negative absmax, which :func:`reflora.nf4.dequantize` refuses;
        :func:`dequantize` of this state is then the dialect's output. ValueError for a block_size
        outside reflora's blocksizes.
        """
        if self.block_size not in BLOCKSIZES:
            raise ValueError(f"block_size {self.block_size} is not one of reflora's {BLOCKSIZES}")
        return QuantState(
            packed=self.quantized_data,
            absmax=_f(self.scales()),
            shape=self.shape,
            dtype=self.dtype,
            blocksize=self.block_size,
            quant_type="nf4",
            code=_f(self.nf4),
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TorchaoNF4State):
            return NotImplemented
        fields = ("quantized_data", "quantized_scalers", "quantization_factor", "scaler_mean", "nf4")
        return (self.shape, self.dtype, self.block_size, self.scaler_block_size) == (
            other.shape,
            other.dtype,
            other.block_size,
            other.scaler_block_size,
        ) and all(
            getattr(self, k).dtype == getattr(other, k).dtype
            and getattr(self, k).tobytes() == getattr(other, k).tobytes()
            for k in fields
        )

    __hash__ = None  # type: ignore[assignment]


def check_shape(shape: tuple[int, ...], blocksize: int, scaler_block_size: int = SCALER_BLOCK_SIZE) -> None:
    """Rule 1: raise ValueError (with torchao's reason) for a shape ``to_nf4`` rejects."""
    numel = math.prod(shape)
    if len(shape) > 2:
        raise ValueError(f"torchao NF4 takes at most 2 dimensions, got shape {shape}")
    if numel == 0:
        raise ValueError(f"cannot quantize an empty array (shape {shape})")
    if blocksize < 1 or numel % blocksize:
        raise ValueError(f"numel {numel} is not divisible by block_size {blocksize}")
    if numel % scaler_block_size:
        raise ValueError(f"numel {numel} is not divisible by scaler_block_size {scaler_block_size}")
    if (numel // blocksize) % scaler_block_size:
        raise ValueError(
            f"{numel // blocksize} blocks of {blocksize} are not divisible by scaler_block_size "
            f"{scaler_block_size}"
        )
    if numel % 2:
        raise ValueError(f"numel {numel} must be even to pack two codes a byte")


def _double_quantize(absmax: np.ndarray, mean: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray]:
    """Rule 3: (quantized_scalers int8 (n_blocks,), quantization_factor T (n_groups,))."""
    dtype = absmax.dtype
    with np.errstate(invalid="ignore"):
        centred = _t(_f(absmax) - _f(mean), dtype).reshape(-1, group)  # (groups, group)
        group_absmax = np.abs(centred).max(axis=1)  # exact in T; NaN propagates
    with np.errstate(divide="ignore", over="ignore"):
        twice = _t(np.float32(2) * _f(group_absmax), dtype)
        factor = _t(_t(np.float32(1) / _f(twice), dtype).astype(np.float32) * np.float32(256), dtype)
    with np.errstate(invalid="ignore"):
        product = _f(_t(_f(centred) * _f(factor)[:, None], dtype))
        q = np.clip(np.round(product), -128, 127)  # np.round: half to even, like torch.round
    return np.nan_to_num(q, nan=0.0).astype(np.int8).reshape(-1), factor


def _codes(flat: np.ndarray, absmax: np.ndarray, blocksize: int, nf4: np.ndarray) -> np.ndarray:
    """Rule 4: uint8 (n,), argmin in T of |T(x / absmax) - nf4|, first index on ties, NaN -> 0."""
    dtype = flat.dtype
    with np.errstate(divide="ignore", invalid="ignore"):
        scaled = _t(_f(flat).reshape(-1, blocksize) / _f(absmax)[:, None], dtype).reshape(-1)
    codes = np.empty(flat.size, dtype=np.uint8)
    table = _f(nf4)
    for start in range(0, flat.size, _CHUNK):
        part = _f(scaled[start : start + _CHUNK])[:, None]  # (chunk, 1) - (16,) -> (chunk, 16)
        with np.errstate(invalid="ignore"):
            diff = np.abs(_t(part - table, dtype))
        codes[start : start + _CHUNK] = np.argmin(diff, axis=1)  # first minimum; first NaN if any
    return codes


def quantize(
    x: np.ndarray,
    blocksize: int = 64,
    *,
    quant_type: str = "nf4",
    double_quant: bool = True,
    offset: float | None = None,
    scaler_block_size: int = SCALER_BLOCK_SIZE,
    host: Host = DEFAULT_HOST,
) -> TorchaoNF4State:
    """``torchao.to_nf4(x, blocksize, scaler_block_size)`` by rules 1-4.

    x: float32 / float16 / bfloat16 array meeting rule 1; NaN and inf accepted (torchao has no check).
    quant_type must be "nf4" and double_quant True: torchao has no FP4 and always double-quantizes.
    offset: the scaler_mean to use (converted to T) instead of torch's mean, to replay a state.
    host: torch host facts for that mean (:class:`reflora.dialects.torch_cpu.Host`); an AVX512 host sums
          in 8-float registers like an AVX2 one (``Host.kernel_lanes``), so only the thread count differs.
    """
    if quant_type != "nf4":
        raise ValueError(f"torchao quantizes NF4 only, got quant_type={quant_type!r}")
    if not double_quant:
        raise ValueError("torchao always double-quantizes the block scales (double_quant must be True)")
    x = np.asarray(x)
    dtype = np.dtype(x.dtype)
    dtype_name(dtype)
    check_shape(x.shape, blocksize, scaler_block_size)
    flat = np.ascontiguousarray(x).reshape(-1)
    with np.errstate(invalid="ignore"):
        absmax = np.abs(flat.reshape(-1, blocksize)).max(axis=1)  # T, exact
    if offset is None:
        total = sum_f32(_f(absmax), host)  # torch sums T values in float32
        with np.errstate(invalid="ignore", over="ignore"):
            mean = _t(total / np.float32(absmax.size), dtype)
    else:
        mean = _t(np.float32(offset), dtype)
    quantized_scalers, factor = _double_quantize(absmax, mean, scaler_block_size)
    nf4 = codebook(dtype)
    return TorchaoNF4State(
        quantized_data=pack(_codes(flat, absmax, blocksize, nf4), 0),
        quantized_scalers=quantized_scalers,
        quantization_factor=factor,
        scaler_mean=np.asarray(mean, dtype=dtype).reshape(()),
        nf4=nf4,
        shape=x.shape,
        dtype=dtype,
        block_size=blocksize,
        scaler_block_size=scaler_block_size,
    )


def nan_encodings(state: TorchaoNF4State, dtype: str | np.dtype | None = None) -> str:
    """ "any": the NaN bits of torchao's output are not modelled (torch's float32-to-bfloat16 NaN
    conversion depends on the kernel; both 0xffc0 and 0xffff are seen), only that the value is a NaN."""
    return "any"


def dequantize(state: TorchaoNF4State, dtype: str | np.dtype | None = None) -> np.ndarray:
    """torchao's ``get_original_weight()`` by rule 5, in ``state.shape``; then cast to ``dtype`` if given."""
    n = math.prod(state.shape)
    values = _f(state.nf4)[unpack(state.quantized_data, n)]
    scales = np.repeat(_f(state.scales()), state.block_size)
    with np.errstate(invalid="ignore", over="ignore"):
        out = _t(values * scales, state.dtype).reshape(state.shape)
    return out if dtype is None else out.astype(as_dtype(dtype))
