"""Attention shrink models (docs/methods/shrink.md): its invariants, layouts, hooks."""
import argparse
import json
import logging
import os
import sys

import pytest
import timm
import torch
from timm.layers import DropPath

import models  # noqa: F401
from models.errors import ModelConfigError
from models.shrink import (
    FAMILY, LambdaBlock, LambdaVisionTransformer, ShrinkBlock, ShrinkVisionTransformer, _lambda_block_fn,
    attention_keys, lambda_at_epoch, remove_attention_keys, shrink_checkpoint_filter_fn,
)


def training_hooks(model, args):
    """The shrink family's hook factory, with the flag values of `args` as its options."""
    from models import family
    return FAMILY.hooks(model, family.options_for(FAMILY, args))


# 12 blocks (indices matter), tiny width, 32 px -> 4 patches + cls.
TINY = dict(img_size=32, embed_dim=48, num_heads=3, num_classes=10)
LAMBDA_MODELS = ["deit_tiny_patch16_224_copy_lambda", "deit_small_patch16_224_copy_lambda",
                 "deit_base_patch16_224_copy_lambda", "deit_base_patch16_224_attn"]
SHRINK_MODELS = ["deit_tiny_patch16_224_shrink", "deit_small_patch16_224_shrink", "deit_base_patch16_224_shrink"]


def build(name, **kwargs):
    """Uninitialised (timm's init is slow and every test that runs a forward sets weights itself)."""
    return timm.create_model(name, **dict(TINY, weight_init="skip", **kwargs)).eval()


