"""RaftMLP: raft token mixing (vertical, then horizontal) for MLP-Mixer.

Paper: Y. Tatsunami, M. Taki, "RaftMLP: How Much Can Be Done Without Attention and with Less
Spatial Locality?", ACCV 2022 (arXiv 2108.04384). Official code: github.com/okojoalg/raft-mlp.
Docs: docs/methods/raftmlp.md.

Changes relative to MLP-Mixer (timm's `MlpMixer` has no block with this layout, so the blocks
are written here; DropPath, LayerNorm2d and the pooling come from timm):
- the global token MLP is replaced by a vertical MLP then a horizontal MLP, each mixing one
  spatial axis jointly over a "raft" of r channels (channel j * C/r + k is member j of raft k);
- hierarchical models (S/M/L) use 4 levels, each opening with a cross-scale embedding (one
  linear map over patches of several sizes, computed here as a sum of strided convolutions);
- other input resolutions: the token-mixing MLPs always see the pretrained grid; every block
  resamples its tokens to that grid (bicubic) before the token mixing and back afterwards.
  Here that is stateless: the sizes are read from the tensors in `forward`.
Tokens travel as NHWC maps (B, h, w, C); levels hand NCHW maps to each other.
`original_tm` builds the paper's MLP-Mixer baseline with the same resampling rule.
Parameter-free modules keep the official child indices so checkpoints load strictly.
"""
import math
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, LayerNorm2d, SelectAdaptivePool2d
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from .errors import ModelConfigError

__all__ = ["RaftMLP", "RaftBlock", "MixerBlock", "CrossScaleEmbedding", "resample_tokens"]


TOKEN_MIXING_TYPES = ("ser_pm", "original_tm")
EMBEDDING_TYPES = ("emb_mixer", "emb_cross_mlp")
_LAYER_KEYS = ("depth", "dim", "patch_size", "raft_size", "embedding_kernels")


