"""Dialects: other implementations' NF4/FP4 arithmetic, modelled bit for bit beside the canonical rules.

The canonical oracle (:mod:`reflora.nf4`) states exact-arithmetic rules. Real implementations deviate
in documented ways: float32 midpoints, a reciprocal multiply, a lookup table for 8-bit codes, another
codebook. A *dialect* reproduces one implementation's behaviour exactly, so that a backend can be held
to the dialect it claims, while the suite reports separately how that dialect departs from canonical
(docs/dialects.md lists every rule and the measured deviation rates).

Every dialect module has ``NAME``, ``DESCRIPTION`` and

* ``quantize(x, blocksize=64, *, quant_type="nf4", double_quant=False, offset=None)``: x is a float32,
  float16 or bfloat16 array; ``offset`` replays a double-quantization offset (a float32 mean the
  implementation computed) instead of computing it;
* ``dequantize(state, dtype=None) -> np.ndarray`` in the state's shape.

Where an implementation accepts NaN or inf, its dialect reproduces what the implementation does instead
of raising. The dialects are numpy only, like the rest of the oracle.

==============  ================================================  ==========================
name            implementation                                    module
==============  ================================================  ==========================
``reflora``     the canonical oracle                              :mod:`.canonical`
``bnb-cpu``     bitsandbytes 0.50, x86 CPU                        :mod:`.bnb_cpu`
``bnb-cuda``    bitsandbytes 0.50 CUDA kernels (read, emulated)   :mod:`.bnb_cuda`
``torchao``     torchao 0.18 ``NF4Tensor``                        :mod:`.torchao_nf4`
==============  ================================================  ==========================
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["get", "names"]

_MODULES = {
    "reflora": "reflora.dialects.canonical",
    "bnb-cpu": "reflora.dialects.bnb_cpu",
    "bnb-cuda": "reflora.dialects.bnb_cuda",
    "torchao": "reflora.dialects.torchao_nf4",
}


def names() -> list[str]:
    """The registered dialect names, canonical first."""
    return list(_MODULES)


def get(name: str) -> ModuleType:
    """The dialect module called ``name``; ValueError listing the known names otherwise."""
    try:
        module = _MODULES[name]
    except KeyError:
        raise ValueError(f"unknown dialect {name!r}; known: {', '.join(_MODULES)}") from None
    return importlib.import_module(module)
