"""Hugging Face + bitsandbytes 4-bit checkpoints: written from, and read into, reflora's 4-bit layers.

The layout is transformers' own for a model loaded with ``BitsAndBytesConfig(load_in_4bit=True)``
(docs/formats.md): ``model.safetensors`` holds, for a 4-bit linear layer at path ``P``, the keys of
:func:`reflora.formats.bnb.to_state_dict` at ``P.weight`` (packed codes, absmax, quant_map, nested
statistics, the JSON quant state) beside ``P.bias``; every other tensor is stored as is. ``config.json``
is the model's config with a ``quantization_config`` whose ``quant_method`` is "bitsandbytes".

* :func:`save_4bit_checkpoint` writes a model whose linear layers are :class:`.modules.NF4Linear` (or
  wrapped in LoRA adapters, which are left out: save them with :func:`.adapters.save_adapter`) so that
  ``transformers.AutoModel.from_pretrained(dir)`` loads it into bitsandbytes ``Linear4bit`` layers
  holding exactly these bytes.
* :func:`load_4bit_checkpoint` reads such a checkpoint (from transformers, or from here) into a model
  whose 4-bit layers are :class:`.modules.NF4Linear` holding exactly the file's bytes;
  :func:`.modules.apply_lora` then turns them into :class:`.modules.QLoRALinear`.

Only JSON and safetensors are read. A defect raises :class:`CheckpointError` (a
:class:`reflora.formats.bnb.StateDictError`) naming the key, or the format modules' own errors, which
name it too.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from reflora.backends.torch.modules import (
    NF4Linear,
    _check_targets,
    _matches,
    _output_embeddings,
    _quantize_layer,
    _set_submodule,
    lora_modules,
    progress_bar,
)
from reflora.backends.torch.quant_state import TorchQuantState, numpy_to_torch, torch_to_numpy
from reflora.formats import bnb
from reflora.formats import safetensors as sft
from reflora.formats.bnb import StateDictError
from reflora.formats.files import write_files

__all__ = [
    "CheckpointError",
    "from_bitsandbytes",
    "load_4bit_checkpoint",
    "quantize_model",
    "save_4bit_checkpoint",
]

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
CONFIG = "config.json"


class CheckpointError(StateDictError):
    """A checkpoint that does not fit the model or the format; ``key`` names the tensor or field."""


def quantize_model(
    model: nn.Module,
    target_modules: list[str] | str | None = None,
    *,
    blocksize: int = 64,
    quant_type: str = "nf4",
    double_quant: bool = True,
    progress: bool | None = None,
) -> list[str]:
    """Replace ``model``'s ``nn.Linear`` layers by frozen :class:`NF4Linear` ones, in place (what
    transformers' ``load_in_4bit`` does). target_modules: None for every linear layer but those
    transformers' ``load_in_4bit`` keeps in full precision, the output embeddings
    (``get_output_embeddings()``, a language-model head) and layers whose weight is tied to another
    parameter; else PEFT's matching rule (:func:`.modules.apply_lora`), which can name those too. Layers
    inside LoRA wrappers (adapters and their bases) are left alone: quantize those through
    ``apply_lora(quantize=...)``. progress: as for :func:`.modules.apply_lora`; a target that matches no
    layer to quantize is a ValueError, as there. Returns the paths replaced."""
    if target_modules is not None:
        target_modules = _check_targets(target_modules, model)
    wrapped = tuple(f"{n}." for n in lora_modules(model))
    kept = _kept_in_full_precision(model) if target_modules is None else set()
    chosen = [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear)
        and n
        and not n.startswith(wrapped)
        and n not in kept
        and (target_modules is None or _matches(n, target_modules))
    ]
    if target_modules is not None and not chosen:
        raise ValueError(
            f"target_modules {target_modules!r} matches no nn.Linear outside the LoRA wrappers (quantize "
            "adapted layers through apply_lora(quantize=...))"
        )
    # All layers are quantized before any is replaced: an error leaves the model as it was.
    kw = {"quant_type": quant_type, "double_quant": double_quant}
    names = progress_bar(chosen, "quantize_model", progress)
    built = [_quantize_layer(n, model.get_submodule(n), blocksize, **kw) for n in names]
    for name, q in zip(chosen, built, strict=True):
        _set_submodule(model, name, q.requires_grad_(False).train(model.get_submodule(name).training))
    return chosen


def _tied(model: nn.Module) -> list[list[str]]:
    """The groups of parameter names that reach one Parameter (tied weights), each in module order."""
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return [g for g in groups.values() if len(g) > 1]


def _kept_in_full_precision(model: nn.Module) -> set[str]:
    """Layers transformers' load_in_4bit leaves unquantized by default: the output embeddings and
    the layers whose weight is tied to another parameter."""
    head = _output_embeddings(model)
    kept = {n for n, m in model.named_modules() if head is not None and m is head}
    kept |= {name.rsplit(".", 1)[0] for group in _tied(model) for name in group}
    return kept


def from_bitsandbytes(model: nn.Module) -> list[str]:
    """Replace ``model``'s bitsandbytes ``Linear4bit`` layers (a model loaded with
    ``BitsAndBytesConfig(load_in_4bit=True)``), in place, by frozen :class:`NF4Linear` ones holding the
    same bytes, read from each layer's own state dict through :func:`reflora.formats.bnb.from_state_dict`
    (so a layer bitsandbytes could not serialize is a :class:`StateDictError` naming the key), with its
    bias. :func:`.modules.apply_lora` then adapts them. All layers are read before any is replaced.
    Returns the paths replaced (ValueError when there is none)."""

    def bnb_layer(m: nn.Module) -> bool:
        return type(m).__name__ == "Linear4bit" and type(m).__module__.startswith("bitsandbytes")

    chosen = [n for n, m in model.named_modules() if n and bnb_layer(m)]
    if any(type(m).__module__.startswith("peft") for m in model.modules()):
        raise ValueError("a PEFT model: call from_bitsandbytes on the base model, before get_peft_model")
    if not chosen:
        raise ValueError(f"the {type(model).__name__} has no bitsandbytes Linear4bit layer")
    built = []
    for name in chosen:
        layer = model.get_submodule(name)
        if getattr(getattr(layer.weight, "quant_state", None), "packing_format_for_cpu", False):
            # bitsandbytes repacks a layer for its CPU kernel at the first forward, and its state dict
            # then holds scales double-quantized again: not the bytes the model was loaded with
            raise ValueError(
                f"{name!r} was repacked by a bitsandbytes CPU forward; call from_bitsandbytes before "
                "running the model"
            )
        own = {k: torch_to_numpy(v) for k, v in layer.state_dict().items()}
        try:
            state = bnb.from_state_dict(own, "weight")
        except StateDictError as e:
            raise CheckpointError(f"{name}.{e.key}", str(e).split(": ", 1)[-1]) from None
        bias = None if layer.bias is None else layer.bias.detach().clone()
        built.append(NF4Linear(TorchQuantState.from_state(state, layer.weight.device), bias))
    for name, q in zip(chosen, built, strict=True):
        _set_submodule(model, name, q.requires_grad_(False).train(model.get_submodule(name).training))
    _detach_bnb_quantizer(model)
    return chosen


def _detach_bnb_quantizer(model: nn.Module) -> None:
    """Drop transformers' bitsandbytes quantizer once no bitsandbytes layer is left, as transformers
    does after dequantizing a model (``remove_quantization_config``: the quantizer, the config's
    ``quantization_config``, ``is_quantized``). It described layers that are gone, and kept the model
    "purely quantized" to transformers, whose Trainer then refused to train it."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None or not type(quantizer).__name__.startswith("Bnb"):
        return
    if any(type(m).__module__.startswith("bitsandbytes") for m in model.modules()):
        return  # 8-bit layers, say: still the quantizer's
    remove = getattr(quantizer, "remove_quantization_config", None)
    if callable(remove):
        remove(model)
    else:
        model.hf_quantizer = None
        model.is_quantized = False


