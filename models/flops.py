"""FLOP (multiply-accumulate) counting with named counters, and tokens per block.

The efficient-ViT papers this project reproduces (DeiT, EViT, ToMe, DWNet, RaftMLP,
LTM) quote "FLOPs" that are multiply-accumulates: fvcore counts one fused multiply-add
as one flop. This module therefore reports **GMACs** (and `gflops = 2 * gmacs` for
readers who count a multiply and an add separately), always naming the counter.

Counters
--------
* ``fvcore`` (primary): ``fvcore.nn.FlopCountAnalysis`` plus handles this project adds:
  - fused attention: ``aten::scaled_dot_product_attention`` and its
    ``aten::_scaled_dot_product_*`` kernels count ``q @ k^T`` and ``attn @ v``,
    ``B * H * Nq * Nk * (Dqk + Dv)`` MACs. Without this handle fvcore silently skips
    attention (DeiT-S reads 4.25 instead of 4.6 GMACs, because timm 1.0 uses SDPA).
  - token-reduction ops (topk, sort, argsort, gather, index_select, scatter,
    scatter_add, scatter_reduce, index_add, ...): **0 MACs**. They select, move or
    accumulate without multiplying; fvcore already counts other element-wise work
    (residual adds, softmax, GELU) as 0, so an indexed add is treated the same way.
    Registering them as zero keeps them out of the "skipped ops" list, which is then
    left with genuinely uncounted work only.
  fvcore's own norm convention is kept (LayerNorm / GroupNorm with affine: 5 per
  element; inference BatchNorm: 2 per element).
* ``torchprofile``: ``torchprofile.profile_macs`` (its 0.1 release handles SDPA). It
  counts element-wise ``mul`` and norms as one MAC per element, so it reads slightly
  differently from fvcore; ``count_flops(counter="both")`` reports both and flags a
  disagreement above 2 %.
"""
from __future__ import annotations

import re
import warnings
from math import prod
from typing import Any, Iterable

import torch
from torch import nn

COUNTERS = ("fvcore", "torchprofile", "both")
DISAGREEMENT_TOLERANCE = 0.02

SDPA_OPS = (
    "aten::scaled_dot_product_attention",
    "aten::_scaled_dot_product_attention_math",
    "aten::_scaled_dot_product_flash_attention",
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_efficient_attention",
    "aten::_scaled_dot_product_cudnn_attention",
    "aten::_scaled_dot_product_fused_attention_overrideable",
)

# Selection / data movement / indexed accumulation: counted as 0 MACs (module docstring).
TOKEN_REDUCTION_OPS = (
    "aten::topk",
    "aten::sort",
    "aten::argsort",
    "aten::argmax",
    "aten::gather",
    "aten::index_select",
    "aten::take_along_dim",
    "aten::scatter",
    "aten::scatter_",
    "aten::scatter_add",
    "aten::scatter_add_",
    "aten::scatter_reduce",
    "aten::scatter_reduce_",
    "aten::index_add",
    "aten::index_add_",
)

_BLOCK_NAME = re.compile(r"(?:^|\.)blocks\.\d+$")


def attention_macs(q_shape: Iterable[int], k_shape: Iterable[int], v_shape: Iterable[int]) -> int:
    """MACs of softmax(q k^T) v for q `[..., Nq, D]`, k `[..., Nk, D]`, v `[..., Nk, Dv]`.

    The batch/head dims are taken from q (grouped-query attention repeats k/v heads).
    """
    q_shape, k_shape, v_shape = list(q_shape), list(k_shape), list(v_shape)
    *batch_dims, n_q, d_qk = q_shape
    n_k = k_shape[-2]
    d_v = v_shape[-1]
    return prod(batch_dims) * n_q * n_k * (d_qk + d_v)


def _fvcore_sdpa_handle(inputs: list, outputs: list) -> int:
    from fvcore.nn.jit_handles import get_shape

    return attention_macs(get_shape(inputs[0]), get_shape(inputs[1]), get_shape(inputs[2]))


def _fvcore_cdist_handle(inputs: list, outputs: list) -> int:
    """`torch.cdist(a [..., P, D], b [..., R, D])`: one multiply-accumulate per coordinate of every
    pair, P * R * D per batch (the clustering methods' distances; fvcore skips it otherwise)."""
    from fvcore.nn.jit_handles import get_shape

    a, b = get_shape(inputs[0]), get_shape(inputs[1])
    return prod(a[:-1]) * b[-2] * a[-1]


def _example_input(model: nn.Module, img_size, batch_size: int) -> torch.Tensor:
    height, width = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    in_chans = getattr(model, "in_chans", None)
    if in_chans is None:
        in_chans = getattr(model, "pretrained_cfg", {}).get("input_size", (3,))[0]
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    return torch.randn(batch_size, in_chans, height, width, device=device)


