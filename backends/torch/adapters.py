"""LoRA adapters on disk in PEFT's format, read and written without pickle.

A directory holds two files (PEFT 0.21; docs/training.md):

* ``adapter_model.safetensors``: for each adapted layer at path ``P``,
  ``base_model.model.P.lora_A.weight`` (r, in) and ``base_model.model.P.lora_B.weight`` (out, r), in
  the adapter's dtype; metadata ``{"format": "pt"}``. Written and read by
  :mod:`reflora.formats.safetensors` (numpy only).
* ``adapter_config.json``: every field PEFT writes (``peft_type: "LORA"``, ``r``, ``lora_alpha``,
  ``target_modules``, ``use_rslora``, ``lora_dropout``, ``init_lora_weights``, ...), sorted, indented
  by 2, as PEFT writes it.

So PEFT's ``PeftModel.from_pretrained`` loads what :func:`save_adapter` writes, and :func:`load_adapter`
loads what PEFT's ``save_pretrained`` writes, for plain LoRA (rsLoRA included). Features this backend
does not implement (DoRA, per-module rank or alpha patterns, biases, fan_in_fan_out, modules_to_save,
...) are refused by name rather than silently dropped. Every defect of a file raises
:class:`AdapterError` naming the key or field.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from reflora.backends.torch.modules import (
    ALL_LINEAR,
    LoRAConfig,
    _matches,
    _set_submodule,
    apply_lora,
    check_adapter_compute,
    lora_modules,
)
from reflora.backends.torch.quant_state import numpy_to_torch, torch_to_numpy
from reflora.formats import safetensors as sft
from reflora.formats.files import write_files

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "AdapterError", "load_adapter", "read_config", "save_adapter"]

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PREFIX = "base_model.model."

# PEFT 0.21.2's LoraConfig fields at the values that mean "plain LoRA" (what its save_pretrained
# writes for a default config). A file may omit any of them; a value other than these for a feature
# this backend lacks is refused (_UNSUPPORTED).
_PEFT_DEFAULTS: dict[str, Any] = {
    "alora_invocation_tokens": None,
    "alpha_pattern": {},
    "arrow_config": None,
    "auto_mapping": None,
    "base_model_name_or_path": None,
    "bias": "none",
    "corda_config": None,
    "ensure_weight_tying": False,
    "eva_config": None,
    "exclude_modules": None,
    "fan_in_fan_out": False,
    "inference_mode": True,
    "init_lora_weights": True,
    "kasa_config": None,
    "layer_replication": None,
    "layers_pattern": None,
    "layers_to_transform": None,
    "loftq_config": {},
    "lora_alpha": 8,
    "lora_bias": False,
    "lora_dropout": 0.0,
    "lora_ga_config": None,
    "megatron_config": None,
    "megatron_core": "megatron.core",
    "modules_to_save": None,
    "monteclora_config": None,
    "peft_type": "LORA",
    "peft_version": None,
    "qalora_group_size": 16,
    "r": 8,
    "rank_pattern": {},
    "revision": None,
    "target_modules": None,
    "target_parameters": None,
    "task_type": None,
    "trainable_token_indices": None,
    "use_bdlora": None,
    "use_dora": False,
    "use_qalora": False,
    "use_rslora": False,
    "velora_config": None,
}
# Fields that change the adapter's meaning; each must be absent or at its plain-LoRA value.
_UNSUPPORTED = (
    "alora_invocation_tokens", "alpha_pattern", "arrow_config", "bias", "corda_config", "eva_config",
    "exclude_modules", "fan_in_fan_out", "kasa_config", "layer_replication", "layers_pattern",
    "layers_to_transform", "lora_bias", "lora_ga_config", "modules_to_save", "monteclora_config",
    "rank_pattern", "target_parameters", "trainable_token_indices", "use_bdlora", "use_dora", "use_qalora",
    "velora_config",
)  # fmt: skip
_EMPTY = (None, {}, [], False, "none")
# Initialisations that only draw A and B; others change the base weight as well.
_RANDOM_INITS = ("gaussian", "orthogonal")


class AdapterError(ValueError):
    """An adapter directory that cannot be loaded. ``key`` names the tensor or config field at fault."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key!r}: {message}")
        self.key = key