def _hf_path(name: str) -> str:
    """The path of a layer in the unwrapped model: adapters' ``.base_layer`` steps removed."""
    return name.replace(".base_layer", "")


def _quantized_layers(model: nn.Module) -> dict[str, NF4Linear]:
    return {_hf_path(n): m for n, m in model.named_modules() if isinstance(m, NF4Linear)}


def _quantization_config(
    layers: dict[str, NF4Linear], model: nn.Module, compute_dtype: str
) -> dict[str, Any]:
    kinds = {(m.quant_type, m.double_quant) for m in layers.values()}
    if len(kinds) != 1:
        raise ValueError(
            f"a checkpoint has one quant type and double-quant setting; the layers mix {sorted(kinds)}"
        )
    quant_type, double_quant = kinds.pop()
    adapters = {f"{n}.{part}" for n in lora_modules(model) for part in ("lora_A", "lora_B")}  # not saved
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in adapters]
    skip = sorted(_hf_path(n) for n in linear if _hf_path(n))
    skip = [n for n in skip if n not in layers]
    # The fields and values transformers 5 writes for BitsAndBytesConfig(load_in_4bit=True, ...).
    return {
        "_load_in_4bit": True,
        "_load_in_8bit": False,
        "bnb_4bit_compute_dtype": compute_dtype,
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": quant_type,
        "bnb_4bit_use_double_quant": double_quant,
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_skip_modules": skip or (None if _default_skips_hold(model, layers) else []),
        "llm_int8_threshold": 6.0,
        "load_in_4bit": True,
        "load_in_8bit": False,
        "quant_method": "bitsandbytes",
    }


