"""MCTF: "Multi-criteria Token Fusion with One-step-ahead Attention for Efficient Vision
Transformers" (Lee, Choi & Kim, CVPR 2024, arXiv 2403.10030); docs/methods/mctf.md.

An in-place, reversible patch for timm `VisionTransformer`s (DeiT, distilled DeiT, ViTs
with or without a class token, LayerScale, no qkv bias) and for the attention-shrink
models of `models/shrink.py`. The patch swaps the classes of the model and of its blocks
that have attention; it adds no parameter, so the state dict (and official checkpoints,
which are timm's DeiT layout) is untouched. `unpatch` restores the original classes.

Changes relative to timm's `Block`, in the blocks listed in `activate_layer` (default:
every block but the first) with `one_step_ahead=1` (the method):

* at the START of the block, `r_l` tokens (section "r per block" of the docs page) are
  fused away: the block's own attention map `A` is computed first (explicit q k^T, only
  the q and k thirds of `qkv`), then tokens are matched two ways between the even and odd
  positions by a score = similarity x informativeness x size, each with a temperature
  (`mctf_scores`, `mctf_matching`);
* the matched tokens are pooled (`pooling_type`: attention x size weights by default),
  sizes are summed, and `A` itself is fused (keys summed, queries pooled like the
  tokens), so the block's output is `A'' @ v'` with `v'` from the fused tokens;
* LayerScale (`ls1`, `ls2`), attention dropout and `q_norm`/`k_norm` are applied.

`one_step_ahead=2` fuses with `A` but recomputes the attention on the fused tokens;
`one_step_ahead=0` runs the block unchanged and fuses its output. Every block (activated
or not) uses proportional attention (`+ ln(size)` per key) once sizes exist, when
`prop_attn`. Blocks without attention (deployed shrink blocks, lambda 0) are never
activated and run unchanged on the fused tokens; a diluted block (0 < lambda < 1) fuses
first, then applies `(2 - lambda) x' + lambda * o`.

Training (`model.train()`): a student pass at `model.r` and, when `task_type` asks for it,
a teacher pass at a random `r_teacher` in `[0, r_teacher_max)` through the same blocks,
interleaved block by block as in the official loop; the forward then returns a dict with
`x_student`, `x_teacher` and `loss_consistency` (the token-reduction-consistency loss of
the cls feature). The loss of the official recipe is `MCTFCriterion`.

Deviations from the official code (each is a DESIGN CHOICE of the docs page): r is clamped
at 0 for small token counts (official: negative r crashes), a block with r_l = 0 computes
its attention once, qkv without bias is supported, a distillation token is protected as cls
is (official: wrong tokens), negative temperatures and non-integral r >= 1 are refused,
the teacher r is drawn only when the teacher pass runs, and a student-only training forward
returns the logits tensor.
"""
from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass, field
from numbers import Integral, Real
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import nn

from .deit_cfgs import deit_cfg
from .errors import ModelConfigError
from .mctf_ops import (  # noqa: F401  (re-exported: the kernels are part of this module's interface)
    MIN_TOKENS, MCTFMatch, RValue, block_reduction, fused_index, group_reduce, mctf_fuse, mctf_matching, mctf_merge,
    mctf_scores, normalize_r, token_counts)
from .token_ops import StateSlot, attention_with_keys, selection_precision

__all__ = [
    "patch", "unpatch", "is_patched", "mctf_type_kwargs", "normalize_r", "block_reduction", "token_counts",
    "MCTFMatch", "mctf_scores", "mctf_matching", "mctf_merge", "fused_index", "group_reduce", "mctf_fuse",
    "MCTFConfig", "MCTFState", "MCTFPass", "MCTFCriterion", "confidence_of_labels", "DEFAULT_MCTF_TYPE",
]

# The official main.py defaults (the MCTF-Fast setting): [r, r_teacher_max, trace_source,
# prop_attn, one_step_ahead, tau_sim, tau_info, tau_size, bidirection, pooling_type, unused].
DEFAULT_MCTF_TYPE = (0.35, 0.15, 0, 1, 1, 1, 20, 40, 1, 1, 0)
DEFAULT_ACTIVATE_LAYER = (3, 6, 9)
DEFAULT_TASK_TYPE = (1, 0, 0)


# ---------------------------------------------------------------------------
# Attention pieces (explicit matmuls, so the FLOP counter sees q k^T and A'' v)
# ---------------------------------------------------------------------------

