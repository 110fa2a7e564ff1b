"""Attention shrink with lambda dilution.

Paper: "MLP Can Be A Good Transformer Learner" (Lin et al., CVPR 2024), official code
`sihaoevery/lambda_vit`. Docs: `docs/methods/shrink.md`.

Built on timm's `VisionTransformer` (DeiT). What changes relative to it:

* `LambdaBlock` (training models `*_copy_lambda`, `deit_base_patch16_224_attn`): the
  attention residual of a block can be "diluted" towards the identity,
  `h = (2 - lam) * x + lam * attn(x)`, then the unchanged MLP residual. Blocks listed in
  `prune_layer` use the lambda set with `model.set_lambda(v)` (1.0 until set; never from
  an `epoch` argument of `forward`), blocks in `done_layer` use 0, all others are plain
  timm blocks (lambda 1, same code path).
* `ShrinkBlock` (deployed models `*_shrink`): a block whose attention reached lambda 0,
  `h = 2 * x` then the MLP residual; it owns no `norm1`/`attn` weights.
* Drop-path: linear 0 -> rate for the `*_copy_lambda` family (timm 0.3.2 copy, where
  `drop_rate` is the token/block dropout), constant rate on every block for
  `deit_base_patch16_224_attn` and the `*_shrink` models (DeiT-III `vit_models`, where
  `drop_rate` is a dropout before the head).
* `frozen_stages=k >= 0` freezes patch embedding, cls token, position embedding and
  blocks 0..k (`requires_grad=False`).

State-dict keys are timm's, so official checkpoints load with strict=True: 152 keys for
the lambda models, 152 - 6 * len(done_layer) for the deployed ones.
"""
from __future__ import annotations

import ast
import logging
import numbers
from functools import partial
from typing import Iterable, Optional

import torch
from torch import nn

from timm.layers import DropPath, LayerNorm, LayerScale, Mlp
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import Block, VisionTransformer

from . import family
from .deit_cfgs import deit_cfg
from .errors import ModelConfigError
from .hooks import MethodHooks

_logger = logging.getLogger(__name__)

__all__ = [
    "LambdaBlock",
    "ShrinkBlock",
    "LambdaVisionTransformer",
    "ShrinkVisionTransformer",
    "lambda_at_epoch",
    "attention_keys",
    "remove_attention_keys",
    "shrink_checkpoint_filter_fn",
    "FAMILY",
]


# The official forward hard-codes this denominator, independent of --epochs.
OFFICIAL_LAMBDA_DECAY_EPOCHS = 299

# Block roles of the dilution models (prune wins over done, as in the official forward).
PLAIN, PRUNE, DONE = "plain", "prune", "done"


def lambda_at_epoch(epoch: int, decay_epochs: int = OFFICIAL_LAMBDA_DECAY_EPOCHS) -> float:
    """Official per-epoch schedule: 1 for epoch <= 0, then max(0, 1 - epoch / decay_epochs)."""
    if epoch <= 0:
        return 1.0
    return max(0.0, 1.0 - epoch / decay_epochs)


def attention_keys(block_index: int) -> tuple[str, ...]:
    """The 6 state-dict keys a block loses when its attention is removed."""
    prefix = f"blocks.{block_index}."
    return tuple(prefix + name for name in (
        "norm1.weight", "norm1.bias",
        "attn.qkv.weight", "attn.qkv.bias",
        "attn.proj.weight", "attn.proj.bias",
    ))


def remove_attention_keys(state_dict: dict, blocks: Iterable[int]) -> tuple[dict, list[str]]:
    """Drop the attention keys of `blocks`; returns (new state dict, dropped keys in order).

    Raises ValueError naming the first missing key, so a half-converted or mismatched
    checkpoint is never silently accepted.
    """
    dropped = [key for i in sorted(set(blocks)) for key in attention_keys(i)]
    missing = [key for key in dropped if key not in state_dict]
    if missing:
        raise ValueError(
            f"checkpoint has no key {missing[0]!r} ({len(missing)} attention keys missing); "
            "check that the removed block list matches the checkpoint")
    dropped_set = set(dropped)
    return {k: v for k, v in state_dict.items() if k not in dropped_set}, dropped