def randomize(model, seed=0):
    """Non-trivial weights everywhere (timm zero-inits biases; LayerNorm gains of 1 hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if p.dim() == 1 and p.shape[0] == 48 else 0.0))
    return model


def images(batch=2, seed=1):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def deployed_from(lambda_model, removed, name="deit_tiny_patch16_224_shrink"):
    shrink = build(name, done_layer=removed)
    state, dropped = remove_attention_keys(lambda_model.state_dict(), removed)
    assert len(dropped) == 6 * len(set(removed))
    shrink.load_state_dict(state, strict=True)
    return shrink


def reference_logits(model, x, lambdas):
    """Independent forward of the spec's block maths (section 2) on the model's weights."""
    tokens = model.patch_embed(x)
    tokens = torch.cat([model.cls_token.expand(x.shape[0], -1, -1), tokens], dim=1) + model.pos_embed
    for block, lam in zip(model.blocks, lambdas):
        if lam == 0.0:
            h = 2 * tokens
        else:
            attn_mod = block.attn
            y = block.norm1(tokens)
            B, N, C = y.shape
            qkv = attn_mod.qkv(y).reshape(B, N, 3, attn_mod.num_heads, C // attn_mod.num_heads).permute(2, 0, 3, 1, 4)
            q, k, v = qkv[0], qkv[1], qkv[2]
            attn = ((q @ k.transpose(-2, -1)) * attn_mod.scale).softmax(dim=-1)
            a = attn_mod.proj((attn @ v).transpose(1, 2).reshape(B, N, C))
            h = (2 - lam) * tokens + lam * a
        tokens = h + block.mlp(block.norm2(h))
    return model.head(model.norm(tokens)[:, 0])


class Capture:
    """Records the input of `module` (forward pre-hook)."""

    def __init__(self, module):
        self.value = None
        self.handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, module, inputs):
        self.value = inputs[0].detach().clone()


# ----------------------------------------------------------------------------- spec section 10

@pytest.mark.parametrize("name", LAMBDA_MODELS)
def test_check1_empty_lists_equal_timm_deit(name):
    """Check 1: prune=[] done=[] is DeiT on identical weights."""
    model = randomize(build(name))
    deit = build("deit_tiny_patch16_224", embed_dim=48, num_heads=3)
    deit.load_state_dict(model.state_dict(), strict=True)
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(model(x), deit(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("prune", [[0], [0, 2, 4, 6], list(range(12))])
def test_check2_lambda_one_equals_baseline(prune):
    model = randomize(build("deit_tiny_patch16_224_copy_lambda", prune_layer=prune))
    deit = build("deit_tiny_patch16_224", embed_dim=48, num_heads=3)
    deit.load_state_dict(model.state_dict(), strict=True)
    model.set_lambda(0.4)
    model.set_lambda(1.0)
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(model(x), deit(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("role", ["prune", "done"])
def test_check3_lambda_zero_block_is_shrink_block_bitwise(role):
    block = LambdaBlock(dim=48, num_heads=3, qkv_bias=True, role=role).eval()
    block.set_lambda(0.0)
    shrink = ShrinkBlock(dim=48, num_heads=3, qkv_bias=True).eval()
    randomize(block)
    missing, unexpected = shrink.load_state_dict(block.state_dict(), strict=False)
    assert not missing and sorted(unexpected) == sorted(k.replace("blocks.0.", "") for k in attention_keys(0))
    x = torch.randn(2, 5, 48) * 3
    with torch.no_grad():
        assert torch.equal(block(x), shrink(x))
        # spec: lambda 0 gives exactly 2x before the MLP
        assert torch.equal(block(x) - block.mlp(block.norm2(2 * x)), shrink(x) - shrink.mlp(shrink.norm2(2 * x)))


@pytest.mark.parametrize("name,shrink_name,prune,done", [
    ("deit_tiny_patch16_224_copy_lambda", "deit_tiny_patch16_224_shrink", [0, 2, 4], []),
    ("deit_tiny_patch16_224_copy_lambda", "deit_tiny_patch16_224_shrink", [0, 2, 4], [6]),
    ("deit_small_patch16_224_copy_lambda", "deit_small_patch16_224_shrink", [], [0, 2, 4, 6]),
    ("deit_base_patch16_224_attn", "deit_base_patch16_224_shrink", [0, 1, 3, 4, 6], [9]),
    ("deit_base_patch16_224_attn", "deit_base_patch16_224_shrink", [11], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]),
])
def test_check4_lambda_zero_model_equals_deployed(name, shrink_name, prune, done):
    model = randomize(build(name, prune_layer=prune, done_layer=done))
    model.set_lambda(0.0)
    shrink = deployed_from(model, prune + done, shrink_name)
    assert len(shrink.state_dict()) == 152 - 6 * len(prune + done)
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(shrink(x), model(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("lam", [0.0, 0.3, 1.0])
def test_check6_pre_mlp_state_is_affine_in_lambda(lam):
    model = randomize(build("deit_tiny_patch16_224_copy_lambda", prune_layer=[3]))
    model.set_lambda(lam)
    block = model.blocks[3]
    block_in, pre_mlp = Capture(block), Capture(block.norm2)
    with torch.no_grad():
        model(images())
        x = block_in.value
        attn = block.attn(block.norm1(x))
    torch.testing.assert_close(pre_mlp.value, 2 * x + lam * (attn - x), rtol=1e-5, atol=1e-5)


def test_check7_forward_keeps_lambda_and_only_set_lambda_changes_it():
    model = randomize(build("deit_tiny_patch16_224_copy_lambda", prune_layer=[0, 2, 4, 6]))
    x = images()
    model.set_lambda(0.3)
    with torch.no_grad():
        first, second = model(x), model(x)
    assert torch.equal(first, second) and model.lambda_value == 0.3
    with pytest.raises(TypeError):
        model(x, epoch=150)  # no schedule inside forward: the engine calls set_lambda
    assert model.lambda_value == 0.3


def test_schedule_follows_lambda_decay_epochs():
    """The per-epoch lambda comes from the hooks' decay length, not a hard-coded 299."""
    model = randomize(build("deit_tiny_patch16_224_copy_lambda", prune_layer=[0, 2]))
    x = images()
    hooks = training_hooks(model, argparse.Namespace(lambda_decay_epochs=100))
    for epoch, expected in [(0, 1.0), (1, 0.99), (50, 0.5), (100, 0.0), (150, 0.0)]:
        hooks.on_epoch_start(model, epoch)
        assert model.lambda_value == pytest.approx(expected, abs=1e-12)
    hooks.on_epoch_start(model, 50)
    with torch.no_grad():
        scheduled = model(x)
        model.set_lambda(0.5)
        assert torch.equal(scheduled, model(x))


def test_check8_done_blocks_ignore_set_lambda():
    model = randomize(build("deit_tiny_patch16_224_copy_lambda", prune_layer=[0], done_layer=[1, 5]))
    x = images()
    outputs = []
    for lam in (0.9, 0.2):
        model.set_lambda(lam)
        assert [model.blocks[i].attention_weight() for i in (0, 1, 5, 2)] == [lam, 0.0, 0.0, 1.0]
        with torch.no_grad():
            outputs.append(model(x))
    only_done = randomize(build("deit_tiny_patch16_224_copy_lambda", done_layer=[1, 5]))
    with torch.no_grad():
        only_done.set_lambda(0.9)
        a = only_done(x)
        only_done.set_lambda(0.2)
        assert torch.equal(a, only_done(x))
    assert not torch.equal(outputs[0], outputs[1])  # the prune block does follow lambda


