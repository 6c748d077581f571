"""Saving and loading the project's models: weights in safetensors, the config in JSON."""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Dict

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from leanformer.models.llama import LlamaConfig, LlamaLM
from leanformer.models.lm import LMConfig, SLABLM
from leanformer.models.vit import SLABViT, ViTConfig

MODELS: Dict[str, tuple] = {SLABViT.model_type: (SLABViT, ViTConfig), SLABLM.model_type: (SLABLM, LMConfig),
                         LlamaLM.model_type: (LlamaLM, LlamaConfig)}
CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"


def _unique_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The state_dict without the second name of a tied tensor (the model re-ties it); a tensor
    that is a view of a larger storage (``LlamaLM.fuse_projections``) as a copy of its own, which
    safetensors requires."""
    seen, state = set(), {}
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), t.shape, t.dtype) if t.numel() else None
        if key is not None and key in seen:
            continue
        seen.add(key)
        t = t.detach().contiguous().cpu()
        state[name] = t.clone() if t.untyped_storage().nbytes() != t.numel() * t.element_size() else t
    return state


def save_pretrained(model: nn.Module, directory: str) -> None:
    """Writes ``directory/config.json`` and ``directory/model.safetensors``."""
    if getattr(model, "model_type", None) not in MODELS:
        raise TypeError(f"save_pretrained takes one of {sorted(MODELS)} models, got {type(model).__name__}")
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump({"model_type": model.model_type, "config": dataclasses.asdict(model.config)}, f, indent=2)
    save_file(_unique_state(model), os.path.join(directory, WEIGHTS_FILE))


def load_pretrained(directory: str, *, device: str = "cpu") -> nn.Module:
    """The model saved by :func:`save_pretrained` (in eval mode). A checkpoint whose keys or
    shapes do not fit its config raises ValueError naming the key."""
    with open(os.path.join(directory, CONFIG_FILE)) as f:
        meta = json.load(f)
    if meta.get("model_type") not in MODELS:
        raise ValueError(f"{directory}/{CONFIG_FILE}: unknown model_type {meta.get('model_type')!r}, "
                         f"expected one of {sorted(MODELS)}")
    cls, config_cls = MODELS[meta["model_type"]]
    fields = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(meta["config"]) - fields)
    if unknown:
        raise ValueError(f"{directory}/{CONFIG_FILE}: unknown config field(s) {unknown} for {config_cls.__name__}")
    model = cls(config_cls(**meta["config"]))
    load_state_checked(model, load_file(os.path.join(directory, WEIGHTS_FILE)), where=directory)
    return model.to(device).eval()


def load_state_checked(model: nn.Module, state: Dict[str, torch.Tensor], where: str = "checkpoint") -> None:
    """``model.load_state_dict(state)`` with errors that name the missing, unexpected or
    mis-shaped key."""
    expected = _unique_state(model)
    missing = [k for k in expected if k not in state]
    if missing:
        raise ValueError(f"{where}: missing key {missing[0]!r}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        raise ValueError(f"{where}: unexpected key {unexpected[0]!r} (not in {type(model).__name__})")
    for k, t in expected.items():
        if tuple(state[k].shape) != tuple(t.shape):
            raise ValueError(f"{where}: {k!r} has shape {tuple(state[k].shape)} in the checkpoint, "
                             f"{tuple(t.shape)} in the model (does the config match?)")
    model.load_state_dict(state, strict=False)