def _parse_block_list(name: str, value, depth: int) -> tuple[int, ...]:
    """Validate a block index list (list/tuple of ints, or its Python-literal string)."""
    if value is None:
        return ()
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value) if value.strip() else []
        except (ValueError, SyntaxError):
            raise ModelConfigError(f"{name}={value!r} is not a Python list; pass block indices such as [0,2,4]") from None
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple, set, frozenset)):
        raise ModelConfigError(f"{name} must be a list of block indices, got {type(value).__name__}; pass e.g. [0,2,4]")
    indices = []
    for item in value:
        if isinstance(item, bool) or not isinstance(item, numbers.Integral):
            raise ModelConfigError(f"{name} entry {item!r} is not an integer; pass block indices such as [0,2,4]")
        if not 0 <= item < depth:
            raise ModelConfigError(f"{name} index {item} is outside the {depth} blocks; use indices 0..{depth - 1}")
        indices.append(int(item))
    return tuple(sorted(set(indices)))


def _parse_frozen_stages(value, depth: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not -1 <= value < depth:
        raise ModelConfigError(
            f"frozen_stages={value!r} is invalid; use -1 (nothing frozen) or a block index 0..{depth - 1}")
    return int(value)


def _translate_dropout(kwargs: dict, block_dropout: bool) -> dict:
    """Map `drop_rate` to the place the official family applies it.

    timm 0.3.2-copy family: dropout after the position embedding, in the attention
    projection and in the MLP; timm's `drop_rate` (head dropout) is then 0. DeiT-III
    `vit_models` family: `drop_rate` is the dropout before the head, timm's meaning.
    """
    kwargs = dict(kwargs)
    if block_dropout:
        rate = kwargs.pop("drop_rate", 0.0)
        kwargs.setdefault("pos_drop_rate", rate)
        kwargs.setdefault("proj_drop_rate", rate)
    return kwargs


def _freeze_stages(model: VisionTransformer, frozen_stages: int) -> None:
    if frozen_stages < 0:
        return
    frozen = [model.patch_embed, *model.blocks[: frozen_stages + 1]]
    for param in (model.cls_token, model.pos_embed, *(p for m in frozen for p in m.parameters())):
        param.requires_grad_(False)


class LambdaBlock(Block):
    """timm `Block` whose attention residual is diluted by lambda (docs/methods/shrink.md).

    Modifications relative to timm's Block:
    * `role` ("plain", "prune", "done") decides the lambda: 1, the scheduled value set
      through `set_lambda`, or 0.
    * forward: `h = (2 - lam) * x + lam * drop_path1(ls1(attn(norm1(x))))` with lam a Python
      float, then the standard MLP residual. lam == 1 runs timm's own forward; lam == 0
      skips the attention (its contribution is exactly 0 for finite values), which is why
      these models need DDP's find_unused_parameters.
    """

    has_attention = True

    def __init__(self, *args, role: str = PLAIN, **kwargs):
        super().__init__(*args, **kwargs)
        if role not in (PLAIN, PRUNE, DONE):
            raise ValueError(f"LambdaBlock role {role!r} is unknown; use 'plain', 'prune' or 'done'")
        self.role = role
        self.scheduled_lambda = 1.0

    def set_lambda(self, value: float) -> None:
        self.scheduled_lambda = float(value)

    def attention_weight(self) -> float:
        """The lambda this block uses now."""
        if self.role == PRUNE:
            return self.scheduled_lambda
        if self.role == DONE:
            return 0.0
        return 1.0

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False) -> torch.Tensor:
        lam = self.attention_weight()
        if lam == 1.0:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        if lam == 0.0:
            h = 2.0 * x
        else:
            attn = self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)))
            h = (2.0 - lam) * x + lam * attn
        return h + self.drop_path2(self.ls2(self.mlp(self.norm2(h))))

    def extra_repr(self) -> str:
        return f"role={self.role}"