def _default_skips_hold(model: nn.Module, layers: dict[str, NF4Linear]) -> bool:
    """Whether ``llm_int8_skip_modules: null`` would load ``layers`` as they are: given null,
    transformers skips its own choice (the output embeddings, tied layers and the owner of the last
    parameter named ``*.weight``), so null is written, as transformers writes it, only when none of
    those is a 4-bit layer here; otherwise an explicit list, empty if need be."""
    default = _kept_in_full_precision(model)
    params = [n for n, _ in model.named_parameters()]
    if params and params[-1].endswith(".weight"):
        default.add(params[-1].removesuffix(".weight"))
    return not {_hf_path(n) for n in default} & set(layers)


_DTYPES = ("float32", "float16", "bfloat16")


def _model_dtype(model: nn.Module, layers: dict[str, NF4Linear]) -> str:
    """The dtype a checkpoint's config records: the first floating-point parameter's, adapters aside
    (they are not saved), else the first 4-bit weight's."""
    adapters = {id(p) for m in lora_modules(model).values() for p in (m.lora_A.weight, m.lora_B.weight)}
    for p in model.parameters():
        if p.is_floating_point() and id(p) not in adapters:
            return str(p.dtype).removeprefix("torch.")
    return str(next(iter(layers.values())).dtype).removeprefix("torch.")


def save_4bit_checkpoint(
    model: nn.Module, directory: str | os.PathLike, *, compute_dtype: str | None = None
) -> dict[str, np.ndarray]:
    """Write ``model`` as a Hugging Face bitsandbytes 4-bit checkpoint in ``directory``.

    model: a torch model (normally a transformers ``PreTrainedModel``, whose ``config`` is written)
        with at least one :class:`NF4Linear` layer; all of them must share quant type and double
        quantization. LoRA adapters are not written; adapted layers are written as their base.
    compute_dtype: ``bnb_4bit_compute_dtype`` in the config (what bitsandbytes computes in):
        "float32", "float16" or "bfloat16"; None, the model's dtype (float32 for any other).
    The config's ``dtype`` is the model's dtype, that of its first floating-point parameter outside the
    adapters (as transformers' ``save_pretrained`` records it), so ``from_pretrained`` rebuilds a
    bfloat16 model in bfloat16.
    Writes ``model.safetensors`` (metadata {"format": "pt"}) and, when the model has a ``config``,
    ``config.json``, all or none of them (:func:`reflora.formats.files.write_files`). Returns the
    tensors written, name -> numpy array.
    """
    layers = _quantized_layers(model)
    if not layers:
        raise ValueError("the model has no 4-bit layers; quantize it first (quantize_model or apply_lora)")
    dtype = _model_dtype(model, layers)
    if compute_dtype is None:
        compute_dtype = dtype if dtype in _DTYPES else "float32"
    if compute_dtype not in _DTYPES:
        raise ValueError(f"compute_dtype must be one of {', '.join(_DTYPES)} or None, got {compute_dtype!r}")
    adapted = lora_modules(model)
    skip = {f"{n}.{part}" for n in adapted for part in ("lora_A", "lora_B")}
    skip |= {n for n, m in model.named_modules() if isinstance(m, NF4Linear)}
    tensors: dict[str, np.ndarray] = {}
    for key, value in model.state_dict().items():
        owner = key.rsplit(".", 1)[0]
        if owner in skip or any(key.startswith(f"{s}.") for s in skip):
            continue
        tensors[_hf_path(key)] = torch_to_numpy(value)
    for path, m in layers.items():
        tensors |= bnb.to_state_dict(m.quant_state.to_state(), f"{path}.weight")
        if m.bias is not None:
            tensors[f"{path}.bias"] = torch_to_numpy(m.bias)
    out = Path(directory)
    files = {out / WEIGHTS: sft.to_bytes(tensors, metadata={"format": "pt"})}
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        fields = config.to_dict()
        fields["architectures"] = [type(model).__name__]  # as save_pretrained records it: what to rebuild
        fields["dtype"] = dtype  # as transformers 5 writes it; 4 wrote "torch_dtype", kept in step
        if "torch_dtype" in fields:
            fields["torch_dtype"] = dtype
        fields["quantization_config"] = _quantization_config(layers, model, compute_dtype)
        files[out / CONFIG] = (json.dumps(fields, indent=2, sort_keys=True) + "\n").encode("utf-8")
    out.mkdir(parents=True, exist_ok=True)
    write_files(files)
    return tensors