def fvcore_macs(model: nn.Module, example: torch.Tensor) -> tuple[int, list[str]]:
    from fvcore.nn import FlopCountAnalysis

    analysis = FlopCountAnalysis(model, example)
    analysis.set_op_handle(**{op: _fvcore_sdpa_handle for op in SDPA_OPS})
    analysis.set_op_handle(**{"aten::cdist": _fvcore_cdist_handle, "aten::_cdist_forward": _fvcore_cdist_handle})
    analysis.set_op_handle(**{op: None for op in TOKEN_REDUCTION_OPS})
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
    total = analysis.total()
    skipped = sorted(analysis.unsupported_ops())
    return int(total), skipped


def _torchprofile_macs(model: nn.Module, example: torch.Tensor) -> tuple[int, list[str]]:
    from torchprofile import profile_macs

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        total = profile_macs(model, example)
    prefix = 'No handlers found: "'
    skipped = sorted({str(w.message)[len(prefix):].split('"')[0]
                      for w in caught if str(w.message).startswith(prefix)})
    return int(total), skipped


def relative_difference(a: float, b: float) -> float:
    """|a - b| relative to the larger of the two (0 when both are 0)."""
    largest = max(abs(a), abs(b))
    return abs(a - b) / largest if largest else 0.0


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_flops(model: nn.Module, img_size, counter: str = "fvcore", batch_size: int = 1) -> dict:
    """Forward MACs per image of `model` in eval mode on a random `img_size` input.

    Returns `gmacs` (the primary counter's value: fvcore unless only torchprofile was
    asked for), `gflops` (= 2 * gmacs), `counter`, `gmacs_fvcore` / `gmacs_torchprofile`
    (None when not run), the ops each counter skipped, `params`, and for
    `counter="both"` the relative difference and `counters_disagree` (> 2 %).
    A counter that fails to trace the model records its error instead of a value.
    """
    if counter not in COUNTERS:
        raise ValueError(f"unknown FLOP counter {counter!r}; use one of {', '.join(COUNTERS)}")
    was_training = model.training
    model.eval()
    example = _example_input(model, img_size, batch_size)
    wanted = ("fvcore", "torchprofile") if counter == "both" else (counter,)
    runners = {"fvcore": fvcore_macs, "torchprofile": _torchprofile_macs}
    result: dict[str, Any] = {"counter": counter, "batch_size": batch_size,
                              "params": count_parameters(model)}
    try:
        for name in ("fvcore", "torchprofile"):
            result[f"gmacs_{name}"] = None
            if name not in wanted:
                continue
            try:
                with warnings.catch_warnings():
                    # fvcore scripts a helper with torch.jit.script (deprecated in recent torch); harmless
                    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=FutureWarning)
                    macs, skipped = runners[name](model, example)
            except Exception as error:  # a counter's tracer failing must not hide the other
                result[f"error_{name}"] = f"{type(error).__name__}: {error}".splitlines()[0]
                continue
            result[f"gmacs_{name}"] = macs / batch_size / 1e9
            result[f"skipped_ops_{name}"] = skipped
    finally:
        model.train(was_training)

    primary = next((n for n in wanted if result[f"gmacs_{n}"] is not None), None)
    if primary is None:
        errors = "; ".join(result[f"error_{n}"] for n in wanted)
        raise RuntimeError(f"no FLOP counter could trace the model: {errors}")
    result["counter"] = primary
    result["counters_run"] = list(wanted)
    result["gmacs"] = result[f"gmacs_{primary}"]
    result["gflops"] = 2 * result["gmacs"]
    if result["gmacs_fvcore"] is not None and result["gmacs_torchprofile"] is not None:
        diff = relative_difference(result["gmacs_fvcore"], result["gmacs_torchprofile"])
        result["counters_rel_diff"] = diff
        result["counters_disagree"] = diff > DISAGREEMENT_TOLERANCE
    else:
        result["counters_rel_diff"] = None
        result["counters_disagree"] = None
    return result


def _token_count(output: Any) -> int | None:
    """Tokens in a block's output: [B, N, C] -> N; NCHW / NHWC maps -> H * W."""
    if not isinstance(output, torch.Tensor):
        return None
    if output.dim() == 3:
        return output.shape[1]
    if output.dim() == 4:
        # Square grids are the rule: NCHW when the last two dims match, else NHWC (Swin).
        _, d1, d2, d3 = output.shape
        return d2 * d3 if d2 == d3 or d1 != d2 else d1 * d2
    return None


@torch.no_grad()
def tokens_per_block(model: nn.Module, img_size) -> list[int]:
    """Tokens leaving each `blocks.i` module (in call order) for one image in eval mode.

    Plain forward hooks on every module whose name ends in `blocks.<i>` (ViT `blocks.3`,
    Swin `layers.0.blocks.1`); every model of this project calls its blocks through
    `__call__` with timm's `Tensor -> Tensor` signature, so each hook fires once per call.
    Empty for models without such modules.
    """
    counts: list[int] = []

    def record(module, inputs, output):
        count = _token_count(output)
        if count is not None:
            counts.append(int(count))

    handles = [module.register_forward_hook(record)
               for name, module in model.named_modules() if _BLOCK_NAME.search(name)]
    if not handles:
        return []
    was_training = model.training
    model.eval()
    try:
        model(_example_input(model, img_size, 1))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return counts