def _queries_keys(attn: nn.Module, xn: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """q, k `[B, H, T, d]` from the q and k thirds of `qkv` only (v is computed after fusion)."""
    batch, tokens, _ = xn.shape
    dim = attn.attn_dim
    bias = attn.qkv.bias
    qk = F.linear(xn, attn.qkv.weight[:2 * dim], None if bias is None else bias[:2 * dim])
    qk = qk.reshape(batch, tokens, 2, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    return attn.q_norm(qk[0]), attn.k_norm(qk[1])


def _values(attn: nn.Module, xn: torch.Tensor) -> torch.Tensor:
    """v `[B, H, T, d]` from the v third of `qkv`."""
    batch, tokens, _ = xn.shape
    dim = attn.attn_dim
    bias = attn.qkv.bias
    v = F.linear(xn, attn.qkv.weight[2 * dim:], None if bias is None else bias[2 * dim:])
    return v.reshape(batch, tokens, attn.num_heads, attn.head_dim).permute(0, 2, 1, 3)


def _attention_map(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, size: Optional[torch.Tensor]) -> torch.Tensor:
    """`softmax((q k^T) * scale + ln(size_j))` `[B, H, T, T]` (the scale multiplies the product, as officially)."""
    logits = (q @ k.transpose(-2, -1)) * attn.scale
    if size is not None:
        logits = logits + size.log()[:, None, None, :, 0].to(logits.dtype)
    return logits.softmax(dim=-1)


def _attention_output(attn: nn.Module, probs: torch.Tensor, v: torch.Tensor, xn: torch.Tensor) -> torch.Tensor:
    """`proj(attn_drop(probs) @ v)` with timm's optional output norm and gate; -> `[B, T, C]`."""
    out = attn.attn_drop(probs) @ v
    batch, _, tokens, _ = out.shape
    out = attn.norm(out.transpose(1, 2).reshape(batch, tokens, attn.attn_dim))
    if getattr(attn, "gate", None) is not None:
        out = out * attn.gate(xn).sigmoid()
    return attn.proj_drop(attn.proj(out))


def _informativeness(probs: torch.Tensor) -> torch.Tensor:
    """Mean attention each token receives, over heads and all query rows: `[B, T]` float32."""
    with torch.no_grad(), selection_precision(probs):
        return probs.detach().float().mean(dim=[1, 2])


# ---------------------------------------------------------------------------
# Per-forward state and settings
# ---------------------------------------------------------------------------

@dataclass
class MCTFPass:
    """One pass (student or teacher) of a forward: its r, sizes, group map and token counts."""
    r: RValue
    float32_fraction: bool = False
    size: Optional[torch.Tensor] = None     # [B, T, 1] float32, None until the first fusion
    group: Optional[torch.Tensor] = None    # [B, T0] current token of each input token (trace_source)
    tokens: List[int] = field(default_factory=list)   # tokens leaving each block
    applied: List[int] = field(default_factory=list)  # r_l of each block (0: no fusion)


@dataclass
class MCTFState:
    """A forward's passes; `current` is the pass the blocks are running now."""
    current: MCTFPass
    student: Optional[MCTFPass] = None
    teacher: Optional[MCTFPass] = None


@dataclass
class MCTFConfig:
    """Settings shared by a patched model and its blocks; `slot.state` is set only during a forward."""
    r: RValue
    activate: frozenset
    prop_attn: bool
    one_step_ahead: int
    tau_sim: float
    tau_info: float
    tau_size: float
    bidirection: bool
    pooling_type: int
    trace_source: bool
    r_teacher_max: RValue
    task_type: Tuple[float, float, float]
    class_token: bool
    distill_token: bool
    slot: StateSlot = field(default_factory=StateSlot)  # the MCTFState of the forward in progress
    # the last forward's numbers, for log lines (plain attributes: no tensors kept)
    last_tokens: Optional[int] = None
    last_r_teacher: Optional[float] = None

    @property
    def protected(self) -> int:
        return int(self.class_token) + int(self.distill_token)


def _attention_weight(block: nn.Module) -> Optional[float]:
    """lambda of a diluted shrink block (models/shrink.py contract), None for an ordinary block."""
    weight = getattr(block, "attention_weight", None)
    return None if weight is None else float(weight())


# ---------------------------------------------------------------------------
# Patched block and model
# ---------------------------------------------------------------------------

class MCTFBlockMixin:
    """Placed before the block's own class; see the module docstring for what changes."""

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False) -> torch.Tensor:
        cfg: MCTFConfig = self._mctf_cfg
        state = cfg.slot.state
        if state is None or attn_mask is not None or is_causal:  # masks do not survive fusion: timm's block
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        lam = _attention_weight(self)
        if lam == 0.0:  # no attention at call time: the block runs unchanged on the fused tokens
            out = super().forward(x)
            state.current.tokens.append(out.shape[1])
            state.current.applied.append(0)
            return out
        current = state.current
        r_l = 0
        if self._mctf_index in cfg.activate:
            r_l = block_reduction(x.shape[1], current.r, cfg.protected, current.float32_fraction)
        if r_l == 0:
            out = self._mctf_plain(x, current.size if cfg.prop_attn else None, lam)
        elif cfg.one_step_ahead == 0:
            out = self._mctf_fuse_output(x, current, r_l, lam)
        else:
            out = self._mctf_fuse_input(x, current, r_l, lam)
        current.tokens.append(out.shape[1])
        current.applied.append(r_l)
        return out

    def _mctf_residual(self, x: torch.Tensor, attn_out: torch.Tensor, lam: Optional[float]) -> torch.Tensor:
        attn_out = self.drop_path1(self.ls1(attn_out))
        x = x + attn_out if lam is None else (2 - lam) * x + lam * attn_out
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))

    def _mctf_plain(self, x: torch.Tensor, size: Optional[torch.Tensor], lam: Optional[float]) -> torch.Tensor:
        """An ordinary block, with proportional attention once sizes exist."""
        if size is None:
            return super().forward(x)
        return self._mctf_residual(x, attention_with_keys(self.attn, self.norm1(x), size).out, lam)

    def _mctf_match(self, metric: torch.Tensor, info: torch.Tensor, current: MCTFPass, r_l: int) -> MCTFMatch:
        cfg: MCTFConfig = self._mctf_cfg
        match = mctf_matching(metric, info, current.size, r_l, cfg.class_token, cfg.distill_token,
                              cfg.tau_sim, cfg.tau_info, cfg.tau_size, cfg.bidirection)
        if cfg.trace_source and current is cfg.slot.state.student:
            index = fused_index(match, metric.shape[1])
            current.group = index if current.group is None else index.gather(1, current.group)
        return match

    def _mctf_fuse_input(self, x: torch.Tensor, current: MCTFPass, r_l: int, lam: Optional[float]) -> torch.Tensor:
        """one_step_ahead 1 (fuse x, sizes and this block's attention map, then A'' v') or 2
        (fuse x and sizes with this block's attention, then attend again on the fused tokens)."""
        cfg: MCTFConfig = self._mctf_cfg
        attn = self.attn
        precise = cfg.one_step_ahead == 2
        with torch.no_grad() if precise else contextlib.nullcontext():
            q, k = _queries_keys(attn, self.norm1(x))
            probs = _attention_map(attn, q, k, current.size if cfg.prop_attn else None)
        info = _informativeness(probs)
        match = self._mctf_match(x, info, current, r_l)
        x, current.size, fused = mctf_fuse(match, x, probs, info, current.size, cfg.pooling_type,
                                           fuse_attn=not precise)
        xn = self.norm1(x)
        if precise:
            attn_out = attention_with_keys(attn, xn, current.size if cfg.prop_attn else None).out
        else:
            attn_out = _attention_output(attn, fused, _values(attn, xn), xn)
        return self._mctf_residual(x, attn_out, lam)

    def _mctf_fuse_output(self, x: torch.Tensor, current: MCTFPass, r_l: int, lam: Optional[float]) -> torch.Tensor:
        """one_step_ahead 0: an ordinary block (explicit attention, kept for the scores), then its output is fused."""
        cfg: MCTFConfig = self._mctf_cfg
        attn = self.attn
        xn = self.norm1(x)
        q, k = _queries_keys(attn, xn)
        probs = _attention_map(attn, q, k, current.size if cfg.prop_attn else None)
        x = self._mctf_residual(x, _attention_output(attn, probs, _values(attn, xn), xn), lam)
        info = _informativeness(probs)
        match = self._mctf_match(x, info, current, r_l)
        x, current.size, _ = mctf_fuse(match, x, None, info, current.size, cfg.pooling_type, fuse_attn=False)
        return x


