"""Which registered model (and options) a state dict fits: the hint in checkpoint errors.

Candidates are the registered models sharing the requested name's first two parts
("deit_small*": timm's DeiTs and this project's EViT, lambda and shrink variants), built
on the meta device so no memory is allocated and no weights are initialised. A state dict
whose blocks lack attention keys is also tried against the `*_shrink` models with the
matching `--done_layer`.
"""
from __future__ import annotations

import re
from typing import Optional

import torch

_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.")


def removed_attention_blocks(state_dict: dict) -> list[int]:
    """Indices of blocks that have an MLP but no attention weights (attention-shrink layout)."""
    blocks = {int(m.group(1)) for key in state_dict if (m := _BLOCK_KEY.match(key))}
    return sorted(i for i in blocks
                  if f"blocks.{i}.mlp.fc1.weight" in state_dict and f"blocks.{i}.attn.qkv.weight" not in state_dict)


def _layout(name: str, kwargs: dict) -> Optional[set]:
    import timm
    try:
        with torch.device("meta"):
            model = timm.create_model(name, **kwargs)
    except Exception:  # noqa: BLE001 - a candidate that cannot be built is simply not suggested
        return None
    return {(key, tuple(value.shape)) for key, value in model.state_dict().items()}


def suggest_model_for_keys(state_dict: dict, model_name: Optional[str], limit: int = 24) -> Optional[str]:
    """`--model NAME [options]` whose layout equals `state_dict`'s, or None.

    Several models can share one layout (DeiT, EViT and the lambda models do); up to three
    names are returned, the requested family's first.
    """
    if not model_name:
        return None
    fits = _fitting_models(state_dict, model_name, "_".join(model_name.split("_")[:2]), limit)
    if not fits:  # another size of the same family ("deit_tiny" weights for "deit_small")
        fits = _fitting_models(state_dict, model_name, model_name.split("_")[0] + "_", 2 * limit)
    if not fits:
        return None
    import timm
    same_module = timm.models.model_entrypoint(model_name).__module__ if timm.is_model(model_name) else None
    fits.sort(key=lambda spec: timm.models.model_entrypoint(spec.split()[0]).__module__ != same_module)
    return fits[0] + (f" (also fits: {', '.join(fits[1:3])})" if len(fits) > 1 else "")


def _fitting_models(state_dict: dict, model_name: str, prefix: str, limit: int) -> list[str]:
    import timm
    candidates = [name for name in timm.list_models(f"{prefix}*") if name != model_name][:limit]
    removed = removed_attention_blocks(state_dict)
    if removed and model_name.endswith("_shrink") and timm.is_model(model_name):
        candidates.insert(0, model_name)  # the same model with the --done_layer the weights have
    wanted = {(key, tuple(value.shape)) for key, value in state_dict.items() if isinstance(value, torch.Tensor)}
    head = state_dict.get("head.weight")
    base_kwargs = {"num_classes": head.shape[0]} if isinstance(head, torch.Tensor) and head.dim() == 2 else {}

    fits = []
    for name in candidates:
        kwargs, option = dict(base_kwargs), ""
        if removed and name.endswith("_shrink"):
            kwargs["done_layer"] = removed
            option = f" --done_layer [{','.join(map(str, removed))}]"
        if _layout(name, kwargs) == wanted:
            fits.append(name + option)
    return fits
