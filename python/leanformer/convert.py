"""In-place conversions of a model's layers to leanformer's sparse modules."""
from __future__ import annotations

from typing import Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from leanformer.nn.mlp import MLP
from leanformer.nn.topk_mlp import TopKMLP


def _hf_bert_layers(model: nn.Module) -> Iterator[Tuple[str, nn.Module]]:
    """Hugging Face BERT-style layers, by shape rather than by import: ``layer.intermediate``
    (``dense`` + ``intermediate_act_fn``) feeding ``layer.output.dense``."""
    for name, m in model.named_modules():
        inter, out = getattr(m, "intermediate", None), getattr(m, "output", None)
        if (isinstance(getattr(inter, "dense", None), nn.Linear) and callable(getattr(inter, "intermediate_act_fn", None))
                and isinstance(getattr(out, "dense", None), nn.Linear)):
            yield name, m


def _activation_name(fn) -> Optional[str]:
    probe = torch.linspace(-6, 6, 97, dtype=torch.float64)
    for name, ref in (("relu", F.relu), ("gelu", F.gelu)):
        if torch.allclose(fn(probe), ref(probe), atol=1e-7):
            return name
    return None


def _topk_from(fc1: nn.Linear, fc2: nn.Linear, activation: str, k: int, mode: str, training: bool) -> TopKMLP:
    new = TopKMLP(fc1.in_features, fc1.out_features, k, activation, bias=fc1.bias is not None, mode=mode)
    new.fc1.load_state_dict(fc1.state_dict())
    new.fc2.load_state_dict(fc2.state_dict())
    return new.to(device=fc1.weight.device, dtype=fc1.weight.dtype).train(training)


@torch.no_grad()
def to_topk_mlp(model: nn.Module, k: Optional[int] = None, ratio: Optional[float] = None, *,
                mode: str = "auto") -> List[str]:
    """Replaces, in place, every MLP of ``model`` with a :class:`leanformer.nn.TopKMLP` holding
    the same weights, keeping ``k`` activations per token (or ``round(ratio * hidden)``; exactly
    one of the two). With ``k = hidden`` the outputs are unchanged.

    MLPs found: every :class:`leanformer.nn.MLP` (the project's models, ``BertEncoder``), and the
    layers of Hugging Face ``transformers`` BERT-style models (``layer.intermediate`` then
    ``layer.output.dense``): there ``output.dense`` becomes the whole top-k MLP and
    ``intermediate`` an ``nn.Identity``, so ``output``'s residual and LayerNorm stay as they are.

    Returns the names of the converted modules; raises if there is none, or if an MLP's
    activation has no top-k kernel (only ReLU and exact GELU do)."""
    if (k is None) == (ratio is None):
        raise ValueError("give exactly one of k and ratio")
    if ratio is not None and not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")

    def k_for(name: str, hidden: int) -> int:
        kk = k if k is not None else int(round(ratio * hidden))
        if not 0 <= kk <= hidden:
            raise ValueError(f"cannot convert {name}: k={kk} is outside [0, hidden={hidden}]")
        return kk

    ours = [(name, m) for name, m in model.named_modules() if type(m) is MLP]
    hf = list(_hf_bert_layers(model))
    if not ours and not hf:
        raise ValueError(f"{type(model).__name__} has no leanformer.nn.MLP or Hugging Face BERT layer to convert")
    converted = []
    for name, mlp in ours:
        if mlp.activation not in ("relu", "gelu"):
            raise ValueError(f"cannot convert {name}: top-k needs a relu or gelu MLP, it is {mlp.activation}")
        new = _topk_from(mlp.fc1, mlp.fc2, mlp.activation, k_for(name, mlp.fc1.out_features), mode, mlp.training)
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
        converted.append(name)
    for name, layer in hf:
        inter, where = layer.intermediate, f"{name}.output.dense" if name else "output.dense"
        act = _activation_name(inter.intermediate_act_fn)
        if act is None:
            raise ValueError(f"cannot convert {where}: top-k needs ReLU or exact GELU, the layer uses "
                             f"{type(inter.intermediate_act_fn).__name__}")
        if (inter.dense.bias is None) != (layer.output.dense.bias is None):
            raise ValueError(f"cannot convert {where}: one of its two Linears has a bias and the other not")
        layer.output.dense = _topk_from(inter.dense, layer.output.dense, act,
                                        k_for(where, inter.dense.out_features), mode, layer.training)
        layer.intermediate = nn.Identity()
        converted.append(where)
    return converted
