"""torch's CPU float arithmetic where it is not simply IEEE: reduction order and NaN conversions.

bitsandbytes' CPU quantizer and torchao's NF4Tensor are written in torch, so their bits depend on how
torch's CPU kernels (ATen, torch 2.x) add up a tensor and convert NaN between float widths. This
module reproduces those choices in numpy, for the dialects; nothing here is a reflora rule.

* **Which kernel runs.** torch compiles each CPU kernel once per capability, but a kernel registered
  with plain ``REGISTER_DISPATCH`` (the sum and the copy kernels among them) gets no AVX512 build: an
  AVX512 host runs its AVX2 build. So the sum and the conversions below read registers of 8 floats on
  AVX2 *and* on AVX512 hosts (:attr:`Host.kernel_lanes`); every rule below holds on both.
* **Sum.** ``Tensor.sum()`` of a contiguous float32 vector is a *cascade sum*: the vector is read in
  SIMD registers of ``kernel_lanes`` floats, four registers side by side, and the running sums are
  folded into higher levels every 16 steps so that only partial sums of similar size meet. A range
  shorter than one register is summed by the same cascade one float at a time. The leftover elements
  (fewer than ``kernel_lanes``) are summed one by one first, then the lanes are added in order. Above
  32768 elements torch splits the range evenly over its threads and adds the per-thread sums at the
  end. :func:`sum_f32` follows the same order, so it is bit-exact, not just close
  (tests/test_bnb_agreement.py measures how often the exact mean would have matched instead).
* **Mean.** ``Tensor.mean()`` is ``f32(sum / n)``: one float32 division of that sum.
* **float16 -> float32.** The vectorised copy keeps a NaN's sign and payload and sets the quiet bit;
  the scalar loop that handles the last ``n % kernel_lanes`` elements of each thread's range returns
  ``0x7fffffff`` for every NaN (:func:`widen_f16`).
* **float32 -> float16** (``_mm_cvtps_ph``, used by torch and by bitsandbytes' C++ code): round to
  nearest even; a NaN keeps its sign and top 10 payload bits and gets the quiet bit
  (:func:`narrow_f16`). numpy instead keeps a signalling NaN signalling.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["DEFAULT_HOST", "GRAIN", "Host", "mean_f32", "narrow_f16", "sum_f32", "thread_ranges", "widen_f16"]

GRAIN = 32768  # at::internal::GRAIN_SIZE: below this torch never splits a loop over threads
_LEVELS = 4  # cascade levels of the multi-row sum
_ILP = 4  # registers summed side by side


@dataclass(frozen=True)
class Host:
    """The machine facts that change the CPU bits of torch and of libraries built on it: SIMD width,
    intra-op thread count, and whether the CPU converts to bfloat16 in hardware.

    lanes:       floats per SIMD register of the host's capability (``torch.backends.cpu.
                 get_cpu_capability()``: "AVX2" -> 8, "AVX512" -> 16); :attr:`kernel_lanes` is what the
                 sum and copy kernels use.
    threads:     ``torch.get_num_threads()``; matters only for loops over >= 32768 elements.
    avx512_bf16: the CPU has AVX512_BF16 (``bitsandbytes.functional.has_avx512bf16()``), so bitsandbytes'
                 AVX-512 dequantize rounds to bfloat16 with ``vcvtneps2bf16`` (the bnb-cpu dialect's
                 rule 10); read only where ``lanes == 16``.
    """

    lanes: int = 8
    threads: int = 1
    avx512_bf16: bool = False

    def __post_init__(self) -> None:
        if self.lanes not in (4, 8, 16) or self.threads < 1:
            raise ValueError(f"lanes must be 4, 8 or 16 and threads >= 1, got {self}")

    @property
    def kernel_lanes(self) -> int:
        """Floats per register in torch's sum and copy kernels: 8 on an AVX512 host, else ``lanes``.

        Both kernels are registered with ``REGISTER_DISPATCH``, which leaves the AVX512 slot empty, so
        torch's dispatcher falls back to their AVX2 build there.
        """
        return 8 if self.lanes == 16 else self.lanes


DEFAULT_HOST = Host()  # an AVX2 machine with torch on one thread (or loops under 32768 elements)


def thread_ranges(n: int, host: Host) -> list[tuple[int, int]]:
    """The [begin, end) ranges at::parallel_for gives each thread for a loop of n elements."""
    if n < GRAIN or host.threads == 1:
        return [(0, n)]
    used = min(host.threads, -(-n // GRAIN))
    chunk = -(-n // used)
    return [(b, min(n, b + chunk)) for b in range(0, n, chunk)]


def _add(a: np.ndarray, b: np.ndarray, right_wins: bool = False) -> np.ndarray:
    """float32 a + b, with the NaN payload x86 returns: the winning operand's NaN, quieted.

    Which operand wins depends on how the compiler ordered that particular addition in torch's
    kernel: the accumulator (left) everywhere except the loop that adds up the lanes (right).
    """
    first, second = (b, a) if right_wins else (a, b)
    with np.errstate(invalid="ignore", over="ignore"):
        total = np.add(a, b, dtype=np.float32)
    quiet = np.uint32(0x00400000)
    for nan_src in (second, first):  # first written last, so it wins
        src = np.asarray(nan_src, dtype=np.float32)
        if np.isnan(src).any():
            payload = (np.broadcast_to(src, np.shape(total)).view(np.uint32) | quiet).view(np.float32)
            total = np.where(np.isnan(src), payload, total)
    return np.asarray(total, dtype=np.float32)


def _multi_row_sum(regs: np.ndarray) -> np.ndarray:
    """(4, width) float32: the cascade sum of ``regs`` (steps, 4, width), each of the 4 rows apart."""
    steps = regs.shape[0]
    ceil_log2 = 1 if steps <= 2 else (steps - 1).bit_length()
    power = max(4, ceil_log2 // _LEVELS)
    step, mask = 1 << power, (1 << power) - 1
    acc = np.zeros((_LEVELS, *regs.shape[1:]), dtype=np.float32)
    i = 0
    while i + step <= steps:
        for r in regs[i : i + step]:  # sequential: float addition is not associative
            acc[0] = _add(acc[0], r)
        i += step
        for level in range(1, _LEVELS):  # carry into the next level when this one completes
            acc[level] = _add(acc[level], acc[level - 1])
            acc[level - 1] = 0
            if i & (mask << (level * power)):
                break
    for r in regs[i:]:
        acc[0] = _add(acc[0], r)
    for level in range(1, _LEVELS):
        acc[0] = _add(acc[0], acc[level])
    return acc[0]


def _row_sum(regs: np.ndarray) -> np.ndarray:
    """(width,) float32: torch's row_sum over ``regs`` (count, width) registers (width 1 for scalars)."""
    count = regs.shape[0]
    whole = count // _ILP
    part = _multi_row_sum(regs[: whole * _ILP].reshape(whole, _ILP, regs.shape[1]))
    for r in regs[whole * _ILP :]:
        part[0] = _add(part[0], r)
    for k in range(1, _ILP):
        part[0] = _add(part[0], part[k])
    return part[0]


