"""DWNet: (dynamic) depth-wise convolution in place of Swin's local window attention.

Paper: Q. Han, Z. Fan, Q. Dai, L. Sun, M.-M. Cheng, J. Liu, J. Wang, "On the Connection
between Local Attention and Dynamic Depth-wise Convolution", ICLR 2022 (arXiv 2106.04263).
Official code: github.com/Atten4Vis/DemystifyLocalViT. Docs: docs/methods/dwnet.md.

Changes relative to timm's Swin Transformer (whose PatchEmbed, Mlp, PatchMerging and
DropPath are reused as they are):
- the window-attention sub-block becomes a DW unit (1x1 conv-BN-ReLU, 7x7 depth-wise
  conv-BN-ReLU, 1x1 conv-BN) with no norm in front of it (its BNs play that role);
- the FFN's LayerNorm becomes a BatchNorm2d over the NCHW view of the tokens;
- PatchMerging sits at the end of stage i (`layers.i.downsample`, the official layout),
  not at the start of stage i + 1;
- no windows, no relative position bias: any input whose sides are multiples of 32 works.
Variants: `ddwnet_*` swap the static depth-wise conv for per-image kernels generated from
the globally pooled input (DynamicDWConv); `iddwnet_*` for per-position kernels shared by
groups of channels (IDynamicDWConv, a cupy kernel in the original, unfold + einsum here).
The official "iclr2022" commit silently builds the static conv for `dynamic=True`
(an if/if/else bug, docs/methods/dwnet.md); this module builds the intended dynamic model.
"""
from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, Mlp, PatchEmbed, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.swin_transformer import PatchMerging

from .errors import ModelConfigError

__all__ = ["DWNet", "DWUnit", "DynamicDWConv", "IDynamicDWConv", "SpatialBlock",
           "dynamic_depthwise_conv", "position_dynamic_depthwise_conv"]