class ShrinkBlock(nn.Module):
    """Deployed block without attention: `h = 2 * x; y = h + drop_path2(ls2(mlp(norm2(h))))`.

    The factor 2 stays a literal multiplication: LayerNorm's eps makes `norm2(2x)` differ
    from `norm2(x)`, so it cannot be folded into weights. Keeps timm's names for the MLP
    half (`norm2`, `mlp`, `ls2`, `drop_path2`) and has no `norm1`/`attn`. The attention
    arguments of timm's Block are accepted so it can be passed as `block_fn`, and ignored.
    """

    has_attention = False

    def __init__(
            self,
            dim: int,
            num_heads: Optional[int] = None,
            mlp_ratio: float = 4.0,
            qkv_bias: bool = False,
            qk_norm: bool = False,
            scale_attn_norm: bool = False,
            scale_mlp_norm: bool = False,
            proj_bias: bool = True,
            proj_drop: float = 0.0,
            attn_drop: float = 0.0,
            init_values: Optional[float] = None,
            drop_path: float = 0.0,
            act_layer: type[nn.Module] = nn.GELU,
            norm_layer: type[nn.Module] = LayerNorm,
            mlp_layer: type[nn.Module] = Mlp,
            attn_layer=None,
            depth: int = 0,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = mlp_layer(
            in_features=dim,
            hidden_features=int(dim * mlp_ratio),
            act_layer=act_layer,
            norm_layer=norm_layer if scale_mlp_norm else None,
            bias=proj_bias,
            drop=proj_drop,
            **dd,
        )
        self.ls2 = LayerScale(dim, init_values=init_values, **dd) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False) -> torch.Tensor:
        h = 2 * x
        return h + self.drop_path2(self.ls2(self.mlp(self.norm2(h))))


def _lambda_block_fn(*, depth: int, prune_layer: tuple, done_layer: tuple,
                     constant_drop_path: Optional[float], **block_kwargs) -> LambdaBlock:
    """`block_fn` for timm's VisionTransformer: picks the block role from its index."""
    role = PRUNE if depth in prune_layer else DONE if depth in done_layer else PLAIN
    if constant_drop_path is not None:
        block_kwargs["drop_path"] = constant_drop_path
    return LambdaBlock(depth=depth, role=role, **block_kwargs)


def _deployed_block_fn(*, depth: int, done_layer: tuple,
                       constant_drop_path: Optional[float], **block_kwargs) -> nn.Module:
    """`block_fn` for timm's VisionTransformer: ShrinkBlock for removed blocks, else timm's Block."""
    if constant_drop_path is not None:
        block_kwargs["drop_path"] = constant_drop_path
    block_cls = ShrinkBlock if depth in done_layer else Block
    return block_cls(depth=depth, **block_kwargs)


class LambdaVisionTransformer(VisionTransformer):
    """DeiT whose `prune_layer` blocks are diluted by a scheduled lambda, `done_layer` at 0.

    Lambda lives in the prune blocks (a Python float, not in the state dict) and is set only
    through `set_lambda` (the trainer's `LambdaScheduleHooks` does it each epoch, honouring
    `--lambda-decay-epochs`); `forward` is timm's and never changes it. The official forward's
    `epoch` argument (lambda from a hard-coded 299-epoch schedule) is deliberately absent.
    """

    def __init__(
            self,
            prune_layer: Iterable[int] = (),
            done_layer: Iterable[int] = (),
            frozen_stages: int = -1,
            constant_drop_path: bool = False,
            block_dropout: bool = True,
            **kwargs,
    ) -> None:
        depth = kwargs.get("depth", 12)
        prune = _parse_block_list("prune_layer", prune_layer, depth)
        done = _parse_block_list("done_layer", done_layer, depth)
        both = sorted(set(prune) & set(done))
        if both:
            raise ModelConfigError(
                f"block {both[0]} is in both prune_layer and done_layer; list each block in one of them only")
        frozen = _parse_frozen_stages(frozen_stages, depth)
        kwargs = _translate_dropout(kwargs, block_dropout)
        block_fn = partial(
            _lambda_block_fn, prune_layer=prune, done_layer=done,
            constant_drop_path=kwargs.get("drop_path_rate", 0.0) if constant_drop_path else None)
        super().__init__(block_fn=block_fn, **kwargs)
        self.prune_layer = prune
        self.done_layer = done
        self.frozen_stages = frozen
        # Blocks at lambda 0 skip their attention, so DDP must tolerate unused parameters.
        self.ddp_find_unused_parameters = bool(prune or done)
        _freeze_stages(self, frozen)

    def _prune_blocks(self) -> list[LambdaBlock]:
        return [self.blocks[i] for i in self.prune_layer]

    def set_lambda(self, value: float) -> None:
        """Set lambda of the `prune_layer` blocks (done blocks stay at 0, others at 1)."""
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value <= 1.0:
            raise ValueError(f"lambda must be a number in [0, 1], got {value!r}")
        for block in self._prune_blocks():
            block.set_lambda(float(value))

    @property
    def lambda_value(self) -> float:
        """Lambda of the prune blocks; 0.0 when there is no prune block (nothing left to dilute)."""
        blocks = self._prune_blocks()
        return blocks[0].scheduled_lambda if blocks else 0.0