def _draw_teacher_r(r_max: RValue) -> Tuple[RValue, bool]:
    """The official teacher r: 0; `randint(0, int(100 r_max)) / 100` as float32 for a fraction;
    `randint(0, r_max)` otherwise (upper bound excluded), from torch's global generator."""
    if not r_max:
        return 0, False
    if r_max < 1:
        high = int(r_max * 100)
        if high < 1:
            return 0, False
        return float(torch.randint(0, high, size=(1,)) / 100), True
    return int(torch.randint(0, int(r_max), size=(1,))), False


class MCTFModelMixin:
    """Creates the per-forward state; runs the student/teacher passes in training."""

    @property
    def r(self) -> RValue:
        return self._mctf_cfg.r

    @r.setter
    def r(self, value: RValue) -> None:
        self._mctf_cfg.r = normalize_r(value)

    @property
    def r_teacher_max(self) -> RValue:
        return self._mctf_cfg.r_teacher_max

    @r_teacher_max.setter
    def r_teacher_max(self, value: RValue) -> None:
        self._mctf_cfg.r_teacher_max = normalize_r(value, "r_teacher_max")

    def _mctf_check_call(self) -> None:
        if self.training and getattr(self, "grad_checkpointing", False):
            raise ModelConfigError("MCTF cannot train with gradient checkpointing (blocks re-run after the forward); "
                                   "disable it.")

    def _mctf_finish(self, state: MCTFState) -> None:
        cfg: MCTFConfig = self._mctf_cfg
        student = state.student
        if student is not None and student.tokens:
            cfg.last_tokens = student.tokens[-1]
        if state.teacher is not None:
            cfg.last_r_teacher = float(state.teacher.r)
        if cfg.trace_source and student is not None:
            source = None
            if student.group is not None:
                tokens = student.tokens[-1] if student.tokens else int(student.group.max()) + 1
                source = F.one_hot(student.group, tokens).transpose(1, 2).float()
            self._mctf_info = {"source": source, "size": student.size, "group": student.group,
                               "tokens": list(student.tokens), "r_applied": list(student.applied)}

    def _mctf_run(self, fn, *args, r_eval: Optional[RValue] = None, **kwargs):
        cfg: MCTFConfig = self._mctf_cfg
        if cfg.slot.state is not None:  # nested call (forward -> forward_features)
            return fn(*args, **kwargs)
        self._mctf_check_call()
        r = cfg.r if r_eval is None or self.training else normalize_r(r_eval, "r_eval")
        student = MCTFPass(r)
        state = MCTFState(current=student, student=student)
        cfg.slot.state = state
        try:
            return fn(*args, **kwargs)
        finally:
            cfg.slot.state = None
            self._mctf_finish(state)

    def _mctf_two_pass(self, x: torch.Tensor):
        """Training with a teacher: both passes through each block in turn (teacher first), as officially."""
        cfg: MCTFConfig = self._mctf_cfg
        self._mctf_check_call()
        run_student = bool(cfg.task_type[0] or cfg.task_type[2])
        consistency = bool(cfg.task_type[2])
        teacher_r, float32_fraction = _draw_teacher_r(cfg.r_teacher_max)
        teacher = MCTFPass(teacher_r, float32_fraction)
        student = MCTFPass(cfg.r)
        state = MCTFState(current=teacher, student=student if run_student else None, teacher=teacher)
        cfg.slot.state = state
        result = {}
        try:
            x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))
            passes = {"teacher": teacher, **({"student": student} if run_student else {})}  # teacher first
            tokens = dict.fromkeys(passes, x)
            last = len(self.blocks) - 1
            for index, block in enumerate(self.blocks):
                for name, run in passes.items():
                    state.current = run
                    tokens[name] = block(tokens[name])
                    if index == last:
                        tokens[name] = self.norm(tokens[name])
                        result[f"x_{name}"] = self.forward_head(tokens[name])
            if consistency:
                diff = self._mctf_feature(tokens["teacher"]).detach() - self._mctf_feature(tokens["student"])
                result["loss_consistency"] = (diff ** 2).mean(dim=1)
        finally:
            cfg.slot.state = None
            self._mctf_finish(state)
        return result

    def _mctf_feature(self, z: torch.Tensor) -> torch.Tensor:
        """The final-norm feature the consistency loss compares: the cls row (pooled without cls)."""
        return z[:, 0] if self._mctf_cfg.class_token else self.pool(z)

    def forward(self, x: torch.Tensor, *args, r_eval: Optional[RValue] = None, **kwargs):
        cfg: MCTFConfig = self._mctf_cfg
        if self.training and cfg.slot.state is None and (cfg.task_type[1] or cfg.task_type[2]):
            if args or any(v is not None and v is not False for v in kwargs.values()):
                raise ModelConfigError("MCTF's teacher pass does not take attention masks; train without them.")
            return self._mctf_two_pass(x)
        return self._mctf_run(super().forward, x, *args, r_eval=r_eval, **kwargs)

    def forward_features(self, *args, **kwargs):
        return self._mctf_run(super().forward_features, *args, **kwargs)

    def forward_intermediates(self, *args, **kwargs):
        return self._mctf_run(super().forward_intermediates, *args, **kwargs)


# ---------------------------------------------------------------------------
# Patching
# ---------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _patched_class(mixin: type, base: type) -> type:
    return type(f"MCTF{base.__name__}", (mixin, base), {"_mctf_base_class": base})