def _read_tensors(directory: Path) -> dict[str, np.ndarray]:
    if (directory / WEIGHTS).is_file():
        return sft.load(directory / WEIGHTS)
    if not (directory / INDEX).is_file():
        raise CheckpointError(WEIGHTS, f"missing from {directory} (and no {INDEX})")
    try:
        index = json.loads((directory / INDEX).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(INDEX, f"is not UTF-8 JSON: {e}") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError("weight_map", f"{INDEX} has no weight_map object")
    tensors: dict[str, np.ndarray] = {}
    for shard in sorted(set(weight_map.values())):
        if not isinstance(shard, str) or Path(shard).name != shard:
            raise CheckpointError("weight_map", f"shard name {shard!r} is not a file name in the directory")
        tensors |= sft.load(directory / shard)
    missing = sorted(set(weight_map) - set(tensors))
    if missing:
        raise CheckpointError(missing[0], f"listed in {INDEX} but in none of its shards")
    return tensors


def _read_config(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG
    if not path.is_file():
        raise CheckpointError(CONFIG, f"missing from {directory}")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(CONFIG, f"is not UTF-8 JSON: {e}") from None
    q = config.get("quantization_config") if isinstance(config, dict) else None
    if not isinstance(q, dict):
        raise CheckpointError("quantization_config", "missing from config.json: not a quantized checkpoint")
    if q.get("quant_method") != "bitsandbytes" or q.get("load_in_4bit") is not True:
        raise CheckpointError(
            "quantization_config",
            f"must be bitsandbytes 4-bit (quant_method {q.get('quant_method')!r}, "
            f"load_in_4bit {q.get('load_in_4bit')!r})",
        )
    return config


def _skeleton(directory: Path, config: dict[str, Any]) -> nn.Module:
    """An unquantized model of the checkpoint's architecture, built from its config by transformers."""
    import transformers

    fields = {k: v for k, v in config.items() if k != "quantization_config"}
    model_type = fields.pop("model_type", None)
    if model_type is None:
        raise CheckpointError("model_type", "missing from config.json; pass the model to load into")
    hf_config = transformers.AutoConfig.for_model(model_type, **fields)
    arch = (fields.get("architectures") or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    return cls(hf_config) if cls is not None else transformers.AutoModel.from_config(hf_config)


def _device(model: nn.Module) -> torch.device:
    """Where the model lives: its first parameter's or buffer's device (a model whose only weights are
    bias-free 4-bit layers has no parameter), else the CPU."""
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


def _replace_quantized(
    model: nn.Module, tensors: dict[str, np.ndarray], prefixes: list[str], replaced: list
) -> dict[str, np.ndarray]:
    """Put an :class:`NF4Linear` of each 4-bit weight in place of its layer (noting each in
    ``replaced``, in the layer's train/eval mode); returns the tensors left to assign."""
    consumed: set[str] = set()
    for prefix in prefixes:
        state = bnb.from_state_dict(tensors, prefix)
        path = prefix.removesuffix(".weight")
        try:
            target = model.get_submodule(path) if path != prefix else None
        except AttributeError:
            target = None
        if not isinstance(target, (nn.Linear, NF4Linear)):
            raise CheckpointError(
                prefix, f"is a 4-bit weight but {path!r} is not a linear layer of the model"
            )
        model_shape = (target.out_features, target.in_features)
        if model_shape != state.shape:
            raise CheckpointError(prefix, f"holds shape {state.shape}; the model's {path!r} is {model_shape}")
        bias = tensors.get(f"{path}.bias")
        if (bias is None) != (target.bias is None):
            raise CheckpointError(f"{path}.bias", "present in only one of the checkpoint and the model")
        if bias is not None and bias.shape != (state.shape[0],):
            raise CheckpointError(f"{path}.bias", f"has shape {bias.shape}, expected ({state.shape[0]},)")
        device = target.bias.device if target.bias is not None else _device(model)
        ts = TorchQuantState.from_state(state, device)
        layer = NF4Linear(ts, None if bias is None else numpy_to_torch(bias, device)).train(target.training)
        _set_submodule(model, path, layer)
        replaced.append((path, target))
        consumed |= bnb.weight_keys(tensors, prefix)
        consumed.add(f"{path}.bias")
    return {k: v for k, v in tensors.items() if k not in consumed}


def _check_rest(model: nn.Module, rest: dict[str, np.ndarray]) -> tuple[list[list[str]], list[str]]:
    """Check that the tensors left fit the model's other parameters and buffers, every one of them
    (tied weights may be stored once); returns the tied groups present and each one's stored name."""
    own = model.state_dict()
    quantized = {n for n, m in model.named_modules() if isinstance(m, NF4Linear)}
    for key, value in rest.items():
        if key not in own:
            raise CheckpointError(key, f"matches no parameter or buffer of the {type(model).__name__}")
        if tuple(own[key].shape) != value.shape:
            raise CheckpointError(key, f"has shape {value.shape}; the model's is {tuple(own[key].shape)}")
    # Tied weights are stored once (transformers leaves the others out): a name is present if any
    # name of its group is, and the group is tied again after loading.
    groups = [g for g in _tied(model) if any(k in rest for k in g)]
    tied = {k for g in groups for k in g}
    for key in own:
        if key not in rest and key not in tied and key.rsplit(".", 1)[0] not in quantized:
            raise CheckpointError(key, "the model has it, the checkpoint does not")
    sources = []  # each group's first stored name, whose tensor the group shares after loading
    for group in groups:
        stored = [k for k in group if k in rest]
        differ = [k for k in stored[1:] if rest[k].tobytes() != rest[stored[0]].tobytes()]
        if differ:
            raise CheckpointError(
                differ[0], f"the model ties it to {stored[0]!r}, but the checkpoint holds different values"
            )
        sources.append(stored[0])
    return groups, sources


def load_4bit_checkpoint(directory: str | os.PathLike, model: nn.Module | None = None) -> nn.Module:
    """Load a Hugging Face bitsandbytes 4-bit checkpoint into reflora's layers; returns the model.

    directory: holds ``config.json`` (with a bitsandbytes 4-bit ``quantization_config``) and
        ``model.safetensors`` (or ``model.safetensors.index.json`` and its shards).
    model: the unquantized model to load into (its ``nn.Linear`` layers at the quantized paths are
        replaced); None builds it from the config with transformers.
    Each 4-bit weight (found by ``reflora.formats.bnb.quantized_prefixes``) is read with
    :func:`reflora.formats.bnb.from_state_dict` and becomes an :class:`NF4Linear` holding the same
    bytes, with ``P.bias``; every other tensor is assigned as stored (its dtype kept). Weights the
    model ties (an LM head sharing the input embeddings) may be stored once, as transformers stores
    them, and are tied again after loading. All parameters end frozen. Raises :class:`CheckpointError`
    naming the key for a tensor the model does not have, a parameter the file lacks, a shape that
    differs, or a 4-bit weight at a path that is not a linear layer of matching shape, or naming the
    file for an index that is not JSON; :class:`StateDictError` for a malformed 4-bit weight. An
    error leaves a given model as it was. A model built here is returned in eval mode, as
    ``from_pretrained`` returns one; a given model keeps its mode (each new layer takes the mode of the
    layer it replaces).
    """
    directory = Path(directory)
    config = _read_config(directory)
    tensors = _read_tensors(directory)
    fresh = model is None
    if model is None:
        model = _skeleton(directory, config)
    prefixes = bnb.quantized_prefixes(tensors)
    if not prefixes:
        raise CheckpointError(WEIGHTS, "holds no 4-bit weight (no '*.quant_state.bitsandbytes__*' key)")
    replaced: list[tuple[str, nn.Module]] = []  # (path, the layer it held), to undo on an error
    try:
        rest = _replace_quantized(model, tensors, prefixes, replaced)
        groups, sources = _check_rest(model, rest)
    except BaseException:
        for path, original in reversed(replaced):
            _set_submodule(model, path, original)
        raise
    device = _device(model)
    model.load_state_dict({k: numpy_to_torch(v, device) for k, v in rest.items()}, strict=False, assign=True)
    for group, source in zip(groups, sources, strict=True):
        loaded = model.get_parameter(source)
        for key in group:
            owner, _, leaf = key.rpartition(".")
            setattr(model.get_submodule(owner), leaf, loaded)
    model.requires_grad_(False)
    return model.eval() if fresh else model  # a built model is returned as from_pretrained returns it