class ShrinkVisionTransformer(VisionTransformer):
    """Deployed attention-shrunk DeiT: `done_layer` blocks are `ShrinkBlock`s, the rest timm Blocks."""

    def __init__(
            self,
            done_layer: Iterable[int] = (),
            prune_layer: Iterable[int] = (),
            frozen_stages: int = -1,
            constant_drop_path: bool = True,
            block_dropout: bool = False,
            **kwargs,
    ) -> None:
        depth = kwargs.get("depth", 12)
        done = _parse_block_list("done_layer", done_layer, depth)
        ignored = _parse_block_list("prune_layer", prune_layer, depth)
        if ignored:
            _logger.warning(
                "prune_layer=%s is ignored by the deployed shrink model; it only removes done_layer=%s",
                list(ignored), list(done))
        frozen = _parse_frozen_stages(frozen_stages, depth)
        kwargs = _translate_dropout(kwargs, block_dropout)
        block_fn = partial(
            _deployed_block_fn, done_layer=done,
            constant_drop_path=kwargs.get("drop_path_rate", 0.0) if constant_drop_path else None)
        super().__init__(block_fn=block_fn, **kwargs)
        self.done_layer = done
        self.frozen_stages = frozen
        _freeze_stages(self, frozen)


def shrink_checkpoint_filter_fn(state_dict: dict, model: nn.Module) -> dict:
    """Unwrap `model`/`net` checkpoints and drop attention keys of blocks the model lacks."""
    for wrapper_key in ("model", "net"):
        if wrapper_key in state_dict and isinstance(state_dict[wrapper_key], dict):
            state_dict = state_dict[wrapper_key]
            break
    removed = [i for i, block in enumerate(model.blocks) if not getattr(block, "has_attention", True)]
    present = [i for i in removed if attention_keys(i)[0] in state_dict]
    state_dict, _ = remove_attention_keys(state_dict, present)
    return state_dict


class LambdaScheduleHooks(MethodHooks):
    """Per-epoch lambda schedule, the lambda-0 rule for `best_checkpoint.pth`, evaluation at the
    last epoch's lambda (as lambda_vit evaluates), and lambda in progress lines."""

    def __init__(self, decay_epochs: int = OFFICIAL_LAMBDA_DECAY_EPOCHS, epochs: int = 1):
        super().__init__()
        self.decay_epochs = decay_epochs
        self.epochs = epochs

    def prepare_eval(self, model: nn.Module) -> None:
        # lambda_vit evaluates at epoch = epochs - 1 (lambda 0 for the dilution models).
        self.on_epoch_start(model, self.epochs - 1)

    def log_state(self, model: nn.Module) -> dict:
        lambda_model = _lambda_model(model)
        return {f"lambda_b{i}": lambda_model.blocks[i].attention_weight() for i in lambda_model.prune_layer}

    def ddp_find_unused_parameters(self, model: nn.Module) -> bool:
        return _unused_parameters(model)

    def on_epoch_start(self, model: nn.Module, epoch: int) -> None:
        _lambda_model(model).set_lambda(lambda_at_epoch(epoch, self.decay_epochs))

    def best_checkpoint_allowed(self, model: nn.Module) -> bool:
        # Official README bug: "best" was picked at lambda > 0, i.e. not the deployable network.
        return all(block.attention_weight() == 0.0 for block in _lambda_model(model)._prune_blocks())

    def checkpoint_state(self, model: nn.Module) -> dict:
        model = _lambda_model(model)
        return {"lambda": model.lambda_value, "prune_layer": list(model.prune_layer),
                "done_layer": list(model.done_layer)}