def _config_dict(config: LoRAConfig, model: nn.Module) -> dict[str, Any]:
    out = dict(_PEFT_DEFAULTS)
    targets = config.target_modules
    out |= {
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
        "use_rslora": config.use_rslora,
        "target_modules": targets if isinstance(targets, str) else sorted(targets),
        "init_lora_weights": True if config.init == "kaiming" else "gaussian",
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        "auto_mapping": {"base_model_class": type(model).__name__, "parent_library": type(model).__module__},
    }
    return out


def save_adapter(model: nn.Module, directory: str | os.PathLike) -> None:
    """Write ``model``'s adapters to ``directory`` (created if missing) in PEFT's format.

    model: a model prepared by :func:`.modules.apply_lora` (or :func:`load_adapter`).
    Writes ``adapter_model.safetensors`` (each adapted layer's lora_A / lora_B weights, in their dtype)
    and ``adapter_config.json``, both or neither (:func:`reflora.formats.files.write_files`: an
    adapter saved over an older one is never left half written or mixed with it). Raises ValueError
    if the model has no adapters.
    """
    layers = lora_modules(model)
    config = getattr(model, "reflora_lora", None)
    if not layers:
        raise ValueError("the model has no LoRA adapters (use apply_lora or load_adapter first)")
    if config is None:  # adapters found, but apply_lora ran on a submodule: its config is held there
        holders = [n for n, m in model.named_modules() if n and getattr(m, "reflora_lora", None) is not None]
        where = f" (apply_lora ran on {holders[0]!r}: save that module)" if holders else ""
        raise ValueError(f"the model has LoRA layers but no reflora_lora config of its own{where}")
    tensors: dict[str, np.ndarray] = {}
    for name, m in layers.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = torch_to_numpy(m.lora_A.weight)
        tensors[f"{PREFIX}{name}.lora_B.weight"] = torch_to_numpy(m.lora_B.weight)
    text = json.dumps(_config_dict(config, model), indent=2, sort_keys=True) + "\n"
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    write_files(
        {
            path / ADAPTER_WEIGHTS: sft.to_bytes(tensors, metadata={"format": "pt"}),
            path / ADAPTER_CONFIG: text.encode("utf-8"),
        }
    )


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise AdapterError(twice, "appears twice in adapter_config.json")
    return out


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The checked fields of ``directory/adapter_config.json`` (a dict; missing fields at PEFT's defaults).

    Raises :class:`AdapterError` naming the field for: a file that is not UTF-8 JSON or not an
    object, a duplicated field, ``peft_type`` other than "LORA", ``r`` not a positive int,
    ``lora_alpha`` not a finite number, ``use_rslora`` not a bool, ``lora_dropout`` outside [0, 1),
    ``target_modules`` not a list of names or a regex, an ``init_lora_weights`` that also rewrites
    the base weight (PiSSA, OLoRA, LoftQ, ...), and any feature of :data:`_UNSUPPORTED` switched on.
    A field PEFT 0.21 does not have, set to anything but an empty value (null, false, [], {}, "none"),
    gives a UserWarning naming it: a newer PEFT's feature would otherwise pass unseen.
    """
    path = Path(directory) / ADAPTER_CONFIG
    if not Path(directory).is_dir():
        what = "is a file" if Path(directory).exists() else "does not exist"
        raise AdapterError(ADAPTER_CONFIG, f"expected in the directory {str(directory)!r}, which {what}")
    if not path.is_file():
        raise AdapterError(ADAPTER_CONFIG, f"missing from {Path(directory)}")
    try:
        fields = json.loads(path.read_bytes().decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterError(ADAPTER_CONFIG, f"is not UTF-8 JSON: {e}") from None
    if not isinstance(fields, dict):
        raise AdapterError(ADAPTER_CONFIG, f"must hold a JSON object, got {type(fields).__name__}")
    cfg = dict(_PEFT_DEFAULTS) | fields
    if cfg["peft_type"] != "LORA":
        raise AdapterError("peft_type", f"is {cfg['peft_type']!r}; only 'LORA' adapters are supported")
    r = cfg["r"]
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise AdapterError("r", f"must be a positive integer, got {r!r}")
    alpha = cfg["lora_alpha"]
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise AdapterError("lora_alpha", f"must be a finite number, got {alpha!r}")
    if not isinstance(cfg["use_rslora"], bool):
        raise AdapterError("use_rslora", f"must be true or false, got {cfg['use_rslora']!r}")
    p = cfg["lora_dropout"]
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise AdapterError("lora_dropout", f"must be a number in [0, 1), got {p!r}")
    targets = cfg["target_modules"]
    good_list = isinstance(targets, list) and targets and all(isinstance(t, str) and t for t in targets)
    if not (good_list or (isinstance(targets, str) and targets)):
        raise AdapterError("target_modules", f"must be a list of module names or a regex, got {targets!r}")
    init = cfg["init_lora_weights"]
    if not (init is True or init is False or init in _RANDOM_INITS):
        # PiSSA, OLoRA, LoftQ, CorDA, EVA, ... rewrite the base weight too: the adapter alone is not the model
        raise AdapterError(
            "init_lora_weights", f"{init!r} is not supported (true, false, or one of {list(_RANDOM_INITS)})"
        )
    for name in _UNSUPPORTED:
        if not _empty(cfg[name]):
            raise AdapterError(name, f"= {cfg[name]!r} is a PEFT feature this backend does not implement")
    unknown = sorted(k for k in fields if k not in _PEFT_DEFAULTS and not _empty(fields[k]))
    if unknown:
        warnings.warn(
            f"{ADAPTER_CONFIG} sets fields this version of reflora does not know ({', '.join(unknown)}): "
            "a newer PEFT's feature would be ignored here, and the outputs would differ from PEFT's",
            UserWarning,
            stacklevel=2,
        )
    return cfg


def _empty(value: Any) -> bool:
    return any(value is e or (type(value) is type(e) and value == e) for e in _EMPTY)


def _tensor(d: dict[str, np.ndarray], key: str, shape: tuple[int, int]) -> torch.Tensor:
    if key not in d:
        raise AdapterError(key, f"missing from {ADAPTER_WEIGHTS}")
    a = d[key]
    if a.dtype.kind != "f" and a.dtype.name != "bfloat16":
        raise AdapterError(key, f"must be a float tensor, got {a.dtype}")
    if a.shape != shape:
        raise AdapterError(key, f"has shape {a.shape}, expected {shape}")
    if a.dtype.name not in ("float32", "float16", "bfloat16", "float64"):
        raise AdapterError(key, f"dtype {a.dtype} is not supported")
    bad = ~np.isfinite(a.astype(np.float64))
    if bad.any():
        where = tuple(int(i) for i in np.unravel_index(int(np.flatnonzero(bad)[0]), a.shape))
        raise AdapterError(key, f"is not finite at index {where}")
    return numpy_to_torch(a)


def load_adapter(
    model: nn.Module,
    directory: str | os.PathLike,
    *,
    quantize: str | None = None,
    double_quant: bool = True,
    blocksize: int = 64,
    adapter_compute: str = "compute",
    adapter_dtype: torch.dtype | None = None,
) -> nn.Module:
    """Load the PEFT-format adapter in ``directory`` into ``model``; returns the model.

    model: either a model without adapters, which is first prepared by :func:`.modules.apply_lora`
        with the file's r, lora_alpha, target_modules, lora_dropout and use_rslora (``quantize``,
        ``double_quant`` and ``blocksize`` choose its base as there, ``adapter_compute`` its adapter
        arithmetic, ``adapter_dtype`` the adapters' dtype, by default PEFT's: float64 on a float64
        model's layers, float32 otherwise); or a model already prepared with the same r, alpha,
        rsLoRA and adapted layers (which keep their own adapter_compute, and their dropout: another
        than the file's is kept, with a warning, since it changes training only).
    New layers take the train/eval mode of the layers they wrap (:func:`.modules.apply_lora`).
    The tensors are copied into lora_A / lora_B (converted to the parameters' dtype).
    Raises :class:`AdapterError` naming the key for a missing, extra, non-float, wrongly shaped or
    non-finite tensor, or for a config field it cannot honour (:func:`read_config`); the
    safetensors reader's own :class:`reflora.formats.safetensors.SafetensorsError` for a broken file.
    Nothing but JSON and safetensors is ever read.
    """
    cfg = read_config(directory)
    weights = Path(directory) / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise AdapterError(ADAPTER_WEIGHTS, f"missing from {Path(directory)}")
    check_adapter_compute(adapter_compute)
    tensors = sft.load(weights)
    if lora_modules(model):
        _load_tensors(model, cfg, tensors)
        return model
    # Prepare the model, and undo that if the file's tensors do not fit it: the model stays as it was.
    originals = dict(model.named_modules())
    flags = [(p, p.requires_grad) for p in model.parameters()]
    apply_lora(
        model, cfg["r"], cfg["lora_alpha"], _peft_targets(cfg["target_modules"], model),
        dropout=float(cfg["lora_dropout"]), rslora=cfg["use_rslora"], quantize=quantize,
        double_quant=double_quant, blocksize=blocksize, adapter_compute=adapter_compute,
        adapter_dtype=adapter_dtype,
        init="gaussian" if cfg["init_lora_weights"] == "gaussian" else "kaiming", verbose=False,
    )  # fmt: skip
    try:
        _load_tensors(model, cfg, tensors)
    except BaseException:
        for name in lora_modules(model):
            _set_submodule(model, name, originals[name])
        for p, flag in flags:
            p.requires_grad_(flag)
        del model.reflora_lora, model.reflora_summary
        raise
    return model


def _peft_targets(targets: list[str] | str, model: nn.Module) -> list[str] | str:
    """A file's target_modules as PEFT applies them: names that match no layer of this model are
    skipped (a config written for several architectures lists them all); none matching is an error."""
    names = [n for n, _ in model.named_modules() if n]
    if isinstance(targets, str):  # a regular expression, or "all-linear"
        kept = targets if targets.lower() == ALL_LINEAR or any(_matches(n, targets) for n in names) else None
    else:
        kept = [t for t in targets if any(_matches(n, [t]) for n in names)]
    if not kept:
        raise AdapterError(
            "target_modules", f"none of {targets} matches a layer of the {type(model).__name__}"
        )
    return kept


def _load_tensors(model: nn.Module, cfg: dict[str, Any], tensors: dict[str, np.ndarray]) -> None:
    """Copy the file's lora_A / lora_B into the adapted layers, after checking they all fit."""
    layers = lora_modules(model)
    for name, m in layers.items():
        agree = (("r", m.r), ("lora_alpha", m.lora_alpha), ("use_rslora", m.use_rslora))
        for field, value in agree:
            if cfg[field] != value:
                raise AdapterError(
                    field, f"is {cfg[field]!r} in the file but {value!r} in the model's {name!r}"
                )
    dropouts = {m.lora_dropout for m in layers.values()}
    if dropouts != {cfg["lora_dropout"]}:  # a training setting, not part of the adapter's function
        warnings.warn(
            f"lora_dropout is {cfg['lora_dropout']!r} in the file but {sorted(dropouts)} in the model: the "
            "model's is kept (it changes training only; in eval mode no dropout is applied)",
            stacklevel=3,
        )
    expected = {}
    for name, m in layers.items():
        expected[f"{PREFIX}{name}.lora_A.weight"] = (m.lora_A.weight, (m.r, m.in_features))
        expected[f"{PREFIX}{name}.lora_B.weight"] = (m.lora_B.weight, (m.out_features, m.r))
    for key in tensors:
        if key not in expected:
            raise AdapterError(key, "matches no adapted layer of the model")
    loaded = {key: _tensor(tensors, key, shape) for key, (_, shape) in expected.items()}
    with torch.no_grad():
        for key, (param, _) in expected.items():
            param.copy_(loaded[key].to(param.device, param.dtype))