@pytest.mark.parametrize("lam", [0.0, 0.25, 1.0])
def test_check9_dropped_attention_path_leaves_two_minus_lambda_x(lam):
    model = randomize(build("deit_tiny_patch16_224_copy_lambda", prune_layer=[2], drop_path_rate=0.1)).train()
    model.set_lambda(lam)
    block = model.blocks[2]
    block.drop_path1 = DropPath(1.0)
    block_in, pre_mlp = Capture(block), Capture(block.norm2)
    model(images())
    assert torch.equal(pre_mlp.value, (2 - lam) * block_in.value)


def test_check10_best_checkpoint_only_at_lambda_zero():
    model = build("deit_tiny_patch16_224_copy_lambda", prune_layer=[0, 2, 4, 6])
    hooks = training_hooks(model, argparse.Namespace(lambda_decay_epochs=299))
    allowed = []
    for epoch in range(400):
        hooks.on_epoch_start(model, epoch)
        ok = hooks.best_checkpoint_allowed(model)
        assert ok == (model.lambda_value == 0.0)
        allowed.append(ok)
    assert allowed.index(True) == 299 and all(allowed[299:])
    # a shorter decay moves the first allowed epoch with it
    hooks = training_hooks(model, argparse.Namespace(lambda_decay_epochs=10))
    hooks.on_epoch_start(model, 9)
    assert not hooks.best_checkpoint_allowed(model)
    hooks.on_epoch_start(model, 10)
    assert hooks.best_checkpoint_allowed(model)