def _lambda_model(model: nn.Module) -> Optional[LambdaVisionTransformer]:
    """The LambdaVisionTransformer inside DDP / EMA wrappers (`.module`), or None."""
    while not isinstance(model, LambdaVisionTransformer) and isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model if isinstance(model, LambdaVisionTransformer) else None


def _create_lambda(variant: str, pretrained: bool = False, **kwargs) -> LambdaVisionTransformer:
    return build_model_with_cfg(
        LambdaVisionTransformer, variant, pretrained,
        pretrained_filter_fn=shrink_checkpoint_filter_fn,
        feature_cfg=dict(out_indices=3, feature_cls="getter"),
        **kwargs,
    )


def _create_shrink(variant: str, pretrained: bool = False, **kwargs) -> ShrinkVisionTransformer:
    return build_model_with_cfg(
        ShrinkVisionTransformer, variant, pretrained,
        pretrained_filter_fn=shrink_checkpoint_filter_fn,
        feature_cfg=dict(out_indices=3, feature_cls="getter"),
        **kwargs,
    )


def _cfg(url: str = "", **kwargs) -> dict:
    return deit_cfg(url=url, **kwargs)


# The lambda models start from DeiT v1 weights (all 12 blocks keep their attention there).
default_cfgs = generate_default_cfgs({
    "deit_tiny_patch16_224_copy_lambda": _cfg(
        url="https://dl.fbaipublicfiles.com/deit/deit_tiny_patch16_224-a1311bcf.pth"),
    "deit_small_patch16_224_copy_lambda": _cfg(
        url="https://dl.fbaipublicfiles.com/deit/deit_small_patch16_224-cd65a155.pth"),
    "deit_base_patch16_224_copy_lambda": _cfg(
        url="https://dl.fbaipublicfiles.com/deit/deit_base_patch16_224-b5f2ef4d.pth"),
    "deit_base_patch16_224_attn": _cfg(
        url="https://dl.fbaipublicfiles.com/deit/deit_base_patch16_224-b5f2ef4d.pth"),
    "deit_tiny_patch16_224_shrink": _cfg(),
    "deit_small_patch16_224_shrink": _cfg(),
    "deit_base_patch16_224_shrink": _cfg(),
})

# timm 0.3.2-copy family: linear drop-path, drop_rate inside the blocks.
_COPY = dict(patch_size=16, depth=12, mlp_ratio=4, qkv_bias=True, constant_drop_path=False, block_dropout=True)
# DeiT-III vit_models family: constant drop-path, drop_rate before the head.
_VIT_MODELS = dict(patch_size=16, depth=12, mlp_ratio=4, qkv_bias=True, constant_drop_path=True, block_dropout=False)


@register_model
def deit_tiny_patch16_224_copy_lambda(pretrained: bool = False, **kwargs) -> LambdaVisionTransformer:
    model_args = dict(_COPY, embed_dim=192, num_heads=3)
    return _create_lambda("deit_tiny_patch16_224_copy_lambda", pretrained, **dict(model_args, **kwargs))


@register_model
def deit_small_patch16_224_copy_lambda(pretrained: bool = False, **kwargs) -> LambdaVisionTransformer:
    model_args = dict(_COPY, embed_dim=384, num_heads=6)
    return _create_lambda("deit_small_patch16_224_copy_lambda", pretrained, **dict(model_args, **kwargs))


@register_model
def deit_base_patch16_224_copy_lambda(pretrained: bool = False, **kwargs) -> LambdaVisionTransformer:
    model_args = dict(_COPY, embed_dim=768, num_heads=12)
    return _create_lambda("deit_base_patch16_224_copy_lambda", pretrained, **dict(model_args, **kwargs))


@register_model
def deit_base_patch16_224_attn(pretrained: bool = False, **kwargs) -> LambdaVisionTransformer:
    model_args = dict(_VIT_MODELS, embed_dim=768, num_heads=12)
    return _create_lambda("deit_base_patch16_224_attn", pretrained, **dict(model_args, **kwargs))