def _swap(module: nn.Module, mixin: type, cfg: MCTFConfig) -> None:
    module.__class__ = _patched_class(mixin, type(module))
    module._mctf_cfg = cfg


def is_patched(model: nn.Module) -> bool:
    return isinstance(model, MCTFModelMixin)


def _has_attention(block: nn.Module) -> bool:
    return bool(getattr(block, "has_attention", True)) and getattr(block, "attn", None) is not None


_ATTENTION_NEEDS = ("qkv", "num_heads", "head_dim", "attn_dim", "scale", "q_norm", "k_norm", "norm", "proj",
                    "attn_drop", "proj_drop")
_BLOCK_NEEDS = ("norm1", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")


def _check_model(model: nn.Module) -> None:
    """A one-line ModelConfigError for the models MCTF does not support."""
    name = type(model).__name__
    for module in model.modules():
        other = [key for key in type(module).__dict__ if key.endswith("_base_class") and key != "_mctf_base_class"]
        if other:
            method = other[0][1:-len("_base_class")]
            raise ModelConfigError(f"MCTF cannot patch a model already patched by {method} ({name}); "
                                   f"unpatch it first (models.{method}.unpatch) or build a fresh model.")
        if hasattr(module, "mask_module"):
            raise ModelConfigError(f"MCTF does not support LTM models ({name}): their blocks merge tokens themselves.")
        if type(module).__module__.rsplit(".", 1)[-1] == "ltmp":
            raise ModelConfigError(f"MCTF does not support LTMP models ({name}): their blocks mask or merge tokens "
                                   "themselves.")
    blocks = getattr(model, "blocks", None)
    if blocks is None or not all(hasattr(model, a) for a in ("patch_embed", "_pos_embed", "norm", "forward_head")):
        raise ModelConfigError(f"MCTF patches timm VisionTransformers (DeiT, ViT, the shrink models); "
                               f"{name} is not one.")
    if any(hasattr(block, "forward_prune") for block in blocks):
        raise ModelConfigError(f"MCTF does not support EViT models ({name}): their blocks already drop tokens.")
    if getattr(model, "reg_token", None) is not None:
        raise ModelConfigError("MCTF does not support register tokens; use a ViT without reg_tokens.")
    for index, block in enumerate(blocks):
        if not _has_attention(block):
            continue
        missing = [a for a in _BLOCK_NEEDS if not hasattr(block, a)]
        missing += [f"attn.{a}" for a in _ATTENTION_NEEDS if not hasattr(block.attn, a)]
        if missing:
            raise ModelConfigError(f"MCTF needs timm's Block/Attention layout; blocks.{index} "
                                   f"({type(block).__name__}) lacks {', '.join(missing)}.")


def _check_choice(name: str, value, choices) -> int:
    if isinstance(value, bool) or not isinstance(value, Real) or value not in choices:
        raise ModelConfigError(f"MCTF {name} must be one of {', '.join(map(str, choices))}, got {value!r}.")
    return int(value)


def _check_temperature(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value < 0:
        raise ModelConfigError(f"MCTF {name} must be a number >= 0 (0 switches the criterion off), got {value!r}.")
    return float(value)


def _check_task_type(task_type) -> Tuple[float, float, float]:
    if isinstance(task_type, (str, bytes)) or not isinstance(task_type, Sequence) or len(task_type) < 3 or \
            any(isinstance(v, bool) or not isinstance(v, Real) or v < 0 for v in task_type):
        raise ModelConfigError(f"MCTF task_type must list [student, teacher, confidence threshold] (numbers >= 0, "
                               f"e.g. [1,1,0.4]), got {task_type!r}.")
    return float(task_type[0]), float(task_type[1]), float(task_type[2])


def _check_activate(activate_layer, depth: int) -> frozenset:
    if activate_layer is None:
        return frozenset(range(1, depth))
    if isinstance(activate_layer, Integral) and not isinstance(activate_layer, bool):
        activate_layer = [activate_layer]
    if isinstance(activate_layer, (str, bytes)) or not isinstance(activate_layer, (Sequence, set, frozenset)) or \
            any(isinstance(i, bool) or not isinstance(i, Integral) or i < 0 for i in activate_layer):
        raise ModelConfigError(f"MCTF activate_layer must list block indices >= 0 (e.g. [3,6,9]), "
                               f"got {activate_layer!r}.")
    return frozenset(int(i) for i in activate_layer)  # indices beyond the depth are ignored, as officially


def patch(model: nn.Module, r: RValue = 16, activate_layer: Optional[Sequence[int]] = None, prop_attn: bool = True,
          one_step_ahead: int = 1, tau_sim: float = 1.0, tau_info: float = 20.0, tau_size: float = 40.0,
          bidirection: bool = True, pooling_type: int = 1, trace_source: bool = False, r_teacher_max: RValue = 0,
          task_type: Sequence[float] = DEFAULT_TASK_TYPE) -> nn.Module:
    """Apply MCTF to `model` in place (re-patching replaces the settings); returns the model.

    r: tokens fused per activated block (int) or a fraction in (0, 1) of the unprotected
    tokens; activate_layer: block indices (None: every block but the first); the other
    arguments are the official `mctf_type` entries (`mctf_type_kwargs`) and `task_type`
    `[student, teacher, confidence threshold]` of the consistency fine-tuning.
    """
    if is_patched(model):
        unpatch(model)
    _check_model(model)
    blocks = list(model.blocks)
    cfg = MCTFConfig(
        r=normalize_r(r), activate=_check_activate(activate_layer, len(blocks)), prop_attn=bool(prop_attn),
        one_step_ahead=_check_choice("one_step_ahead", one_step_ahead, (0, 1, 2)),
        tau_sim=_check_temperature("tau_sim", tau_sim), tau_info=_check_temperature("tau_info", tau_info),
        tau_size=_check_temperature("tau_size", tau_size), bidirection=bool(bidirection),
        pooling_type=_check_choice("pooling_type", pooling_type, (0, 1, 2, 3)), trace_source=bool(trace_source),
        r_teacher_max=normalize_r(r_teacher_max, "r_teacher_max"), task_type=_check_task_type(task_type),
        class_token=getattr(model, "cls_token", None) is not None,
        distill_token=getattr(model, "dist_token", None) is not None,
    )
    for index, block in enumerate(blocks):
        if _has_attention(block):
            _swap(block, MCTFBlockMixin, cfg)
            block._mctf_index = index
    model.__class__ = _patched_class(MCTFModelMixin, type(model))
    model._mctf_cfg = cfg
    model._mctf_info = {"source": None, "size": None}
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo `patch`: original classes back, patch attributes removed. No-op if not patched."""
    for module in model.modules():
        base = type(module).__dict__.get("_mctf_base_class")
        if base is not None:
            module.__class__ = base
            for name in ("_mctf_cfg", "_mctf_info", "_mctf_index"):
                module.__dict__.pop(name, None)
    return model


def mctf_type_kwargs(mctf_type: Sequence) -> dict:
    """The official 11-entry `--mctf_type` list as `patch` kwargs.

    `[r, r_teacher_max, trace_source, prop_attn, one_step_ahead, tau_sim, tau_info, tau_size,
    bidirection, pooling_type, unused]`.
    """
    if isinstance(mctf_type, (str, bytes)) or not isinstance(mctf_type, Sequence) or len(mctf_type) < 10:
        raise ModelConfigError(f"--mctf_type must list 11 values [r, r_teacher_max, trace_source, prop_attn, "
                               f"one_step_ahead, tau_sim, tau_info, tau_size, bidirection, pooling_type, 0], "
                               f"e.g. [16,8,0,1,1,1,20,40,1,1,0]; got {mctf_type!r}.")
    values = list(mctf_type)
    return dict(r=values[0], r_teacher_max=values[1], trace_source=bool(values[2]), prop_attn=bool(values[3]),
                one_step_ahead=values[4], tau_sim=values[5], tau_info=values[6], tau_size=values[7],
                bidirection=bool(values[8]), pooling_type=values[9])


# ---------------------------------------------------------------------------
# Token-reduction-consistency fine-tuning loss
# ---------------------------------------------------------------------------

def confidence_of_labels(probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """`[B]` probability of the labels: `p[b, y_b]` for class indices; for mixed soft targets
    (timm Mixup/CutMix, which pair sample b with sample B-1-b) `p[b, y_b] + p[b, y_flip(b)]`,
    the official rule under mixup.

    The labels before mixing are not visible to a criterion, but `t + t.flip(0)` of timm's
    mixed targets is `s(y) + s(y_flip)` (s: the smoothed one-hot) whatever lambda, so
    `(t + t.flip(0) - 2 * off)` has mass `on - off` on each of the two labels (exact for
    timm's "batch" and "pair" modes; "elem" draws a lambda per sample and is approximate).
    """
    if targets.dim() == 1:
        return probs.gather(1, targets.long()[:, None])[:, 0]
    pair = targets + targets.flip(0)
    pair = pair - 2 * targets.amin(dim=1, keepdim=True) if targets.shape[1] > 2 else pair
    return (probs * pair).sum(dim=1) / (pair.sum(dim=1) / 2).clamp_min(1e-12)


class MCTFCriterion(nn.Module):
    """The official fine-tuning loss (engine.py), called as `criterion(samples, outputs, targets)`:

        L = w_s * base(x_student) [task_type[0]] + w_t * base(x_teacher) [task_type[1]]
          + w_c * sum_b m_b * loss_consistency_b / sum_b m_b   [task_type[2], when sum_b m_b > 0]

    with `m_b = 1[confidence_b > task_type[2]]`, the confidence computed from the student's
    softmax (`confidence_of_labels`). `base` is the run's criterion (label smoothing, soft
    targets, BCE, wrapped as the trainer wraps it). A tensor output (student-only training)
    counts as `x_student`. The last step's parts are kept (detached tensors) in `last` for log lines.
    """

    def __init__(self, base: nn.Module, task_type: Sequence[float], task_weight: Sequence[float]):
        super().__init__()
        self.base = base
        self.task_type = _check_task_type(task_type)
        if isinstance(task_weight, (str, bytes)) or not isinstance(task_weight, Sequence) or len(task_weight) < 3:
            raise ModelConfigError(f"MCTF task_weight must list 3 loss weights [student, teacher, consistency], "
                                   f"got {task_weight!r}.")
        self.task_weight = tuple(float(w) for w in task_weight[:3])
        self.last: dict = {}

    def forward(self, samples: torch.Tensor, outputs, targets: torch.Tensor) -> torch.Tensor:
        if isinstance(outputs, torch.Tensor):
            outputs = {"x_student": outputs}
        student_on, teacher_on, threshold = self.task_type
        w_student, w_teacher, w_consistency = self.task_weight
        parts = {}
        if student_on:
            parts["loss_student"] = self.base(samples, outputs["x_student"], targets) * w_student
        if teacher_on:
            parts["loss_teacher"] = self.base(samples, outputs["x_teacher"], targets) * w_teacher
        if threshold:
            with torch.no_grad():
                confidence = confidence_of_labels(outputs["x_student"].float().softmax(dim=-1), targets)
                passed = (confidence > threshold).float()
            # no sample passing adds 0, as the official `if confidence_pass.sum():` (without a host sync)
            parts["loss_consistency"] = ((outputs["loss_consistency"] * passed).sum() / passed.sum().clamp_min(1)
                                         * w_consistency)
        loss = sum(parts.values()) if parts else outputs["x_student"].sum() * 0
        self.last = {name: value.detach() for name, value in parts.items()}
        if threshold:
            self.last.update(confidence_score=confidence.mean(), confidence_pass=passed.mean())
        return loss


# ---------------------------------------------------------------------------
# The official model names: timm's DeiT with the official constructor kwargs
# ---------------------------------------------------------------------------

# The official `--pretrained` weights are DeiT's; the state dicts are identical.
default_cfgs = generate_default_cfgs({
    "deit_tiny.fb_in1k": deit_cfg("deit_tiny_patch16_224.fb_in1k"),
    "deit_small.fb_in1k": deit_cfg("deit_small_patch16_224.fb_in1k"),
    "deit_base.fb_in1k": deit_cfg("deit_base_patch16_224.fb_in1k"),
})


def _create_mctf_deit(variant: str, pretrained: bool = False, use_mctf: bool = False,
                      mctf_type: Optional[Sequence] = None, task_type: Optional[Sequence] = None,
                      activate_layer: Optional[Sequence[int]] = None, input_size: Optional[int] = None,
                      **kwargs) -> VisionTransformer:
    """timm's DeiT; with `use_mctf` patched in place from the official kwargs (defaults: the
    official main.py's, i.e. the MCTF-Fast setting). `input_size` is the official spelling of img_size."""
    if input_size is not None:
        kwargs.setdefault("img_size", input_size)
    model = build_model_with_cfg(VisionTransformer, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                 **kwargs)
    if use_mctf:
        patch(model, **mctf_type_kwargs(DEFAULT_MCTF_TYPE if mctf_type is None else mctf_type),
              activate_layer=list(DEFAULT_ACTIVATE_LAYER if activate_layer is None else activate_layer),
              task_type=DEFAULT_TASK_TYPE if task_type is None else task_type)
    return model


@register_model
def deit_tiny(pretrained: bool = False, **kwargs) -> VisionTransformer:
    model_args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3)
    return _create_mctf_deit("deit_tiny", pretrained, **dict(model_args, **kwargs))


@register_model
def deit_small(pretrained: bool = False, **kwargs) -> VisionTransformer:
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)
    return _create_mctf_deit("deit_small", pretrained, **dict(model_args, **kwargs))