def resample_tokens(x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Bicubic (align_corners=False) resampling of an NHWC token map to `size`; a no-op
    (no interpolation at all) when the map already has that size."""
    if tuple(x.shape[1:3]) == tuple(size):
        return x
    x = F.interpolate(x.permute(0, 3, 1, 2), size=tuple(size), mode="bicubic", align_corners=False)
    return x.permute(0, 2, 3, 1)


def _mlp(dim: int, hidden: int, dropout: float) -> nn.Sequential:
    # Official child order (Linear at 0 and 3) is part of the checkpoint layout.
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout),
                         nn.Linear(hidden, dim), nn.Dropout(dropout))


class GridResample(nn.Module):
    """Parameter-free: resample an NHWC token map to a size given at call time."""

    def forward(self, x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
        return resample_tokens(x, size)


class RaftLayerNorm(nn.LayerNorm):
    """LayerNorm over all C channels whose affine parameters are stored in raft-major order:
    entry k * r + j belongs to channel j * (C / r) + k. Normalization statistics do not depend
    on channel order, so the stored parameters are permuted instead of the activations."""

    def __init__(self, dim: int, raft_size: int, eps: float = 1e-5):
        super().__init__(dim, eps=eps)
        self.raft_size = raft_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.raft_size
        weight = self.weight.view(-1, r).t().reshape(-1)
        bias = self.bias.view(-1, r).t().reshape(-1)
        return F.layer_norm(x, self.normalized_shape, weight, bias, self.eps)


class ChannelMixing(nn.Module):
    """x + DropPath(MLP(LayerNorm(x))) over channels of NHWC tokens."""

    def __init__(self, dim: int, expansion: int, dropout: float, drop_path: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fn = _mlp(dim, dim * expansion, dropout)
        self.drop = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop(self.fn(self.norm(x)))


class RaftTokenMixing(nn.Module):
    """Mixes one spatial axis of NHWC tokens jointly over rafts of r channels.

    For axis 1 (vertical), each (sample, raft k, column) gives a vector V of length r * G with
    V[j * G + y] = LN(x)[y, column, j * C/r + k]; MLP(V) is added back at the same places.
    Axis 2 (horizontal) does the same along rows.
    """

    def __init__(self, dim: int, grid: int, raft_size: int, axis: int, expansion: int,
                 dropout: float, drop_path: float):
        super().__init__()
        if axis not in (1, 2):
            raise ModelConfigError(f"RaftTokenMixing axis must be 1 (vertical) or 2 (horizontal), got {axis}")
        self.raft_size = raft_size
        self.axis = axis
        # Index 1 holds the norm, as in the official checkpoints (0 and 2 were rearranges).
        self.norm = nn.Sequential(nn.Identity(), RaftLayerNorm(dim, raft_size), nn.Identity())
        self.fn = _mlp(raft_size * grid, raft_size * grid * expansion, dropout)
        self.drop = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, dim = x.shape
        r = self.raft_size
        y = self.norm(x).view(batch, height, width, r, dim // r)
        if self.axis == 1:  # (B, k, w, j, h): mix over (j, h)
            y = y.permute(0, 4, 2, 3, 1).reshape(batch, dim // r, width, r * height)
            y = self.fn(y).view(batch, dim // r, width, r, height).permute(0, 4, 2, 3, 1)
        else:  # (B, k, h, j, w): mix over (j, w)
            y = y.permute(0, 4, 1, 3, 2).reshape(batch, dim // r, height, r * width)
            y = self.fn(y).view(batch, dim // r, height, r, width).permute(0, 2, 4, 3, 1)
        return x + self.drop(y.reshape(batch, height, width, dim))


class TokenMixing(nn.Module):
    """MLP-Mixer token mixing: for every channel, an MLP over all g * g tokens."""

    def __init__(self, dim: int, grid: int, expansion: int, dropout: float, drop_path: float):
        super().__init__()
        self.norm = nn.Sequential(nn.Identity(), nn.LayerNorm(dim), nn.Identity())
        self.fn = _mlp(grid * grid, grid * grid * expansion, dropout)
        self.drop = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, dim = x.shape
        y = self.norm(x).reshape(batch, height * width, dim).transpose(1, 2)
        y = self.fn(y).transpose(1, 2).reshape(batch, height, width, dim)
        return x + self.drop(y)


class RaftBlock(nn.Sequential):
    """0 resample to the pretrained grid, 1 vertical raft mixing, 2 (axis swap, implicit here),
    3 horizontal raft mixing, 4 resample back, 5 channel mixing. NHWC in and out."""

    def __init__(self, dim: int, grid: int, raft_size: int, token_expansion: int,
                 channel_expansion: int, dropout: float, drop_path: float):
        super().__init__(
            GridResample(),
            RaftTokenMixing(dim, grid, raft_size, 1, token_expansion, dropout, drop_path),
            nn.Identity(),
            RaftTokenMixing(dim, grid, raft_size, 2, token_expansion, dropout, drop_path),
            GridResample(),
            ChannelMixing(dim, channel_expansion, dropout, drop_path),
        )
        self.grid = grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = tuple(x.shape[1:3])
        x = self[0](x, (self.grid, self.grid))
        x = self[3](self[2](self[1](x)))
        return self[5](self[4](x, size))


class MixerBlock(nn.Sequential):
    """0 resample to the pretrained grid, 1 token mixing, 2 resample back, 3 channel mixing."""

    def __init__(self, dim: int, grid: int, token_expansion: int, channel_expansion: int,
                 dropout: float, drop_path: float):
        super().__init__(
            GridResample(),
            TokenMixing(dim, grid, token_expansion, dropout, drop_path),
            GridResample(),
            ChannelMixing(dim, channel_expansion, dropout, drop_path),
        )
        self.grid = grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = tuple(x.shape[1:3])
        x = self[1](self[0](x, (self.grid, self.grid)))
        return self[3](self[2](x, size))


class CrossScaleEmbedding(nn.Module):
    """Cross-scale MLP embedding: one Linear (`fc`) over the concatenated unfoldings of the
    input with kernels `kernels` (stride min(kernels), zero padding (k - s) / 2), features
    ordered (c_in, row, col) per kernel, kernels in list order.

    Equivalent and lighter than materializing the unfoldings: each kernel's slice of `fc` is a
    conv weight, so the embedding is a sum of strided convolutions. NCHW in, NHWC out.
    """

    def __init__(self, in_chans: int, dim: int, kernels: Sequence[int]):
        super().__init__()
        self.kernels = tuple(int(k) for k in kernels)
        self.stride = min(self.kernels)
        for k in self.kernels:
            if k % self.stride or (k - self.stride) % 2:
                raise ModelConfigError(f"embedding kernel {k} must be a multiple of the stride {self.stride} "
                                 f"with an even difference; fix embedding_kernels {list(self.kernels)}")
        self.in_chans = in_chans
        self.fc = nn.Linear(in_chans * sum(k * k for k in self.kernels), dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = self.fc.weight.split([self.in_chans * k * k for k in self.kernels], dim=1)
        out = None
        for k, w in zip(self.kernels, weights):
            y = F.conv2d(x, w.reshape(-1, self.in_chans, k, k), stride=self.stride,
                         padding=(k - self.stride) // 2)
            out = y if out is None else out + y
        return out.permute(0, 2, 3, 1) + self.fc.bias


class PatchFlatten(nn.Module):
    """Cut p x p patches; each becomes a vector ordered (row, col, channel), channel fastest.
    NCHW in, NHWC out (B, H/p, W/p, p * p * C)."""

    def __init__(self, patch_size: int):
        super().__init__()
        self.patch_size = patch_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, chans, height, width = x.shape
        p = self.patch_size
        x = x.reshape(batch, chans, height // p, p, width // p, p).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(batch, height // p, width // p, p * p * chans)


class ToChannelsFirst(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 3, 1, 2)


class RaftLevel(nn.Module):
    """Embedding (`fn.0`, `fn.1`), `depth` blocks (`fn.2` ...), then NHWC -> NCHW.

    An input whose sides are not multiples of the patch size is first resized (bicubic) to the
    next multiples, as the official code does.
    """

    def __init__(self, in_chans: int, dim: int, depth: int, grid: int, patch_size: int,
                 raft_size: Optional[int], embedding_kernels: Optional[Sequence[int]],
                 token_mixing_type: str, embedding_type: str, token_expansion: int,
                 channel_expansion: int, dropout: float, drop_path: float):
        super().__init__()
        self.patch_size = patch_size
        if embedding_type == "emb_cross_mlp":
            kernels = list(embedding_kernels or [patch_size])
            if kernels[0] != patch_size:
                raise ModelConfigError(f"the first embedding kernel ({kernels[0]}) must equal the patch size "
                                 f"({patch_size}); fix embedding_kernels")
            embedding, projection = CrossScaleEmbedding(in_chans, dim, kernels), nn.Identity()
        else:
            if patch_size == 1 and in_chans != dim:
                raise ModelConfigError(f"emb_mixer with patch_size 1 cannot map {in_chans} to {dim} channels "
                                 f"(the official model silently drops the projection); use patch_size > 1 "
                                 f"or emb_cross_mlp")
            embedding, projection = PatchFlatten(patch_size), nn.Linear(patch_size * patch_size * in_chans, dim)
        if token_mixing_type == "ser_pm":
            blocks = [RaftBlock(dim, grid, raft_size, token_expansion, channel_expansion, dropout, drop_path)
                      for _ in range(depth)]
        else:
            blocks = [MixerBlock(dim, grid, token_expansion, channel_expansion, dropout, drop_path)
                      for _ in range(depth)]
        self.fn = nn.Sequential(embedding, projection, *blocks, ToChannelsFirst())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        height, width = x.shape[-2:]
        if height % p or width % p:
            x = F.interpolate(x, size=(math.ceil(height / p) * p, math.ceil(width / p) * p),
                              mode="bicubic", align_corners=False)
        return self.fn(x)


def _pooled_head(dim: int, out_dim: Optional[int]) -> nn.Sequential:
    # LayerNorm at index 1 and the shortcut projection at index 4, as in the official heads;
    # indices 0 and 2 held NCHW <-> NHWC rearranges that LayerNorm2d makes unnecessary.
    modules = [nn.Identity(), LayerNorm2d(dim), nn.Identity(), SelectAdaptivePool2d(pool_type="avg", flatten=True)]
    if out_dim is not None:
        modules.append(nn.Linear(dim, out_dim))
    return nn.Sequential(*modules)


def _check_layers(layers, token_mixing_type: str, embedding_type: str) -> List[Dict]:
    if token_mixing_type not in TOKEN_MIXING_TYPES:
        raise ModelConfigError(f"token_mixing_type must be one of {TOKEN_MIXING_TYPES}, got {token_mixing_type!r}")
    if embedding_type not in EMBEDDING_TYPES:
        raise ModelConfigError(f"embedding_type must be one of {EMBEDDING_TYPES}, got {embedding_type!r}")
    if not layers:
        raise ModelConfigError("RaftMLP needs a non-empty `layers` list of dicts (depth, dim, patch_size, ...)")
    checked = []
    for i, layer in enumerate(layers):
        layer = dict(layer)
        unknown = set(layer) - set(_LAYER_KEYS)
        missing = {"depth", "dim", "patch_size"} - set(layer)
        if token_mixing_type == "ser_pm" and "raft_size" not in layer:
            missing.add("raft_size")
        if unknown or missing:
            raise ModelConfigError(f"layers[{i}] has unknown keys {sorted(unknown)} / lacks {sorted(missing)}; "
                             f"each layer needs depth, dim, patch_size (+ raft_size for ser_pm)")
        if layer["dim"] <= 0:
            raise ModelConfigError(f"layers[{i}] dim must be positive, got {layer['dim']}")
        if token_mixing_type == "ser_pm" and layer["dim"] % layer["raft_size"]:
            raise ModelConfigError(f"layers[{i}] dim {layer['dim']} is not divisible by raft_size {layer['raft_size']}")
        checked.append(layer)
    return checked


class RaftMLP(nn.Module):
    """RaftMLP and its MLP-Mixer baseline (see the module docstring).

    Args:
        layers: one dict per level: depth, dim, patch_size, raft_size (ser_pm),
            embedding_kernels (emb_cross_mlp; the first must equal patch_size).
        token_mixing_type: 'ser_pm' (raft mixing) or 'original_tm' (Mixer token MLP).
        embedding_type: 'emb_mixer' (patch flatten + Linear) or 'emb_cross_mlp'.
        shortcut: multi-level head (every level pooled, combined by affine gating).
        pretrained_image_size: resolution that fixes the token-mixing sizes.
        dropout / drop_rate: dropout inside every MLP; drop_path_rate: DropPath on every
            residual branch (same rate everywhere).
    """

    def __init__(
            self,
            layers: Sequence[Dict],
            in_chans: int = 3,
            pretrained_image_size: int = 224,
            num_classes: int = 1000,
            token_expansion_factor: int = 2,
            channel_expansion_factor: int = 4,
            dropout: float = 0.0,
            token_mixing_type: str = "ser_pm",
            embedding_type: str = "emb_mixer",
            shortcut: bool = False,
            drop_path_rate: float = 0.0,
            drop_rate: Optional[float] = None,
            in_channels: Optional[int] = None,
            global_pool: str = "avg",
    ):
        super().__init__()
        if global_pool != "avg":
            raise ModelConfigError(f"RaftMLP pools by averaging only; got global_pool={global_pool!r}")
        self.layers = _check_layers(layers, token_mixing_type, embedding_type)
        dropout = drop_rate if drop_rate is not None else dropout
        in_chans = in_channels if in_channels is not None else in_chans
        self.shortcut = shortcut
        self.num_classes = num_classes
        self.pretrained_image_size = pretrained_image_size
        self.num_features = self.head_hidden_size = self.layers[-1]["dim"]
        self.grids = []
        levels, heads = [], []
        size, chans = pretrained_image_size, in_chans
        for i, layer in enumerate(self.layers):
            grid = math.ceil(size / layer["patch_size"])
            self.grids.append(grid)
            levels.append(RaftLevel(
                chans, layer["dim"], layer["depth"], grid, layer["patch_size"], layer.get("raft_size"),
                layer.get("embedding_kernels"), token_mixing_type, embedding_type,
                token_expansion_factor, channel_expansion_factor, dropout, drop_path_rate))
            is_last = i == len(self.layers) - 1
            if shortcut or is_last:
                heads.append(_pooled_head(layer["dim"], None if is_last else 2 * self.num_features))
            size, chans = grid, layer["dim"]
        self.levels = nn.ModuleList(levels)
        self.heads = nn.ModuleList(heads)
        self.classifier = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    @torch.jit.ignore
    def no_weight_decay(self):
        return set()  # the official recipe decays every parameter

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        return dict(stem=r"^levels\.0\.fn\.[01]", blocks=r"^levels\.(\d+)" if coarse else r"^levels\.(\d+)\.fn\.(\d+)")

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.classifier

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        if global_pool not in (None, "avg"):
            raise ModelConfigError(f"RaftMLP pools by averaging only; got global_pool={global_pool!r}")
        self.num_classes = num_classes
        self.classifier = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> Union[torch.Tensor, List[torch.Tensor]]:
        """(B, C, H, W) -> the last level's NCHW map; with `shortcut`, the list of every level's map."""
        maps = []
        for level in self.levels:
            x = level(x)
            maps.append(x)
        return maps if self.shortcut else x

    def forward_head(self, x: Union[torch.Tensor, List[torch.Tensor]], pre_logits: bool = False) -> torch.Tensor:
        if self.shortcut:
            pooled = [head(m) for head, m in zip(self.heads, x)]
            out = pooled[-1]
            for gate in reversed(pooled[:-1]):
                out = gate[:, :self.num_features] * out + gate[:, self.num_features:]
        else:
            out = self.heads[0](x)
        return out if pre_logits else self.classifier(out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def checkpoint_filter_fn(state_dict: dict, model: nn.Module) -> dict:
    """Official (ignite) checkpoints are raw state dicts; also accept {'model': ...} and 'module.'."""
    if "model" in state_dict and isinstance(state_dict["model"], dict):
        state_dict = state_dict["model"]
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state_dict.items()}


def _create_raftmlp(variant: str, pretrained: bool = False, **kwargs) -> RaftMLP:
    return build_model_with_cfg(RaftMLP, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **kwargs)


def _cfg(**kwargs) -> dict:
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None,
        "crop_pct": 0.875, "interpolation": "bilinear", "fixed_input_size": False,
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "levels.0.fn.0.fc", "classifier": "classifier", **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "raftmlp_s": _cfg(),
    "raftmlp_m": _cfg(),
    "raftmlp_l": _cfg(),
    "raftmlp_org_mixer": _cfg(first_conv="levels.0.fn.1"),
})


def _hierarchy(dims: Sequence[int], depths: Sequence[int] = (2, 2, 6, 2)) -> List[Dict]:
    """The S/M/L level settings: patch 4 then 2, raft size 2, cross-scale kernels."""
    patches, kernels = (4, 2, 2, 2), ([4, 8], [2, 4], [2, 4], [2])
    return [dict(depth=d, dim=c, patch_size=p, raft_size=2, embedding_kernels=k)
            for d, c, p, k in zip(depths, dims, patches, kernels)]


@register_model
def raftmlp_s(pretrained: bool = False, **kwargs) -> RaftMLP:
    model_args = dict(layers=_hierarchy((64, 128, 256, 512)), embedding_type="emb_cross_mlp")
    return _create_raftmlp("raftmlp_s", pretrained, **dict(model_args, **kwargs))


@register_model
def raftmlp_m(pretrained: bool = False, **kwargs) -> RaftMLP:
    model_args = dict(layers=_hierarchy((96, 192, 384, 768)), embedding_type="emb_cross_mlp")
    return _create_raftmlp("raftmlp_m", pretrained, **dict(model_args, **kwargs))


@register_model
def raftmlp_l(pretrained: bool = False, **kwargs) -> RaftMLP:
    model_args = dict(layers=_hierarchy((128, 192, 512, 1024)), embedding_type="emb_cross_mlp")
    return _create_raftmlp("raftmlp_l", pretrained, **dict(model_args, **kwargs))


@register_model
def raftmlp_org_mixer(pretrained: bool = False, **kwargs) -> RaftMLP:
    model_args = dict(layers=[dict(depth=12, dim=768, patch_size=16)], token_mixing_type="original_tm")
    return _create_raftmlp("raftmlp_org_mixer", pretrained, **dict(model_args, **kwargs))


# ---------------------------------------------------------------------------
# Method family: no method flags (the classifier is `classifier`, one of the factory's head names;
# the constructor takes no img_size, so the factory never passes it)
# ---------------------------------------------------------------------------

from . import family as _family  # noqa: E402

FAMILY = _family.register_family(_family.MethodFamily(
    name="raftmlp",
    title="RaftMLP",
    owns=_family.models_of(__name__),
    examples=_family.examples_per_model(
        ("raftmlp_s", "raftmlp_m", "raftmlp_l", "raftmlp_org_mixer"),
        kwargs=lambda name: dict(layers=[dict(depth=1, dim=16, patch_size=8)] if name == "raftmlp_org_mixer" else
                                 [dict(depth=1, dim=16, patch_size=8, raft_size=2, embedding_kernels=[8])],
                                 pretrained_image_size=32),
        invalid=dict(token_mixing_type="no_such_mixing")),
))
