"""File formats: reading and writing what other tools store, with numpy alone (never torch).

* :mod:`reflora.formats.safetensors`: the safetensors container (a JSON header, then raw tensors).
* :mod:`reflora.formats.bnb`: a 4-bit weight as bitsandbytes and Hugging Face checkpoints store it,
  to and from a :class:`reflora.QuantState`.
* :mod:`reflora.formats.files`: writing a set of files whole or not at all.

The rules of both formats are stated in ``docs/formats.md``.
"""

from reflora.formats import bnb, files, safetensors

__all__ = ["bnb", "files", "safetensors"]
