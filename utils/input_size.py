"""Whether a model takes an input size whole: asked of the model itself, for every family.

A patch embedding is a convolution whose kernel equals its stride (timm's `PatchEmbed`,
Swin's 4x4 patches, a strided patchify stem); on a side that is not a multiple of the
stride it silently drops the last rows and columns (a 33-pixel image through 8-pixel
patches loses one row and one column). So the model runs once at the requested size with
a hook on every such convolution or pooling layer (kernel == stride > 1, no padding) and
reports each one whose input side does not divide. Layers that pad (overlapping
convolutions, Swin's windows and patch merging, MobileViT's unfolding) take any size and
are not reported; a model that refuses a size outright raises during the same forward.
"""
from __future__ import annotations

from typing import List, NamedTuple

import torch
from torch import nn

_PATCHIFY = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)


class DroppedPixels(NamedTuple):
    module: str          # qualified name in the model, e.g. "patch_embed.proj"
    stride: tuple        # (rows, cols)
    input_hw: tuple      # the size the layer received
    dropped: tuple       # rows, cols it ignores at the bottom / right

    def describe(self) -> str:
        return (f"{self.module} cuts {self.stride[0]}x{self.stride[1]} patches and drops the last "
                f"{self.dropped[0]} row(s) and {self.dropped[1]} column(s) of its {self.input_hw[0]}x"
                f"{self.input_hw[1]} input")


def _pair(value) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def _patchify_stride(module: nn.Module):
    """(rows, cols) stride of a non-overlapping, unpadded layer, else None."""
    if not isinstance(module, _PATCHIFY):
        return None
    kernel, stride = _pair(module.kernel_size), _pair(module.stride)
    padding = module.padding
    if isinstance(padding, str):
        if padding != "valid":
            return None
        padding = 0
    if any(_pair(padding)) or getattr(module, "ceil_mode", False):
        return None
    if kernel != stride or max(stride) <= 1:
        return None
    return stride


def dropped_pixels(model: nn.Module, size: int, device="cpu", in_chans: int = 3) -> List[DroppedPixels]:
    """Run `model` once on a zero image of `size` x `size`; return the layers that ignore pixels.

    The model is run in eval mode without gradients (its training flag is restored); exceptions
    of the forward (a size the model refuses) propagate to the caller.
    """
    found: List[DroppedPixels] = []
    handles = []
    for name, module in model.named_modules():
        stride = _patchify_stride(module)
        if stride is None:
            continue

        def hook(mod, args, name=name, stride=stride):
            x = args[0] if args else None
            if not isinstance(x, torch.Tensor) or x.dim() < 3:
                return
            hw = tuple(int(v) for v in x.shape[-2:])
            dropped = (hw[0] % stride[0], hw[1] % stride[1])
            if any(dropped):
                found.append(DroppedPixels(name, stride, hw, dropped))

        handles.append(module.register_forward_pre_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, in_chans, size, size, device=device))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return found


def nearest_sizes(size: int, found: List[DroppedPixels]) -> tuple:
    """(smaller, larger) sizes that divide the first offending layer, when its input is the
    image scaled by a whole factor (a patch embedding, or one after whole-factor downsampling)."""
    first = found[0]
    scale = size / first.input_hw[0]
    if scale != int(scale):
        return ()
    multiple = int(scale) * first.stride[0]
    lower, upper = size - size % multiple, size - size % multiple + multiple
    return tuple(v for v in (lower, upper) if v > 0)
