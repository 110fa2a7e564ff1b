"""Helpers for the unit tests of token-reduction models: a tiny timm ViT, the token count each block
leaves (forward hooks), forward_intermediates against the blocks' outputs, and the input shapes the
spatial layers of a hybrid backbone (MobileViT, EfficientViT) receive."""
import timm
import torch
from timm.models.mobilevit import MobileVitBlock
from torch import nn

TINY_VIT = dict(embed_dim=48, num_heads=3, num_classes=10)


def tiny_vit(name="deit_small_patch16_224", img_size=64, **kwargs):
    """timm model `name` at 48 dims, 3 heads, 10 classes (its own depth and patch size unless given), in eval mode."""
    return timm.create_model(name, img_size=img_size, **TINY_VIT, **kwargs).eval()


def recorded_inputs(net: nn.Module, modules, x: torch.Tensor, what=lambda tensor: tuple(tensor.shape)) -> list:
    """`what(first input)` of every call of `modules` (forward pre-hooks) during one no-grad forward of `net` on x."""
    seen = []
    handles = [m.register_forward_pre_hook(lambda m, args: seen.append(what(args[0]))) for m in modules]
    try:
        with torch.no_grad():
            net(x)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def spatial_input_shapes(net: nn.Module, x: torch.Tensor) -> list:
    """Input shapes of every convolution with a spatial kernel, every MobileViT block and every stage of a
    hybrid backbone in one forward: what must not change when tokens are merged inside its stages."""
    watched = [m for m in net.modules() if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1)]
    watched += [m for m in net.modules() if isinstance(m, MobileVitBlock)] + list(getattr(net, "stages", []))
    return recorded_inputs(net, watched, x)


def block_lengths(model: nn.Module, blocks=None):
    """(lengths, hook handles): `lengths` receives the token count each block (default `model.blocks`)
    outputs, from the next forward on."""
    lengths = []
    handles = [b.register_forward_hook(lambda m, i, o: lengths.append(o.shape[1]))
               for b in (model.blocks if blocks is None else blocks)]
    return lengths, handles


def run_lengths(model: nn.Module, x: torch.Tensor, blocks=None):
    """(output, tokens after each block) of one no-grad forward on x."""
    lengths, handles = block_lengths(model, blocks)
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        for handle in handles:
            handle.remove()
    return out, lengths


def check_intermediates(model: nn.Module, x: torch.Tensor, num_prefix: int = 1):
    """forward_intermediates(x, output_fmt='NLC') returns forward_features(x) and, per block, what forward
    hooks see the block output, without its `num_prefix` prefix tokens. Returns the intermediates."""
    outputs = []
    handles = [block.register_forward_hook(lambda module, args, out: outputs.append(out)) for block in model.blocks]
    try:
        with torch.no_grad():
            features = model.forward_features(x)
            outputs.clear()
            final, intermediates = model.forward_intermediates(x, output_fmt="NLC")
    finally:
        for handle in handles:
            handle.remove()
    torch.testing.assert_close(final, features)
    for y, out in zip(intermediates, outputs):
        torch.testing.assert_close(y, out[:, num_prefix:])
    return intermediates