def test_check11_tome_r0_is_identity_on_shrink_model():
    tome = pytest.importorskip("models.tome")
    if not hasattr(tome, "patch"):
        pytest.skip("models.tome.patch is not written yet")
    model = randomize(build("deit_tiny_patch16_224_shrink", done_layer=[0, 2, 4, 6]))
    x = images()
    with torch.no_grad():
        expected = model(x)
        tome.patch(model, r=0)
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_tome_on_lambda_model_at_zero_equals_tome_on_shrink_model():
    """The block contract ToMe relies on (has_attention / attention_weight) gives equal merges."""
    tome = pytest.importorskip("models.tome")
    if not hasattr(tome, "patch"):
        pytest.skip("models.tome.patch is not written yet")
    lam_model = randomize(build("deit_tiny_patch16_224_copy_lambda", img_size=64, prune_layer=[0, 2], done_layer=[4]))
    lam_model.set_lambda(0.0)
    shrink = build("deit_tiny_patch16_224_shrink", img_size=64, done_layer=[0, 2, 4])
    shrink.load_state_dict(remove_attention_keys(lam_model.state_dict(), [0, 2, 4])[0], strict=True)
    for model in (lam_model, shrink):
        tome.patch(model, r=2, start_idx=1)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(lam_model(x), shrink(x), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- layouts

def _layout(name, **kwargs):
    with torch.device("meta"):
        model = timm.create_model(name, **kwargs)
    return {k: [list(v.shape), str(v.dtype)] for k, v in model.state_dict().items()}


LAYOUTS = [
    ("deit_tiny_patch16_224_copy_lambda", {"prune_layer": [0, 2, 4, 6]}, "deit_tiny_patch16_224_copy_lambda", 0),
    ("deit_small_patch16_224_copy_lambda", {"prune_layer": [0, 2, 4], "done_layer": [6]},
     "deit_small_patch16_224_copy_lambda", 0),
    ("deit_base_patch16_224_copy_lambda", {}, "deit_base_patch16_224_copy_lambda", 0),
    ("deit_base_patch16_224_attn", {"prune_layer": [0, 1, 3, 4, 6, 9]}, "deit_base_patch16_224_attn", 0),
    ("deit_tiny_patch16_224_shrink", {"done_layer": [0, 2, 4]}, "deit_tiny_patch16_224_shrink__done_0_2_4", 3),
    ("deit_tiny_patch16_224_shrink", {"done_layer": [0, 2, 4, 6]}, "deit_tiny_patch16_224_shrink__done_0_2_4_6", 4),
    ("deit_small_patch16_224_shrink", {"done_layer": [0, 2, 4]}, "deit_small_patch16_224_shrink__done_0_2_4", 3),
    ("deit_small_patch16_224_shrink", {"done_layer": [0, 2, 4, 6]}, "deit_small_patch16_224_shrink__done_0_2_4_6", 4),
    ("deit_base_patch16_224_shrink", {"done_layer": [0, 1, 3, 4, 6]}, "deit_base_patch16_224_shrink__done_0_1_3_4_6", 5),
    ("deit_base_patch16_224_shrink", {"done_layer": [0, 1, 3, 4, 6, 9]},
     "deit_base_patch16_224_shrink__done_0_1_3_4_6_9", 6),
]


@pytest.mark.parametrize("name,kwargs,key_file,removed", LAYOUTS, ids=[c[2] + str(c[1]) for c in LAYOUTS])
def test_state_dict_layout_matches_official(shared_dir, name, kwargs, key_file, removed):
    with open(os.path.join(shared_dir, "parity", "keys", key_file + ".json")) as f:
        official = json.load(f)
    ours = _layout(name, **kwargs)
    assert ours == official
    assert len(ours) == 152 - 6 * removed


def test_registered_names_belong_to_this_module():
    for name in LAMBDA_MODELS + SHRINK_MODELS:
        assert timm.models.model_entrypoint(name).__module__ == "models.shrink", name
    for name in ("deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224"):
        assert timm.models.model_entrypoint(name).__module__ == "timm.models.deit"
    assert [f.kwarg for f in FAMILY.flags if f.kwarg] == ["prune_layer", "done_layer", "frozen_stages"]


def test_deployed_blocks_have_no_attention():
    model = build("deit_tiny_patch16_224_shrink", done_layer=[1, 3])
    assert isinstance(model, ShrinkVisionTransformer)
    for i, block in enumerate(model.blocks):
        if i in (1, 3):
            assert isinstance(block, ShrinkBlock) and not block.has_attention
            assert not hasattr(block, "attn") and not hasattr(block, "norm1")
        else:
            assert type(block) is timm.models.vision_transformer.Block
    lam_model = build("deit_tiny_patch16_224_copy_lambda", prune_layer=[1], done_layer=[3])
    assert isinstance(lam_model, LambdaVisionTransformer)
    assert all(isinstance(b, LambdaBlock) and b.has_attention for b in lam_model.blocks)
    assert [b.role for b in lam_model.blocks[:4]] == ["plain", "prune", "plain", "done"]


def test_shrink_block_doubles_literally():
    block = randomize(ShrinkBlock(dim=48, num_heads=3)).eval()
    x = torch.randn(2, 5, 48)
    with torch.no_grad():
        h = 2 * x
        assert torch.equal(block(x), h + block.mlp(block.norm2(h)))
        # LayerNorm eps: norm2(2x) != norm2(x), so the 2 cannot be folded away
        assert not torch.equal(block.norm2(2 * x), block.norm2(x))


def test_prune_wins_when_a_block_factory_sees_both_lists():
    block = _lambda_block_fn(depth=2, prune_layer=(2,), done_layer=(2,), constant_drop_path=None,
                             dim=48, num_heads=3)
    block.set_lambda(0.4)
    assert block.role == "prune" and block.attention_weight() == 0.4


def test_lambda_zero_skips_attention():
    model = randomize(build("deit_tiny_patch16_224_copy_lambda", prune_layer=[0], done_layer=[1]))
    calls = []
    for i in (0, 1, 2):
        model.blocks[i].attn.register_forward_hook(lambda m, inp, out, i=i: calls.append(i))
    model.set_lambda(0.0)
    with torch.no_grad():
        model(images())
    assert calls == [2]


# ----------------------------------------------------------------------------- other configurations

@pytest.mark.parametrize("name,prune,done,lam", [
    ("deit_tiny_patch16_224_copy_lambda", [0, 2, 4, 6], [], 0.49833),
    ("deit_small_patch16_224_copy_lambda", [1, 5], [0, 11], 0.06355),
    ("deit_base_patch16_224_copy_lambda", [3], [], 0.7),
    ("deit_base_patch16_224_attn", [0, 1, 3, 4, 6], [9], 0.3),
    ("deit_base_patch16_224_attn", [], [0, 1, 3, 4, 6, 9], 0.5),
])
def test_lambda_models_match_spec_maths(name, prune, done, lam):
    model = randomize(build(name, prune_layer=prune, done_layer=done))
    model.set_lambda(lam)
    lambdas = [lam if i in prune else 0.0 if i in done else 1.0 for i in range(12)]
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference_logits(model, x, lambdas), rtol=1e-5, atol=1e-5)


