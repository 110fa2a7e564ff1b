"""The model contract every registered model (and the ToMe / ToFu patches) keeps.

Parametrized over the models this project registers with timm, each built tiny:

(a) a forward hook on every block fires exactly once per forward, with a Tensor output
    (blocks keep timm's `Tensor -> Tensor` signature; per-forward state lives in one
    object made by the model's forward);
(b) timm's `forward_intermediates` works wherever the timm base class has it: NLC
    intermediates (ViT-based models) equal the blocks' outputs, so their token counts
    follow the reduction, and the final features equal `forward_features`;
(c) an invalid constructor kwarg raises `models.errors.ModelConfigError`.
"""
import re

import pytest
import timm
import torch
from timm.models.mobilevit import _inverted_residual_block, _mobilevit_block

import models  # noqa: F401  (registers the models)
from models.errors import ModelConfigError

# Families (files owned elsewhere) that do not keep part of the contract yet: {(family, check): reason}.
# Not strict, so fixing the family does not break this file; drop the entry once it passes.
KNOWN_GAPS = {
    ("tome", "intermediates"): "models/tome.py makes its ToMeState in forward/forward_features only, not in "
                               "forward_intermediates, so timm's loop runs the blocks unmerged",
    ("tofu", "intermediates"): "ToFu reuses ToMe's model mixin, which does not wrap forward_intermediates",
}

VIT = dict(img_size=64, patch_size=16, embed_dim=48, num_heads=3)  # 16 patches
TINY_MOBILEVIT = dict(
    blocks=(
        _inverted_residual_block(d=1, c=8, s=1, br=2.0),
        _inverted_residual_block(d=1, c=16, s=2, br=2.0),
        _mobilevit_block(d=1, c=16, s=2, transformer_dim=24, transformer_depth=2, patch_size=2, br=2.0),
        _mobilevit_block(d=1, c=24, s=2, transformer_dim=32, transformer_depth=1, patch_size=2, br=2.0),
    ),
    stem_chs=8, num_features=32,
)


def _raft_layers(single_level: bool):
    if single_level:
        return [dict(depth=2, dim=32, patch_size=16)]
    return [dict(depth=1, dim=c, patch_size=p, raft_size=2, embedding_kernels=k)
            for c, p, k in zip((8, 16, 16, 16), (4, 2, 2, 2), ([4, 8], [2, 4], [2, 4], [2]))]


def tiny_config(name: str, family: str):
    """(constructor kwargs, input size, invalid kwargs or None) of a tiny build of `name`."""
    if family == "evit":
        return dict(VIT), 64, dict(base_keep_rate=1.5)  # default drop_loc (3, 6, 9): 16 -> 12 -> 9 -> 7 tokens
    if family == "shrink":
        roles = dict(done_layer=[1]) if name.endswith("_shrink") else dict(prune_layer=[2], done_layer=[4])
        return dict(VIT, depth=6, **roles), 64, dict(prune_layer=[99])
    if family == "ltm":
        bad = dict(compression_ratio=0.0)
        if name.startswith("ltm_vit"):
            return dict(VIT, depth=2), 64, bad
        if name.startswith("ltm_swin"):
            return dict(embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=4, img_size=64), 64, bad
        if name.startswith("ltm_mobilevit"):
            return dict(TINY_MOBILEVIT), 64, bad
        if name.startswith("ltm_efficientvit"):
            return dict(widths=(8, 8, 16, 16, 32), depths=(1, 1, 1, 2, 2), head_dim=8, head_widths=(32, 32)), 64, bad
    if family == "ltmp":
        if "mobilevit" in name:
            return dict(TINY_MOBILEVIT, merge_threshold=0.5, prune_threshold=0.02), 64, dict(tau=-1.0)
        if "efficientvit" in name:
            return dict(widths=(8, 8, 16, 16, 32), depths=(1, 1, 1, 2, 2), head_dim=8, head_widths=(32, 32),
                        merge_threshold=0.5, prune_threshold=0.02), 64, dict(tau=-1.0)
        return dict(VIT, depth=3), 64, dict(tau=-1.0)
    if family == "dwnet":
        kwargs = dict(embed_dim=16, depths=(1, 1, 1, 1), img_size=64)
        if name.startswith("iddwnet"):
            kwargs["inhomo_heads"] = (4, 8, 16, 32)
        return kwargs, 64, dict(global_pool="max")
    if family == "raftmlp":
        kwargs = dict(layers=_raft_layers(name == "raftmlp_org_mixer"), pretrained_image_size=64)
        return kwargs, 64, dict(token_mixing_type="no_such_mixing")
    return None


def registered():
    names = [n for n in timm.list_models() if timm.models.model_entrypoint(n).__module__.startswith("models.")]
    return sorted(names)


def family_of(name: str) -> str:
    return timm.models.model_entrypoint(name).__module__.split(".", 1)[1]


def _patched_deit(kind: str):
    base = timm.create_model("deit_tiny_patch16_224", num_classes=10, **dict(VIT, depth=4))
    if kind == "tome":
        from models import tome
        return tome.patch(base, r=3)
    from models import tofu
    return tofu.patch(base, r=3)