def _range_sum(x: np.ndarray, lanes: int) -> np.float32:
    """The sum of one thread's contiguous float32 range, in torch's order."""
    if x.size < lanes:  # too short for a register: the scalar cascade
        return np.float32(_row_sum(x.reshape(-1, 1))[0]) if x.size else np.float32(0)
    whole = x.size // lanes
    part = _row_sum(x[: whole * lanes].reshape(whole, lanes))
    total = np.float32(0)
    for v in x[whole * lanes :]:  # the leftover elements first, then the lanes in order
        total = np.float32(_add(total, v))
    for v in part:
        total = np.float32(_add(total, v, right_wins=True))
    return total


def sum_f32(values: np.ndarray, host: Host = DEFAULT_HOST) -> np.float32:
    """``torch.sum`` of a contiguous float32 vector on the CPU, bit for bit. values: float32 (n,)."""
    x = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
    sums = [_range_sum(x[b:e], host.kernel_lanes) for b, e in thread_ranges(x.size, host)]
    if len(sums) == 1:
        return np.float32(_add(np.float32(0), sums[0]))  # the output starts at 0 and is added to
    # Each thread wrote its own slot (unused slots stay 0), then the slots are summed as a tensor.
    slots = np.zeros(host.threads, dtype=np.float32)
    slots[: len(sums)] = [_add(np.float32(0), v) for v in sums]
    return np.float32(_add(np.float32(0), _range_sum(slots, host.kernel_lanes)))


def mean_f32(values: np.ndarray, host: Host = DEFAULT_HOST) -> np.float32:
    """``torch.mean`` of a contiguous float32 vector on the CPU: f32(sum_f32(values) / n)."""
    x = np.asarray(values, dtype=np.float32).reshape(-1)
    if x.size == 0:
        raise ValueError("mean of an empty array")
    with np.errstate(invalid="ignore"):
        return np.float32(sum_f32(x, host) / np.float32(x.size))


def widen_f16(h: np.ndarray, host: Host = DEFAULT_HOST) -> np.ndarray:
    """float32 (n,): ``Tensor.float()`` of a contiguous float16 vector, NaN bits included.

    Finite values and infinities widen exactly. A NaN handled by the vector loop keeps its sign and
    payload with the quiet bit set; one in the scalar tail of a thread's range becomes 0x7fffffff.
    """
    h = np.asarray(h, dtype=np.float16).reshape(-1)
    out = h.astype(np.float32)
    nan = np.isnan(h)
    if not nan.any():
        return out
    bits = h.view(np.uint16).astype(np.uint32)
    vector_nan = ((bits & 0x8000) << 16) | 0x7FC00000 | ((bits & 0x03FF) << 13)
    scalar = np.zeros(h.size, dtype=bool)
    for b, e in thread_ranges(h.size, host):
        scalar[b + (e - b) // host.kernel_lanes * host.kernel_lanes : e] = True
    nan_bits = np.where(scalar, np.uint32(0x7FFFFFFF), vector_nan)
    out.view(np.uint32)[nan] = nan_bits[nan]
    return out


def narrow_f16(x: np.ndarray) -> np.ndarray:
    """float16, same shape: float32 ``x`` rounded as ``_mm_cvtps_ph`` does (RNE; quiet NaN payloads)."""
    x = np.asarray(x, dtype=np.float32)
    with np.errstate(over="ignore"):
        out = x.astype(np.float16)
    nan = np.isnan(x)
    if nan.any():
        bits = x.view(np.uint32)
        quiet = ((bits >> 16) & 0x8000) | 0x7E00 | ((bits >> 13) & 0x03FF)
        out.view(np.uint16)[nan] = quiet[nan].astype(np.uint16)
    return out