@register_model
def deit_tiny_patch16_224_shrink(pretrained: bool = False, **kwargs) -> ShrinkVisionTransformer:
    model_args = dict(_VIT_MODELS, embed_dim=192, num_heads=3)
    return _create_shrink("deit_tiny_patch16_224_shrink", pretrained, **dict(model_args, **kwargs))


@register_model
def deit_small_patch16_224_shrink(pretrained: bool = False, **kwargs) -> ShrinkVisionTransformer:
    model_args = dict(_VIT_MODELS, embed_dim=384, num_heads=6)
    return _create_shrink("deit_small_patch16_224_shrink", pretrained, **dict(model_args, **kwargs))


@register_model
def deit_base_patch16_224_shrink(pretrained: bool = False, **kwargs) -> ShrinkVisionTransformer:
    model_args = dict(_VIT_MODELS, embed_dim=768, num_heads=12)
    return _create_shrink("deit_base_patch16_224_shrink", pretrained, **dict(model_args, **kwargs))


# ---------------------------------------------------------------------------
# Method family: flags, hooks and evaluation state the trainer discovers
# ---------------------------------------------------------------------------

def _unused_parameters(model: nn.Module) -> bool:
    # blocks without attention leave their attention parameters (if any) without gradients
    return bool(getattr(model, "ddp_find_unused_parameters", False))


class DeployedShrinkHooks(MethodHooks):
    def ddp_find_unused_parameters(self, model: nn.Module) -> bool:
        return _unused_parameters(model)


def _family_hooks(model: nn.Module, options) -> MethodHooks:
    if _lambda_model(model) is None:
        return DeployedShrinkHooks()
    if options.lambda_decay_epochs <= 0:
        raise family.ModelConfigError(f"--lambda-decay-epochs={options.lambda_decay_epochs} must be positive "
                                      f"(official value {OFFICIAL_LAMBDA_DECAY_EPOCHS})")
    return LambdaScheduleHooks(options.lambda_decay_epochs, int(options.epochs or 1))


FAMILY = family.register_family(family.MethodFamily(
    name="shrink",
    title="attention shrink (lambda dilution and deployed models)",
    owns=family.models_of(__name__),
    flags=(
        family.Flag("--prune_layer", type=family.literal("int_list"), kwarg="prune_layer", metavar="BLOCKS",
                    help='blocks being diluted, e.g. "[0,2,4,6]" (model default: none)'),
        family.Flag("--done_layer", type=family.literal("int_list"), kwarg="done_layer", metavar="BLOCKS",
                    help='blocks already without attention, e.g. "[0,2]" (model default: none)'),
        family.Flag("--frozen_stages", type=int, kwarg="frozen_stages", metavar="N",
                    help="freeze the patch embedding and the first N blocks (model default: none)"),
        family.Flag("--lambda-decay-epochs", type=int, default=OFFICIAL_LAMBDA_DECAY_EPOCHS,
                    help="lambda = max(0, 1 - epoch / N) (official hard-coded 299)"),
    ),
    hooks=_family_hooks,
    checkpoint_filter_fn=shrink_checkpoint_filter_fn,
    examples=tuple(
        family.Example(name, model=name, kwargs=dict(depth=2, embed_dim=32, num_heads=2, patch_size=8),
                       flags=("--prune_layer", "[0]", "--done_layer", "[1]"), invalid=dict(prune_layer=[99]), compile=("eval", "train") if name == "deit_tiny_patch16_224_copy_lambda" else ())
        for name in ("deit_tiny_patch16_224_copy_lambda", "deit_small_patch16_224_copy_lambda",
                     "deit_base_patch16_224_copy_lambda", "deit_base_patch16_224_attn")
    ) + tuple(
        family.Example(name, model=name, kwargs=dict(depth=2, embed_dim=32, num_heads=2, patch_size=8),
                       flags=("--done_layer", "[0]"), invalid=dict(done_layer=[99]), compile=("eval", "train") if name == "deit_tiny_patch16_224_shrink" else ())
        for name in ("deit_tiny_patch16_224_shrink", "deit_small_patch16_224_shrink", "deit_base_patch16_224_shrink")
    ),
))