def test_shrink_model_matches_spec_maths():
    model = randomize(build("deit_small_patch16_224_shrink", done_layer=[0, 1, 7]))
    x = images()
    lambdas = [0.0 if i in (0, 1, 7) else 1.0 for i in range(12)]
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference_logits(model, x, lambdas), rtol=1e-5, atol=1e-5)


def test_drop_path_and_dropout_follow_the_official_family():
    linear = build("deit_tiny_patch16_224_copy_lambda", drop_path_rate=0.1, drop_rate=0.2)
    rates = [b.drop_path1.drop_prob if isinstance(b.drop_path1, DropPath) else 0.0 for b in linear.blocks]
    assert rates == pytest.approx([0.1 * i / 11 for i in range(12)])
    assert linear.pos_drop.p == 0.2 and linear.blocks[0].attn.proj_drop.p == 0.2
    assert linear.blocks[0].mlp.drop1.p == 0.2 and linear.head_drop.p == 0.0
    for name in ("deit_base_patch16_224_attn", "deit_tiny_patch16_224_shrink"):
        constant = build(name, drop_path_rate=0.1, drop_rate=0.2, done_layer=[0])
        assert all(b.drop_path2.drop_prob == 0.1 for b in constant.blocks)
        assert constant.head_drop.p == 0.2 and constant.pos_drop.p == 0.0
        assert constant.blocks[1].attn.proj_drop.p == 0.0 and constant.blocks[0].mlp.drop2.p == 0.0


def test_every_trainable_parameter_gets_a_gradient():
    model = randomize(build("deit_tiny_patch16_224_copy_lambda", prune_layer=[0, 3], done_layer=[5],
                            drop_path_rate=0.1)).train()
    model.set_lambda(0.5)
    model(images()).sum().backward()
    unused = set(attention_keys(5))  # the done block skips its attention (hence find_unused_parameters)
    for name, param in model.named_parameters():
        assert (param.grad is None) == (name in unused), name
    assert model.ddp_find_unused_parameters
    assert not build("deit_tiny_patch16_224_copy_lambda").ddp_find_unused_parameters


def test_frozen_stages():
    model = build("deit_tiny_patch16_224_copy_lambda", frozen_stages=1)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    expected_prefixes = ("patch_embed.", "blocks.0.", "blocks.1.")
    assert {"cls_token", "pos_embed"} <= frozen
    for name, _ in model.named_parameters():
        assert (name in frozen) == (name in ("cls_token", "pos_embed") or name.startswith(expected_prefixes)), name
    assert all(p.requires_grad for p in build("deit_tiny_patch16_224_copy_lambda").parameters())
    shrink = build("deit_tiny_patch16_224_shrink", done_layer=[0], frozen_stages=0)
    assert not shrink.blocks[0].mlp.fc1.weight.requires_grad and shrink.blocks[1].norm1.weight.requires_grad


@pytest.mark.parametrize("kwargs,match", [
    ({"prune_layer": [12]}, "prune_layer index 12"),
    ({"done_layer": [-1]}, "done_layer index -1"),
    ({"prune_layer": [0, 2], "done_layer": [2]}, "block 2 is in both"),
    ({"prune_layer": [1.5]}, "not an integer"),
    ({"done_layer": [True]}, "not an integer"),
    ({"done_layer": "0,x"}, "not a Python list"),
    ({"prune_layer": {"a": 1}}, "must be a list"),
    ({"frozen_stages": 12}, "frozen_stages=12"),
    ({"frozen_stages": -2}, "frozen_stages=-2"),
])
def test_bad_kwargs_are_one_line_model_config_errors(kwargs, match):
    with pytest.raises(ModelConfigError, match=match) as info:
        build("deit_tiny_patch16_224_copy_lambda", **kwargs)
    assert "\n" not in str(info.value)


def test_bad_shrink_kwargs_and_ignored_prune_layer(caplog):
    with pytest.raises(ModelConfigError, match="done_layer index 12"):
        build("deit_small_patch16_224_shrink", done_layer=[12])
    with caplog.at_level(logging.WARNING, logger="models.shrink"):
        model = build("deit_small_patch16_224_shrink", done_layer=[0], prune_layer=[3])
    assert "ignored" in caplog.text and isinstance(model.blocks[3], timm.models.vision_transformer.Block)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="models.shrink"):
        build("deit_small_patch16_224_shrink", done_layer="[0,2]", prune_layer=[])
    assert caplog.text == ""