@register_model
def deit_base(pretrained: bool = False, **kwargs) -> VisionTransformer:
    model_args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)
    return _create_mctf_deit("deit_base", pretrained, **dict(model_args, **kwargs))


# ---------------------------------------------------------------------------
# Method family: a patch applied after the weights load (any supported ViT), switched on by the
# official `--use_mctf True` or by `--mctf-r R`; official launch lines translated (translate_argv)
# ---------------------------------------------------------------------------

import argparse as _argparse  # noqa: E402
import ast as _ast  # noqa: E402
import logging as _logging  # noqa: E402
import re as _re  # noqa: E402

from . import family as _family  # noqa: E402
from .hooks import MethodHooks  # noqa: E402

_logger = _logging.getLogger(__name__)

_TRUE, _FALSE = ("true", "t", "yes", "y", "1"), ("false", "f", "no", "n", "0")


def _str2bool(text) -> bool:
    """argparse type of the official boolean-valued options (`--use_mctf True`)."""
    if isinstance(text, bool):
        return text
    value = str(text).strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise _argparse.ArgumentTypeError(f"{text!r} is not a boolean (True or False)")


def _number_list(text) -> list:
    """argparse type of the official list options: a Python literal list of numbers ("[16,8,0]")."""
    value = text
    if isinstance(text, str):
        try:
            value = _ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            raise _argparse.ArgumentTypeError(f"{text!r} is not a list of numbers such as [16,8,0]") from None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        raise _argparse.ArgumentTypeError(f"{text!r} is not a list of numbers such as [16,8,0]")
    return list(value)