def dynamic_depthwise_conv(x: torch.Tensor, kernels: torch.Tensor,
                           bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Depth-wise correlation of every sample with its own kernels, zero 'same' padding.

    x: (B, C, H, W); kernels: (B, C, k, k) with k odd; bias: (C,) shared by all samples.
    Returns (B, C, H, W). The batch is folded into the channel axis so that one grouped
    convolution with B*C groups does the work (each sample only ever meets its own kernels,
    so the result does not depend on the rest of the batch).
    """
    batch, channels, height, width = x.shape
    k = kernels.shape[-1]
    out = F.conv2d(
        x.reshape(1, batch * channels, height, width),
        kernels.reshape(batch * channels, 1, k, k),
        bias.repeat(batch) if bias is not None else None,
        padding=k // 2,
        groups=batch * channels,
    )
    return out.view(batch, channels, height, width)


def position_dynamic_depthwise_conv(x: torch.Tensor, kernels: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Per-position kernels shared by groups of consecutive channels, zero 'same' padding.

    x: (B, C, H, W); kernels: (B, G, k, k, H, W) with C divisible by G; kernel_size: k.
    out[b, c, y, x] = sum_{u,v} kernels[b, c // (C/G), u, v, y, x] * x[b, c, y+u-k//2, x+v-k//2].
    Returns (B, C, H, W). Written with unfold + einsum so it runs on any device and FLOP
    counters see the multiply-adds.
    """
    batch, channels, height, width = x.shape
    groups, k = kernels.shape[1], kernel_size  # a Python int, also under tracing (fvcore)
    patches = F.unfold(x, k, padding=k // 2)  # (B, C*k*k, H*W), channel slowest
    patches = patches.view(batch, groups, channels // groups, k * k, height * width)
    out = torch.einsum("bgcks,bgks->bgcs", patches, kernels.reshape(batch, groups, k * k, height * width))
    return out.reshape(batch, channels, height, width)


class DynamicDWConv(nn.Module):
    """Depth-wise conv whose kxk kernels are generated per image from its pooled features.

    Kernel of channel c is `conv2` output entries c*k*k ... (c+1)*k*k - 1 (row-major); the bias
    is a static parameter. The generator's BatchNorm sees one value per image, so training
    needs at least two images per batch.
    """

    def __init__(self, dim: int, kernel_size: int = 7, reduction: int = 4):
        super().__init__()
        self.dim = dim
        self.kernel_size = kernel_size
        self.conv1 = nn.Conv2d(dim, dim // reduction, 1, bias=False)
        self.bn = nn.BatchNorm2d(dim // reduction)
        self.conv2 = nn.Conv2d(dim // reduction, dim * kernel_size * kernel_size, 1)
        self.bias = nn.Parameter(torch.zeros(dim))

    def generate_kernels(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> per-image kernels (B, C, k, k)."""
        if self.training and x.shape[0] < 2:
            raise ModelConfigError(
                "dynamic DWNet needs at least 2 images per batch (per device) in training mode "
                "because its kernel generator uses BatchNorm across the batch; use a larger batch or model.eval()")
        pooled = x.mean(dim=(2, 3), keepdim=True)
        weights = self.conv2(F.relu(self.bn(self.conv1(pooled))))
        return weights.view(x.shape[0], self.dim, self.kernel_size, self.kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dynamic_depthwise_conv(x, self.generate_kernels(x), self.bias)

    def flops(self, num_tokens: int) -> float:
        """Multiply-adds per image, counted as the official `flops()` does."""
        c, kk = self.dim, self.kernel_size ** 2
        return num_tokens * c + c * c / 4 + c / 4 * c * kk + num_tokens * c * kk


class IDynamicDWConv(nn.Module):
    """Inhomogeneous dynamic conv: kxk kernels generated at every position, one per group of
    `group_channels` consecutive channels (G = dim / group_channels kernel groups), no bias."""

    def __init__(self, dim: int, kernel_size: int = 7, group_channels: int = 1, reduction: int = 4):
        super().__init__()
        if dim % group_channels:
            raise ModelConfigError(f"IDynamicDWConv: dim {dim} is not divisible by group_channels "
                             f"{group_channels}; choose inhomo_heads that divide the stage dims")
        self.dim = dim
        self.kernel_size = kernel_size
        self.groups = dim // group_channels
        self.conv1 = nn.Sequential(
            nn.Conv2d(dim, dim // reduction, 1), nn.BatchNorm2d(dim // reduction), nn.ReLU())
        self.conv2 = nn.Sequential(nn.Conv2d(dim // reduction, kernel_size ** 2 * self.groups, 1))

    def generate_kernels(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> per-position kernels (B, G, k, k, H, W)."""
        batch, _, height, width = x.shape
        k = self.kernel_size
        return self.conv2(self.conv1(x)).view(batch, self.groups, k, k, height, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return position_dynamic_depthwise_conv(x, self.generate_kernels(x), self.kernel_size)

    def flops(self, num_tokens: int) -> float:
        c, kk = self.dim, self.kernel_size ** 2
        return num_tokens * (c * c / 4 + c / 4 * kk * self.groups + c * kk)


class DWUnit(nn.Module):
    """conv0 (1x1) -> bn0 -> ReLU -> conv (kxk depth-wise, static or dynamic) -> bn -> ReLU
    -> conv2 (1x1) -> bn2, on NCHW maps (the official module is named `attn2conv`)."""

    def __init__(self, dim: int, kernel_size: int = 7, conv_type: str = "static", group_channels: int = 1):
        super().__init__()
        self.dim = dim
        self.kernel_size = kernel_size
        self.conv0 = nn.Conv2d(dim, dim, 1, bias=False)
        self.bn0 = nn.BatchNorm2d(dim)
        if conv_type == "static":
            self.conv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        elif conv_type == "dynamic":
            self.conv = DynamicDWConv(dim, kernel_size)
        elif conv_type == "inhomogeneous":
            self.conv = IDynamicDWConv(dim, kernel_size, group_channels)
        else:
            raise ModelConfigError(f"unknown conv_type {conv_type!r}; use 'static', 'dynamic' or 'inhomogeneous'")
        self.bn = nn.BatchNorm2d(dim)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(dim, dim, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn0(self.conv0(x)))
        x = self.relu(self.bn(self.conv(x)))
        return self.bn2(self.conv2(x))

    def flops(self, num_tokens: int) -> float:
        c = self.dim
        total = 2 * num_tokens * c * c + 8 * c * num_tokens  # two 1x1 convs, three BN (+ReLU)
        if isinstance(self.conv, nn.Conv2d):
            return total + num_tokens * c * self.kernel_size ** 2
        return total + self.conv.flops(num_tokens)


class SpatialBlock(nn.Module):
    """x + DropPath(DWUnit(x)), then x + DropPath(Mlp(BN(x))); tokens as NHWC (B, H, W, C).

    One DropPath module serves both residuals (independent masks per call), as in the original.
    """

    def __init__(self, dim: int, kernel_size: int = 7, mlp_ratio: float = 4.0, drop: float = 0.0,
                 drop_path: float = 0.0, conv_type: str = "static", group_channels: int = 1):
        super().__init__()
        self.dim = dim
        self.mlp_ratio = mlp_ratio
        self.attn2conv = DWUnit(dim, kernel_size, conv_type, group_channels)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop)
        self.bn = nn.BatchNorm2d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # NHWC permuted to NCHW is a channels-last view: convs and BNs run on it without a copy.
        x = x + self.drop_path(self.attn2conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))
        normed = self.bn(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return x + self.drop_path(self.mlp(normed))

    def flops(self, num_tokens: int) -> float:
        c = self.dim
        return 2 * c * num_tokens + self.attn2conv.flops(num_tokens) + 2 * num_tokens * c * c * self.mlp_ratio


class DWNetStage(nn.Module):
    """`depth` SpatialBlocks followed (except in the last stage) by PatchMerging."""

    def __init__(self, dim: int, depth: int, downsample: bool, drop_path: Sequence[float], **block_kwargs):
        super().__init__()
        self.dim = dim
        self.grad_checkpointing = False
        self.blocks = nn.ModuleList(
            [SpatialBlock(dim, drop_path=drop_path[i], **block_kwargs) for i in range(depth)])
        self.downsample = PatchMerging(dim) if downsample else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.downsample(x)

    def flops(self, height: int, width: int) -> float:
        total = sum(block.flops(height * width) for block in self.blocks)
        if isinstance(self.downsample, PatchMerging):
            c = self.dim
            total += height * width * c + (height // 2) * (width // 2) * 4 * c * 2 * c
        return total


def _check_inhomo_heads(inhomo_heads, num_stages: int) -> Tuple[int, ...]:
    if inhomo_heads is None or len(inhomo_heads) != num_stages:
        raise ModelConfigError(f"inhomogeneous DWNet needs inhomo_heads with one channels-per-group value per stage "
                         f"({num_stages}), got {inhomo_heads!r}; pass e.g. inhomo_heads=[3, 6, 12, 24]")
    return tuple(int(g) for g in inhomo_heads)


class DWNet(nn.Module):
    """Swin-style hierarchy of SpatialBlocks (see the module docstring).

    Args (beyond timm's usual num_classes / in_chans / drop_rate / drop_path_rate):
        img_size: nominal input size (pretrained cfg and `flops()`); other multiples of 32 run too.
        window_size: depth-wise kernel size (the name keeps Swin's, as the official code does).
        dynamic: per-image dynamic kernels (DynamicDWConv).
        inhomogeneous: per-position kernels (IDynamicDWConv); needs `inhomo_heads`,
            the number of channels sharing one kernel in each stage.
    """

    def __init__(
            self,
            img_size: int = 224,
            patch_size: int = 4,
            in_chans: int = 3,
            num_classes: int = 1000,
            embed_dim: int = 96,
            depths: Sequence[int] = (2, 2, 6, 2),
            window_size: int = 7,
            mlp_ratio: float = 4.0,
            drop_rate: float = 0.0,
            drop_path_rate: float = 0.1,
            dynamic: bool = False,
            inhomogeneous: bool = False,
            inhomo_heads: Optional[Sequence[int]] = None,
            global_pool: str = "avg",
    ):
        super().__init__()
        if global_pool not in ("avg", ""):
            raise ModelConfigError(f"DWNet global_pool must be 'avg' or '', got {global_pool!r}")
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.img_size = img_size
        self.patch_size = patch_size
        self.num_layers = len(depths)
        self.embed_dim = embed_dim
        self.num_features = self.head_hidden_size = int(embed_dim * 2 ** (self.num_layers - 1))
        self.size_multiple = patch_size * 2 ** (self.num_layers - 1)
        conv_type = "inhomogeneous" if inhomogeneous else ("dynamic" if dynamic else "static")
        group_channels = (_check_inhomo_heads(inhomo_heads, self.num_layers) if inhomogeneous
                          else (1,) * self.num_layers)

        self.patch_embed = PatchEmbed(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
            norm_layer=nn.LayerNorm, output_fmt="NHWC", strict_img_size=False)
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        self.layers = nn.ModuleList()
        for i, depth in enumerate(depths):
            start = sum(depths[:i])
            self.layers.append(DWNetStage(
                embed_dim * 2 ** i, depth, downsample=i < self.num_layers - 1,
                drop_path=dpr[start:start + depth], kernel_size=window_size, mlp_ratio=mlp_ratio,
                drop=drop_rate, conv_type=conv_type, group_channels=group_channels[i]))
        self.norm = nn.LayerNorm(self.num_features)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module):
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self):
        return {"absolute_pos_embed"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        return dict(
            stem=r"^patch_embed",
            blocks=r"^layers\.(\d+)" if coarse else [
                (r"^layers\.(\d+).downsample", (0,)),
                (r"^layers\.(\d+)\.\w+\.(\d+)", None),
                (r"^norm", (99999,)),
            ])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        for stage in self.layers:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        if global_pool is not None:
            if global_pool not in ("avg", ""):
                raise ModelConfigError(f"DWNet global_pool must be 'avg' or '', got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def _check_input_size(self, height: int, width: int):
        if height % self.size_multiple or width % self.size_multiple:
            raise ModelConfigError(
                f"DWNet input {height}x{width} is not a multiple of {self.size_multiple} on each side; "
                f"resize or crop the images to a multiple of {self.size_multiple} (e.g. 224)")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> normalized token map (B, H/32, W/32, num_features), NHWC."""
        self._check_input_size(x.shape[-2], x.shape[-1])
        x = self.pos_drop(self.patch_embed(x))
        for stage in self.layers:
            x = stage(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=(1, 2))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def flops(self, img_size: Optional[int] = None) -> float:
        """Multiply-adds for one image, with the official model's own accounting
        (including its tail quirk of dividing the first grid by 16 rather than 64)."""
        size = img_size or self.img_size
        self._check_input_size(size, size)
        grid = size // self.patch_size
        in_chans = self.patch_embed.proj.in_channels
        total = grid * grid * self.embed_dim * in_chans * self.patch_size ** 2 + grid * grid * self.embed_dim
        for i, stage in enumerate(self.layers):
            side = grid // 2 ** i
            total += stage.flops(side, side)
        total += self.num_features * grid * grid // 2 ** self.num_layers
        return total + self.num_features * self.num_classes


def checkpoint_filter_fn(state_dict: dict, model: nn.Module) -> dict:
    """Official checkpoints keep the weights under 'model' (training checkpoints add
    optimizer/scheduler state); DDP-saved ones may carry a 'module.' prefix."""
    if "model" in state_dict and isinstance(state_dict["model"], dict):
        state_dict = state_dict["model"]
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state_dict.items()}


def _create_dwnet(variant: str, pretrained: bool = False, **kwargs) -> DWNet:
    return build_model_with_cfg(
        DWNet, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **kwargs)


def _cfg(**kwargs) -> dict:
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7),
        "crop_pct": 0.875, "interpolation": "bicubic", "fixed_input_size": False,
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj", "classifier": "head", **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "dwnet_tiny_patch4_window7_224": _cfg(),
    "dwnet_base_patch4_window7_224": _cfg(),
    "ddwnet_tiny_patch4_window7_224": _cfg(),
    "ddwnet_base_patch4_window7_224": _cfg(),
    "dynamic_dwnet_tiny_patch4_window7_224": _cfg(),
    "dynamic_dwnet_base_patch4_window7_224": _cfg(),
    "iddwnet_tiny_patch4_window7_224": _cfg(),
    "iddwnet_base_patch4_window7_224": _cfg(),
})

_TINY = dict(embed_dim=96, depths=(2, 2, 6, 2), window_size=7)
_BASE = dict(embed_dim=128, depths=(2, 2, 18, 2), window_size=7)


@register_model
def dwnet_tiny_patch4_window7_224(pretrained: bool = False, **kwargs) -> DWNet:
    model_args = dict(_TINY)
    return _create_dwnet("dwnet_tiny_patch4_window7_224", pretrained, **dict(model_args, **kwargs))


@register_model
def dwnet_base_patch4_window7_224(pretrained: bool = False, **kwargs) -> DWNet:
    model_args = dict(_BASE)
    return _create_dwnet("dwnet_base_patch4_window7_224", pretrained, **dict(model_args, **kwargs))


@register_model
def ddwnet_tiny_patch4_window7_224(pretrained: bool = False, **kwargs) -> DWNet:
    model_args = dict(_TINY, dynamic=True)
    return _create_dwnet("ddwnet_tiny_patch4_window7_224", pretrained, **dict(model_args, **kwargs))


@register_model
def ddwnet_base_patch4_window7_224(pretrained: bool = False, **kwargs) -> DWNet:
    model_args = dict(_BASE, dynamic=True)
    return _create_dwnet("ddwnet_base_patch4_window7_224", pretrained, **dict(model_args, **kwargs))


@register_model
def dynamic_dwnet_tiny_patch4_window7_224(pretrained: bool = False, **kwargs) -> DWNet:
    model_args = dict(_TINY, dynamic=True)  # the official repository's name for ddwnet_tiny
    return _create_dwnet("dynamic_dwnet_tiny_patch4_window7_224", pretrained, **dict(model_args, **kwargs))


@register_model
def dynamic_dwnet_base_patch4_window7_224(pretrained: bool = False, **kwargs) -> DWNet:
    model_args = dict(_BASE, dynamic=True)  # the official repository's name for ddwnet_base
    return _create_dwnet("dynamic_dwnet_base_patch4_window7_224", pretrained, **dict(model_args, **kwargs))


@register_model
def iddwnet_tiny_patch4_window7_224(pretrained: bool = False, **kwargs) -> DWNet:
    model_args = dict(_TINY, dynamic=True, inhomogeneous=True, inhomo_heads=(3, 6, 12, 24))
    return _create_dwnet("iddwnet_tiny_patch4_window7_224", pretrained, **dict(model_args, **kwargs))


@register_model
def iddwnet_base_patch4_window7_224(pretrained: bool = False, **kwargs) -> DWNet:
    model_args = dict(_BASE, dynamic=True, inhomogeneous=True, inhomo_heads=(4, 8, 16, 32))
    return _create_dwnet("iddwnet_base_patch4_window7_224", pretrained, **dict(model_args, **kwargs))


# ---------------------------------------------------------------------------
# Method family: no method flags (timm's kwargs suffice)
# ---------------------------------------------------------------------------

from . import family as _family  # noqa: E402

FAMILY = _family.register_family(_family.MethodFamily(
    name="dwnet",
    title="DWNet",
    owns=_family.models_of(__name__),
    examples=_family.examples_per_model(
        ("dwnet_tiny_patch4_window7_224", "dwnet_base_patch4_window7_224", "ddwnet_tiny_patch4_window7_224",
         "ddwnet_base_patch4_window7_224", "iddwnet_tiny_patch4_window7_224", "iddwnet_base_patch4_window7_224",
         "dynamic_dwnet_tiny_patch4_window7_224", "dynamic_dwnet_base_patch4_window7_224"),
        kwargs=lambda name: dict(depths=(1, 1, 1, 1), embed_dim=16,
                                 **({"inhomo_heads": (4, 4, 4, 4)} if name.startswith("iddwnet") else {})),
        input_size=64, invalid=dict(global_pool="max")),
))
