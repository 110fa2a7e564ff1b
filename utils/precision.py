"""Precision: the one autocast rule, and casting a model for inference in bf16.

Precisions by name (main.py's `--amp --amp-dtype`, benchmark.py's `--precision`):
`fp32` (no autocast); `bf16` / `fp16` (autocast of the fp32 model in that dtype); `amp`
(autocast in float16 on CUDA, where a GradScaler goes with it as in DeiT, and bfloat16
elsewhere); `bf16-weights` (the model cast to bfloat16 by `cast_for_inference`, no autocast).
"""
from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("fp32", "bf16", "fp16", "amp", "bf16-weights")
# main.py's --amp-dtype values -> precision names
AMP_DTYPE_PRECISIONS = {"auto": "amp", "float16": "fp16", "bfloat16": "bf16"}


def autocast_dtype(precision: str, device) -> torch.dtype | None:
    """The autocast dtype of `precision` on `device`; None runs without autocast."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if precision in ("fp32", "bf16-weights"):
        return None
    if precision == "amp":
        return torch.float16 if torch.device(device).type == "cuda" else torch.bfloat16
    return torch.bfloat16 if precision == "bf16" else torch.float16


def weights_dtype(precision: str) -> torch.dtype | None:
    """The dtype the model is cast to (`cast_for_inference`), None to keep fp32 weights."""
    return torch.bfloat16 if precision == "bf16-weights" else None


def autocast_in(device, dtype: torch.dtype | None):
    """Autocast to `dtype` on `device`, or nothing for None (fp32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def _cast_inputs(dtype: torch.dtype):
    def pre_hook(module, args, kwargs):
        def cast(value):
            return value.to(dtype) if isinstance(value, torch.Tensor) and value.is_floating_point() else value
        return tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}
    return pre_hook


def cast_for_inference(model: torch.nn.Module, dtype: torch.dtype | None) -> torch.nn.Module:
    """Cast `model` in place to `dtype` for inference in that precision (no autocast needed); returns it.

    Weights and buffers become `dtype`, except those of modules that set `keep_fp32 = True`
    (a method's few decision-making scalars, e.g. LTM's mask scale, LTMP's thresholds). A
    forward pre-hook casts floating inputs to `dtype`, so callers (`evaluate`, the benchmark)
    pass their fp32 images unchanged; logits come out in `dtype` (`evaluate` upcasts them).
    Token-selection scores are computed in float32 by the methods themselves
    (`models.token_ops.selection_precision`). None or float32: the model is left as it is.
    Calling it again with the same dtype is a no-op.
    """
    if dtype is None or dtype == torch.float32:
        return model
    if getattr(model, "_inference_dtype", None) == dtype:
        return model
    previous = getattr(model, "_inference_cast_hook", None)
    if previous is not None:
        previous.remove()
    model.to(dtype)
    for module in model.modules():
        if getattr(module, "keep_fp32", False):
            module.float()
    model._inference_cast_hook = model.register_forward_pre_hook(_cast_inputs(dtype), with_kwargs=True)
    model._inference_dtype = dtype
    return model