def _r_flag(text):
    """argparse type of `--mctf-r`: tokens per block (int), a fraction in (0, 1), or 'auto'."""
    if isinstance(text, str) and text.strip().lower() == _family.AUTO:
        return _family.AUTO
    try:
        value = _ast.literal_eval(str(text).strip())
        return normalize_r(value, "--mctf-r")
    except (ValueError, SyntaxError, ModelConfigError) as err:
        raise _argparse.ArgumentTypeError(str(err) if isinstance(err, ModelConfigError) else
                                          f"{text!r} is not a token count, a fraction in (0, 1) or 'auto'") from None


def _family_active(options) -> bool:
    return bool(options.use_mctf) or options.mctf_r is not None


def _patch_kwargs(options) -> dict:
    kwargs = mctf_type_kwargs(options.mctf_type)
    if options.mctf_r is not None:
        kwargs["r"] = options.mctf_r
    kwargs.update(activate_layer=options.activate_layer, task_type=options.task_type)
    return kwargs


def _check_options(options) -> None:
    kwargs = _patch_kwargs(options)
    if kwargs["r"] != _family.AUTO:
        normalize_r(kwargs["r"], "r (--mctf_type[0] / --mctf-r)")
    normalize_r(kwargs["r_teacher_max"], "r_teacher_max (--mctf_type[1])")
    _check_choice("one_step_ahead (--mctf_type[4])", kwargs["one_step_ahead"], (0, 1, 2))
    for name, index in (("tau_sim", 5), ("tau_info", 6), ("tau_size", 7)):
        _check_temperature(f"{name} (--mctf_type[{index}])", kwargs[name])
    _check_choice("pooling_type (--mctf_type[9])", kwargs["pooling_type"], (0, 1, 2, 3))
    _check_activate(options.activate_layer, 0)
    _check_task_type(options.task_type)
    if len(options.task_weight) < 3:
        raise ModelConfigError(f"--task_weight must list 3 loss weights [student, teacher, consistency], "
                               f"got {options.task_weight!r}")
    for value in options.r_evals or ():
        normalize_r(value, "--r_evals entry")


def _family_patch(model: nn.Module, options) -> None:
    patch(model, **_patch_kwargs(options))


class MCTFHooks(MethodHooks):
    """The consistency fine-tuning loss and the method's state in log lines."""

    def __init__(self, model: Optional[nn.Module] = None, options=None):
        super().__init__(model, options)
        self.criterion: Optional[MCTFCriterion] = None

    def wrap_criterion(self, criterion: nn.Module, model: nn.Module) -> nn.Module:
        if getattr(criterion, "distillation_type", "none") != "none":
            raise ModelConfigError("MCTF training does not combine with DeiT distillation (each MCTF pass returns "
                                   "one logit tensor, no distillation head); drop --distillation-type")
        self.criterion = MCTFCriterion(criterion, self.options.task_type, self.options.task_weight)
        return self.criterion

    def log_state(self, model: nn.Module) -> dict:
        if not is_patched(model):
            return {}
        cfg: MCTFConfig = model._mctf_cfg
        state = {"mctf_r": float(cfg.r)}
        if cfg.last_tokens is not None:
            state["mctf_tokens"] = int(cfg.last_tokens)
        if cfg.last_r_teacher is not None:
            state["mctf_r_teacher"] = cfg.last_r_teacher
        if self.criterion is not None:
            state.update({name: float(value) for name, value in self.criterion.last.items()})
        return state