def test_set_lambda_rejects_out_of_range():
    model = build("deit_tiny_patch16_224_copy_lambda", prune_layer=[0])
    for bad in (-0.1, 1.5, float("nan"), "0.5", True):
        with pytest.raises(ValueError, match="lambda"):
            model.set_lambda(bad)


# ----------------------------------------------------------------------------- schedule and hooks

def test_schedule_values():
    assert lambda_at_epoch(1) == pytest.approx(0.99666, abs=1e-5)
    assert lambda_at_epoch(150) == pytest.approx(0.49833, abs=1e-5)
    assert lambda_at_epoch(280) == pytest.approx(0.06355, abs=1e-5)
    assert lambda_at_epoch(298) == pytest.approx(0.003344, abs=1e-6)
    assert lambda_at_epoch(299) == 0.0 and lambda_at_epoch(399) == 0.0
    assert lambda_at_epoch(0) == 1.0 and lambda_at_epoch(-1) == 1.0


def test_hooks_set_lambda_and_report_state():
    model = build("deit_tiny_patch16_224_copy_lambda", prune_layer=[0, 2], done_layer=[4])
    hooks = training_hooks(model, argparse.Namespace())  # no lambda_decay_epochs -> official 299
    hooks.on_epoch_start(model, 150)
    assert model.lambda_value == pytest.approx(0.49833, abs=1e-5)
    assert hooks.checkpoint_state(model) == {"lambda": model.lambda_value, "prune_layer": [0, 2], "done_layer": [4]}
    hooks.on_epoch_start(model, 1)
    assert model.blocks[2].attention_weight() == pytest.approx(0.99666, abs=1e-5)

    class Wrapper(torch.nn.Module):  # DDP / EMA expose the model as .module
        def __init__(self, module):
            super().__init__()
            self.module = module

    hooks.on_epoch_start(Wrapper(model), 299)
    assert model.lambda_value == 0.0 and hooks.best_checkpoint_allowed(Wrapper(model))


def test_lambda_schedule_only_for_lambda_models():
    from models.shrink import DeployedShrinkHooks, LambdaScheduleHooks
    args = argparse.Namespace(lambda_decay_epochs=299)
    deployed = build("deit_tiny_patch16_224_shrink", done_layer=[0])
    hooks = training_hooks(deployed, args)
    assert isinstance(hooks, DeployedShrinkHooks) and not isinstance(hooks, LambdaScheduleHooks)
    assert not hooks.ddp_find_unused_parameters(deployed) and hooks.log_state(deployed) == {}  # no attention params left
    assert isinstance(training_hooks(build("deit_tiny_patch16_224_copy_lambda", prune_layer=[0]), args),
                      LambdaScheduleHooks)
    with pytest.raises(ModelConfigError, match="--lambda-decay-epochs=-5 must be positive"):
        training_hooks(build("deit_tiny_patch16_224_copy_lambda"), argparse.Namespace(lambda_decay_epochs=-5))
    plain = build("deit_tiny_patch16_224_copy_lambda", done_layer=[1])
    hooks = training_hooks(plain, args)
    assert hooks.best_checkpoint_allowed(plain)  # nothing being diluted


def test_filter_fn_loads_full_deit_weights_into_shrink_model():
    deit = randomize(build("deit_tiny_patch16_224", embed_dim=48, num_heads=3))
    shrink = build("deit_tiny_patch16_224_shrink", done_layer=[0, 5])
    filtered = shrink_checkpoint_filter_fn({"model": deit.state_dict()}, shrink)
    shrink.load_state_dict(filtered, strict=True)
    assert len(filtered) == 152 - 12
    with pytest.raises(ValueError, match="blocks.0.norm1.weight"):
        remove_attention_keys(filtered, [3, 0])


# ----------------------------------------------------------------------------- official parity cases

@pytest.mark.slow
@pytest.mark.parametrize("case", ["lambda_small_p0246_ep150.pt", "shrink_small_d0246.pt"])
def test_public_parity_cases(shared_dir, case, monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(shared_dir, "parity"))
    import check
    assert check.run_case(os.path.join(shared_dir, "parity", "cases", case), verbose=True)
    sys.modules.pop("check", None)