CASES = [pytest.param(name, id=name) for name in registered()] + [
    pytest.param("patch:tome", id="tome_patched_deit"), pytest.param("patch:tofu", id="tofu_patched_deit")]


def build(case: str):
    """(model in eval mode, input batch, family) for a case; skips cases without a tiny build."""
    torch.manual_seed(0)
    if case.startswith("patch:"):
        kind = case.split(":", 1)[1]
        if kind == "tofu" and not _has_module("models.tofu"):
            pytest.skip("models/tofu.py is not in this tree")
        return _patched_deit(kind).eval(), torch.randn(2, 3, 64, 64), kind
    family = family_of(case)
    config = tiny_config(case, family)
    if config is None:
        pytest.skip(f"no tiny configuration for the {family} family in this test; add one to tiny_config")
    kwargs, size, _ = config
    model = timm.create_model(case, num_classes=10, **kwargs)
    return model.eval(), torch.randn(2, 3, size, size), family


def _has_module(name: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(name) is not None


def known_gap(request, family: str, check: str, model=None) -> None:
    reason = KNOWN_GAPS.get((family, check))
    if reason is None:
        return
    if check == "intermediates" and any(
            "forward_intermediates" in vars(cls) for cls in type(model).__mro__ if cls.__module__.startswith("models.")):
        return  # the family now wraps forward_intermediates itself: hold it to the contract
    request.applymarker(pytest.mark.xfail(reason=reason, strict=False))


_BLOCK_NAME = re.compile(r"(^|\.)(blocks|transformer)\.\d+$")


def blocks_of(model: torch.nn.Module):
    """(name, module) of every block: `blocks.i` / stages' `blocks.i`, MobileViT's `transformer.i`,
    and numbered `*Block` members of sequential containers (ByobNet stages, RaftMLP levels)."""
    found = []
    for name, module in model.named_modules():
        numbered = name.rsplit(".", 1)[-1].isdigit()
        if _BLOCK_NAME.search(name) or (numbered and type(module).__name__.endswith("Block")):
            found.append((name, module))
    return found


@pytest.mark.parametrize("case", CASES)
def test_a_forward_hook_fires_once_per_block_with_a_tensor(case, request):
    model, x, family = build(case)
    known_gap(request, family, "hooks")
    blocks = blocks_of(model)
    assert blocks, f"no blocks found in {type(model).__name__}"
    calls = {name: [] for name, _ in blocks}
    for name, block in blocks:
        block.register_forward_hook(lambda module, args, out, name=name: calls[name].append(type(out)))
    with torch.no_grad():
        model(x)
    assert {name: len(c) for name, c in calls.items()} == {name: 1 for name in calls}
    assert all(c == [torch.Tensor] for c in calls.values())


def _is_vit(model) -> bool:
    from timm.models.vision_transformer import VisionTransformer
    return isinstance(model, VisionTransformer)


@pytest.mark.parametrize("case", CASES)
def test_b_forward_intermediates(case, request):
    model, x, family = build(case)
    if not hasattr(model, "forward_intermediates"):
        pytest.skip(f"timm's base of {type(model).__name__} has no forward_intermediates")
    known_gap(request, family, "intermediates", model)
    with torch.no_grad():
        features = model.forward_features(x)
        if not _is_vit(model):
            final, intermediates = model.forward_intermediates(x)
            assert intermediates and all(isinstance(y, torch.Tensor) and y.dim() == 4 for y in intermediates)
            torch.testing.assert_close(final, features)
            return
        outputs = []
        for block in model.blocks:
            block.register_forward_hook(lambda module, args, out: outputs.append(out))
        final, intermediates = model.forward_intermediates(x, output_fmt="NLC")
    torch.testing.assert_close(final, features)
    assert len(intermediates) == len(model.blocks) == len(outputs)
    prefix = model.num_prefix_tokens
    for y, out in zip(intermediates, outputs):
        assert y.shape == out[:, prefix:].shape
        torch.testing.assert_close(y, out[:, prefix:])
    counts = [y.shape[1] for y in intermediates]
    if family in ("evit", "tome", "tofu"):
        assert counts[-1] < counts[0], f"{case}: token counts {counts} do not fall"
    if family == "evit":
        assert counts == [16] * 3 + [12] * 3 + [9] * 3 + [7] * 3


@pytest.mark.parametrize("case", CASES)
def test_c_invalid_kwargs_raise_model_config_error(case, request):
    if case.startswith("patch:"):
        kind = case.split(":", 1)[1]
        if kind == "tofu" and not _has_module("models.tofu"):
            pytest.skip("models/tofu.py is not in this tree")
        known_gap(request, kind, "kwargs")
        module = __import__(f"models.{kind}", fromlist=["patch"])
        base = timm.create_model("deit_tiny_patch16_224", num_classes=10, **dict(VIT, depth=2))
        with pytest.raises(ModelConfigError):
            module.patch(base, r=-1)
        return
    family = family_of(case)
    config = tiny_config(case, family)
    if config is None or config[2] is None:
        pytest.skip(f"no known invalid kwarg for the {family} family in this test")
    kwargs, _, bad = config
    known_gap(request, family, "kwargs")
    with pytest.raises(ModelConfigError) as info:
        timm.create_model(case, num_classes=10, **dict(kwargs, **bad))
    assert "\n" not in str(info.value)