def _hooks(model: nn.Module, options) -> Optional[MCTFHooks]:
    return MCTFHooks(model, options) if is_patched(model) else None


def _search_r(build, target: float, gmacs_of) -> Tuple[int, float]:
    """--target-gmacs: the token count r (one value for every activated block) nearest the target."""
    model = build(0)
    tokens = model.patch_embed.num_patches + getattr(model, "num_prefix_tokens", 1)
    protected = model._mctf_cfg.protected if is_patched(model) else 1
    return _family.search_sequence(list(range((tokens - protected) // 2, -1, -1)), build, target, gmacs_of)


# --- official launch lines ------------------------------------------------------------------

# The official main.py's defaults where they change results and differ from this trainer's (DeiT's).
OFFICIAL_DEFAULTS = ("--mixup", "0", "--cutmix", "0", "--model-ema")
_BOOL_OPTIONS = {  # official str2bool option -> (flag for True, flag for False); None: dropped
    "--model-ema": ("--model-ema", "--no-model-ema"), "--model_ema": ("--model-ema", "--no-model-ema"),
    "--dist_eval": ("--dist-eval", None), "--dist-eval": ("--dist-eval", None),
    "--pin_mem": ("--pin-mem", "--no-pin-mem"), "--pin-mem": ("--pin-mem", "--no-pin-mem"),
    "--use_bce": ("--bce-loss", None), "--use-bce": ("--bce-loss", None),
    "--persistent_workers": (None, None), "--persistent-workers": (None, None),
}
_DROPPED = {  # official options without an equivalent here: (value that is harmless, why)
    "--accumulation-steps": ("1", "parsed but unused by the official trainer"),
    "--accumulation_steps": ("1", "parsed but unused by the official trainer"),
    "--save_every": (None, "extra epoch checkpoints; use --checkpoint-hist K"),
    "--save-every": (None, "extra epoch checkpoints; use --checkpoint-hist K"),
    "--debug": (None, "sets CUDA_VISIBLE_DEVICES and stops each epoch after 10 steps"),
}
_SAMPLING = ("--sampling_ratio", "--sampling-ratio", "--sampling_ratio_test", "--sampling-ratio-test")


def _official_value(parse, option: str, text):
    """An official option's value read by its argparse type; a bad one is a ModelConfigError naming the option."""
    try:
        return parse(text)
    except (_argparse.ArgumentTypeError, ValueError) as err:
        raise ModelConfigError(f"{option}: {err}") from None


def _split_argv(argv: Sequence[str]) -> List[List[str]]:
    """[[option, values...], ...]: `--a=b` split, values are the tokens up to the next option."""
    items: List[List[str]] = []
    for token in argv:
        if token.startswith("--") and len(token) > 2:
            items.append(token.split("=", 1) if "=" in token else [token])
        elif items and not (token.startswith("-") and len(token) > 1 and not _re.fullmatch(r"-[\d.eE+-]+", token)):
            items[-1].append(token)
        else:
            items.append([token])
    return items


def _is_official_line(items: List[List[str]]) -> bool:
    """Lines with the official `--use_mctf` (every official MCTF line has it). The official model
    names alone do not make a line official: `--model deit_small --mctf-r 16` is this project's."""
    return any(item[0] in ("--use_mctf", "--use-mctf") for item in items)


def translate_official_argv(argv: Sequence[str]) -> List[str]:
    """An official MCTF main.py line in this project's flags (other lines are returned unchanged).

    A line is official when it has `--use_mctf` (True or False, as every official line does).
    The official main.py defaults that differ from DeiT's come first (`--mixup 0 --cutmix 0
    --model-ema`), so the line's own flags win; boolean-valued options take switches here
    (`--model_ema False` -> `--no-model-ema`, a bare `--use_mctf` -> `--use_mctf True`);
    `--dataset` -> `--data-set`. The official `--pretrained` (default True) starts from the DeiT
    weights (`--pretrained`, read from the local cache) unless `--finetune` or `--resume` is
    given, and then also applies, as the official main.py does last, `lr *= --lr_times`,
    `min_lr` and `warmup_lr *= --min_lr_times`, warm-up 0 and cool-down 10. `--eval` without
    `--r_evals` evaluates at `--mctf_type[0]`. Unused official options (`--accumulation-steps 1`,
    `--persistent_workers`, `--save_every`, `--debug`, `--sampling_ratio 1`) are dropped with a
    warning when they would have had an effect; a sampling ratio other than 1 is refused.
    """
    items = _split_argv(argv)
    if not _is_official_line(items):
        return list(argv)
    out: List[List[str]] = []
    pretrained, lr_times, min_lr_times = True, 1.0, 1.0
    seen = {item[0] for item in items}
    values = {item[0]: item[1:] for item in items}
    for item in items:
        option, rest = item[0], item[1:]
        if option in ("--use_mctf", "--use-mctf"):
            out.append(["--use_mctf"] + (rest if rest else ["True"]))
        elif option == "--pretrained":
            pretrained = _official_value(_str2bool, option, rest[0]) if rest else True
            if rest[1:]:
                out.append(rest[1:])
        elif option in ("--lr_times", "--lr-times", "--min_lr_times", "--min-lr-times"):
            try:
                number = float(rest[0])
            except (IndexError, ValueError):
                raise ModelConfigError(f"{option} needs a number, e.g. {option} 0.03") from None
            if option.startswith("--lr"):
                lr_times = number
            else:
                min_lr_times = number
        elif option in _BOOL_OPTIONS:
            on_off = _BOOL_OPTIONS[option]
            flag = on_off[0] if not rest or _official_value(_str2bool, option, rest[0]) else on_off[1]
            if flag is not None:
                out.append([flag])
            if rest[1:]:
                out.append(rest[1:])
        elif option == "--dataset":
            out.append(["--data-set"] + rest)
        elif option in _DROPPED:
            harmless, why = _DROPPED[option]
            if rest and rest[0] != harmless:
                _logger.warning(f"{option} {rest[0]} is ignored here ({why})")
        elif option in _SAMPLING:
            if rest and _official_value(float, option, rest[0]) != 1.0:
                raise ModelConfigError(f"{option} {rest[0]}: training or evaluating on a fraction of ImageNet is not "
                                       f"supported; drop it (or pass 1)")
        else:
            out.append(item)
    flat = list(OFFICIAL_DEFAULTS) + [token for item in out for token in item]
    evaluating = "--eval" in seen
    resuming = bool(values.get("--resume") or values.get("--checkpoint"))
    mctf_on = any(item[0] == "--use_mctf" and _official_value(_str2bool, "--use_mctf", item[1])
                  for item in out if len(item) > 1)
    if mctf_on and not evaluating and values.get("--distillation-type", ["none"])[0] != "none":
        raise ModelConfigError("MCTF training does not combine with DeiT distillation (each MCTF pass returns one "
                               "logit tensor, no distillation head); drop --distillation-type")
    if pretrained:
        if not values.get("--finetune") and not resuming:
            flat.append("--pretrained")
        lr = float(values.get("--lr", ["5e-4"])[0]) * lr_times
        min_lr = float(values.get("--min-lr", values.get("--min_lr", ["1e-5"]))[0]) * min_lr_times
        warmup_lr = float(values.get("--warmup-lr", values.get("--warmup_lr", ["1e-6"]))[0]) * min_lr_times
        flat += ["--lr", repr(lr), "--min-lr", repr(min_lr), "--warmup-lr", repr(warmup_lr),
                 "--warmup-epochs", "0", "--cooldown-epochs", "10"]
    if mctf_on and evaluating and not values.get("--r_evals") and not values.get("--r-evals"):
        mctf_type = (_official_value(_number_list, "--mctf_type", values["--mctf_type"][0])
                     if values.get("--mctf_type") else DEFAULT_MCTF_TYPE)
        flat += ["--r_evals", f"[{mctf_type[0]}]"]
    return flat


_TINY = dict(depth=4, embed_dim=32, num_heads=2, patch_size=8)

FAMILY = _family.register_family(_family.MethodFamily(
    name="mctf",
    title="MCTF: multi-criteria token fusion with one-step-ahead attention (a patch applied to timm ViTs)",
    flags=(
        _family.Flag("--use_mctf", type=_str2bool, default=False, metavar="BOOL",
                     help="patch the model with MCTF as --mctf_type says (official spelling, e.g. --use_mctf True)"),
        _family.Flag("--mctf_type", type=_number_list, default=list(DEFAULT_MCTF_TYPE), metavar="LIST",
                     help="[r, r_teacher_max, trace_source, prop_attn, one_step_ahead, tau_sim, tau_info, tau_size, "
                          "bidirection, pooling_type, 0]; r: tokens fused per activated block, or a fraction in (0, 1)"),
        _family.Flag("--activate_layer", type=_family.literal("int_list"), default=list(DEFAULT_ACTIVATE_LAYER),
                     metavar="LIST", help="blocks that fuse tokens, e.g. [1,2,3,4,5,6,7,8,9,10,11]"),
        _family.Flag("--task_type", type=_number_list, default=list(DEFAULT_TASK_TYPE), metavar="LIST",
                     help="training passes [student, teacher, confidence threshold of the consistency loss], "
                          "e.g. [1,1,0.4]"),
        _family.Flag("--task_weight", type=_number_list, default=[1.0, 1.0, 1.0], metavar="LIST",
                     help="loss weights [student, teacher, consistency], e.g. [1.0,1.0,3.0]"),
        _family.Flag("--r_evals", type=_number_list, default=None, metavar="LIST",
                     help="--eval: one row (GMACs, im/s, top-1) per r, appended as a JSON line to "
                          "<output_dir>/result.txt"),
        _family.Flag("--mctf-r", type=_r_flag, metavar="R",
                     help="shortcut for --use_mctf True with --mctf_type[0] = R (an int, a fraction, or 'auto' with "
                          "--target-gmacs); the other --mctf_type entries and --activate_layer apply"),
        _family.Flag("--mctf_visualize", type=int, default=0, metavar="N",
                     help="draw the fused token groups of N validation images to <output_dir>/mctf_groups and exit"),
    ),
    patch=_family_patch,
    active=_family_active,
    check_options=_check_options,
    reduction=_family.Reduction("mctf_r", _search_r),
    hooks=_hooks,
    translate_argv=translate_official_argv,
    commands=(_family.Command("r_evals", "tools.mctf_tools:run_r_evals", exits=True),
              _family.Command("mctf_visualize", "tools.mctf_visualize:run_command", exits=True)),
    examples=(
        # (--mctf-r, not the official --use_mctf, which also asks for the official recipe and weights)
        _family.Example("mctf", model="deit_tiny_patch16_224", kwargs=dict(_TINY),
                        flags=("--mctf-r", "4", "--activate_layer", "[1,2,3]")),
        # the consistency fine-tuning (student and teacher pass) on an official model name; the
        # teacher's r is drawn in every training forward (a host value that sets the token counts),
        # so training compiles with breaks
        _family.Example("mctf_consistency", model="deit_small", kwargs=dict(_TINY),
                        flags=("--mctf-r", "4", "--mctf_type", "[4,3,0,1,1,1,20,40,1,1,0]",
                               "--activate_layer", "[1,2,3]", "--task_type", "[1,1,0.4]",
                               "--task_weight", "[1.0,1.0,3.0]"), compile=("eval",)),
        # the other modes and pooling rules: same module, compiled once through the first Example
        _family.Example("mctf_fast_precise_max", model="deit_tiny_patch16_224", kwargs=dict(_TINY),
                        flags=("--mctf-r", "0.35", "--mctf_type", "[0.35,0,0,1,2,1,20,40,0,2,0]",
                               "--activate_layer", "[1,3]"), compile=(),
                        invalid={"mctf_type": [16, 0, 0, 1, 3, 1, 20, 40, 1, 1, 0]}),
    ),
))
