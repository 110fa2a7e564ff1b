"""EViT (models/evit.py): the invariants of docs/methods/evit.md and more."""
import argparse
import json
import math
import os

import pytest
import timm
import torch
from torch import nn

import models  # noqa: F401  (registers the models)
from models import evit
from models.errors import ModelConfigError


TINY = dict(embed_dim=48, num_heads=3, num_classes=10)


def make_pair(img_size=64, distilled=False, **kwargs):
    """An EViT and a timm DeiT with the same (random) weights."""
    suffix = "distilled_" if distilled else ""
    model = timm.create_model(f"deit_small_{suffix}patch16_shrink_base", img_size=img_size, **TINY, **kwargs).eval()
    deit = timm.create_model(f"deit_small_{suffix}patch16_224", img_size=img_size, **TINY).eval()
    model.load_state_dict(deit.state_dict(), strict=True)
    return model, deit


def reference_forward(model, x, fuse):
    """Official EViT numerics, explicit attention matrix (independent re-statement)."""
    prefix = model.num_prefix_tokens
    x = model._pos_embed(model.patch_embed(x))
    idxs = []
    for blk in model.blocks:
        B, N, C = x.shape
        a = blk.attn
        qkv = a.qkv(blk.norm1(x)).reshape(B, N, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q @ k.transpose(-2, -1)) * a.scale).softmax(dim=-1)
        x = x + a.proj((attn @ v).transpose(1, 2).reshape(B, N, C))
        keep = math.ceil(blk.keep_rate * (N - prefix))
        if blk.keep_rate < 1 and keep < N - prefix:
            cls_attn = attn[:, :, 0, prefix:].mean(dim=1)
            idx = torch.topk(cls_attn, keep, dim=1, largest=True, sorted=True)[1]
            others = x[:, prefix:]
            rows = []
            for b in range(B):
                row = [x[b, :prefix], others[b, idx[b]]]
                if fuse:
                    dropped = sorted(set(range(N - prefix)) - set(idx[b].tolist()))
                    weights = cls_attn[b, dropped].unsqueeze(-1)
                    row.append((others[b, dropped] * weights).sum(0, keepdim=True))
                rows.append(torch.cat(row))
            x = torch.stack(rows)
            idxs.append(idx)
        x = x + blk.mlp(blk.norm2(x))
    return model.forward_head(model.norm(x)), idxs


def test_keep_rate_one_equals_deit():
    x = torch.randn(2, 3, 64, 64)
    for kwargs in (dict(base_keep_rate=1.0), dict(keep_rate=(1.0,) * 12)):
        model, deit = make_pair(fuse_token=True, **kwargs)
        with torch.no_grad():
            assert torch.equal(model(x), deit(x))


def test_call_time_keep_rate():
    x = torch.randn(2, 3, 64, 64)
    model, deit = make_pair(base_keep_rate=0.5, fuse_token=True)
    with torch.no_grad():
        assert torch.equal(model(x, keep_rate=1), deit(x))
        assert not torch.allclose(model(x), deit(x))
    unpruned, deit = make_pair(base_keep_rate=1.0)
    with torch.no_grad():
        out, idxs = unpruned(x, keep_rate=0.5, get_idx=True)
    assert idxs == [] and torch.equal(out, deit(x))


COUNTS = {  # tokens after blocks 3, 6, 9 for 197 input tokens: (fused, not fused), spec section 2
    0.9: ((179, 163, 148), (178, 161, 145)),
    0.8: ((159, 129, 105), (158, 127, 102)),
    0.7: ((140, 100, 72), (139, 98, 69)),
    0.6: ((120, 74, 46), (119, 72, 44)),
    0.5: ((100, 52, 28), (99, 50, 26)),
}


def record_lengths(model):
    """Tokens leaving each block, recorded by plain forward hooks (blocks run through __call__)."""
    lengths = []
    for block in model.blocks:
        block.register_forward_hook(lambda module, args, out: lengths.append(out.shape[1]))
    return lengths


@pytest.mark.parametrize("rate", sorted(COUNTS))
@pytest.mark.parametrize("fuse", [True, False])
def test_token_counts_table(rate, fuse):
    model = timm.create_model("deit_small_patch16_shrink_base", base_keep_rate=rate, fuse_token=fuse, **TINY).eval()
    lengths = record_lengths(model)
    with torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
    expected = COUNTS[rate][0 if fuse else 1]
    assert (lengths[3], lengths[6], lengths[9]) == expected
    assert lengths[:3] == [197] * 3 and lengths[11] == lengths[9]


@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("rate,drop_loc", [(0.7, (3, 6, 9)), (0.5, (0, 1, 5)), (0.9, (2,)), (0.3, (4, 11))])
def test_matches_explicit_reference(fuse, rate, drop_loc):
    """Fused-SDPA implementation == explicit-attention official numerics; idx rows by decreasing attention."""
    model, _ = make_pair(img_size=96, base_keep_rate=rate, drop_loc=drop_loc, fuse_token=fuse)
    x = torch.randn(3, 3, 96, 96)
    with torch.no_grad():
        out, idxs = model(x, get_idx=True)
        ref, ref_idxs = reference_forward(model, x, fuse)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert len(idxs) == len(drop_loc)
    for idx, ref_idx in zip(idxs, ref_idxs):
        assert idx.shape == ref_idx.shape
        assert torch.equal(idx, ref_idx)


def test_get_idx_sorted_by_class_attention():
    model, _ = make_pair(base_keep_rate=0.6, drop_loc=(2,), fuse_token=False)
    block = model.blocks[2]
    captured = {}

    def capture(module, inputs):
        captured["x"] = inputs[0]
    handle = block.norm1.register_forward_pre_hook(capture)
    with torch.no_grad():
        _, idxs = model(torch.randn(2, 3, 64, 64), get_idx=True)
    handle.remove()
    x = block.norm1(captured["x"])
    B, N, C = x.shape
    qkv = block.attn.qkv(x).reshape(B, N, 3, 3, 16).permute(2, 0, 3, 1, 4)
    attn = ((qkv[0] @ qkv[1].transpose(-2, -1)) * 16 ** -0.5).softmax(-1)[:, :, 0, 1:].mean(1)
    assert idxs[0].shape == (2, math.ceil(0.6 * 16))
    picked = attn.gather(1, idxs[0])
    assert torch.all(picked[:, :-1] >= picked[:, 1:])
    assert torch.all(picked[:, -1:] >= attn.sort(descending=True).values[:, idxs[0].shape[1] - 1:idxs[0].shape[1]])


class Zero(nn.Module):
    def forward(self, x):
        return torch.zeros_like(x)


def test_fused_token_is_attention_weighted_sum():
    """The token appended at a drop location (before the MLP) equals sum_j a_j x_j over dropped j."""
    model, _ = make_pair(base_keep_rate=0.5, drop_loc=(0,), fuse_token=True)
    block = model.blocks[0]
    block.mlp = Zero()  # block output == its pre-MLP state
    x = torch.randn(2, 17, 48)
    with torch.no_grad():
        out, idx = block.forward_prune(x)  # the compatibility alias: one block, explicit settings
        h = block.norm1(x)
        qkv = block.attn.qkv(h).reshape(2, 17, 3, 3, 16).permute(2, 0, 3, 1, 4)
        attn = ((qkv[0] @ qkv[1].transpose(-2, -1)) * 16 ** -0.5).softmax(-1)
        x1 = x + block.attn.proj((attn @ qkv[2]).transpose(1, 2).reshape(2, 17, 48))
        cls_attn = attn[:, :, 0, 1:].mean(1)
    assert out.shape == (2, 1 + 8 + 1, 48)
    for b in range(2):
        dropped = sorted(set(range(16)) - set(idx[b].tolist()))
        expected = sum(cls_attn[b, j] * x1[b, 1 + j] for j in dropped)
        torch.testing.assert_close(out[b, -1], expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out[b, 1:-1], x1[b, 1 + idx[b]], rtol=1e-5, atol=1e-5)


def test_rate_that_keeps_all_prunes_nothing():
    model, deit = make_pair(img_size=224, base_keep_rate=0.999, fuse_token=True)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        out, idxs = model(x, get_idx=True)
        assert idxs == []
        assert torch.equal(out, deit(x))


def test_double_precision_keep_count_in_model():
    # 160 px -> 100 patches; 0.55 * 100 = 55.000000000000007 -> 56 kept
    model = timm.create_model("deit_small_patch16_shrink_base", img_size=160, base_keep_rate=0.55,
                              drop_loc=(0,), **TINY).eval()
    with torch.no_grad():
        _, idxs = model(torch.randn(1, 3, 160, 160), get_idx=True)
    assert idxs[0].shape == (1, 56)


def test_tokens_argument_prunes_every_block():
    model, _ = make_pair(base_keep_rate=1.0)
    with torch.no_grad():
        _, idxs = model(torch.randn(1, 3, 64, 64), tokens=10, get_idx=True)
    assert len(idxs) == 1  # 16 -> 10; later blocks have exactly 10 candidates (K == N - 1)
    with torch.no_grad():
        _, idxs = model(torch.randn(1, 3, 64, 64), tokens=[15 - i for i in range(12)], get_idx=True)
    assert [i.shape[1] for i in idxs] == [15 - i for i in range(12)]


def test_keep_rate_schedule():
    b, e0, se = 0.7, 10, 20
    steps = 50
    sched = lambda epoch, step: evit.keep_rate_schedule(epoch, step, steps, b, e0, se)  # noqa: E731
    assert sched(0, 0) == 1 and sched(9, steps - 1) == 1
    assert sched(e0, 0) == 1
    assert sched(e0 + se, 0) == b and sched(100, 3) == b
    values = [sched(ep, s) for ep in range(e0, e0 + se) for s in range(steps)]
    assert all(v1 >= v2 for v1, v2 in zip(values, values[1:]))
    assert math.isclose(sched(e0 + se // 2, 0), (1 + b) / 2, rel_tol=1e-12)
    assert evit.keep_rate_schedule(10, 0, steps, b, 10, 0) == b  # shrink_epochs 0: jump at E0


def test_training_hooks_apply_schedule():
    model, _ = make_pair()
    args = argparse.Namespace(base_keep_rate=None, shrink_start_epoch=1, shrink_epochs=2)
    from models import family
    hooks = evit.FAMILY.hooks(model, family.options_for(evit.FAMILY, args))
    assert hooks.log_state(model) == {"keep_rate": 0.7}
    hooks.on_step_start(model, 0, 5, 10)
    assert model.runtime_keep_rate == 1.0
    hooks.on_step_start(model, 2, 0, 10)
    assert math.isclose(model.runtime_keep_rate, (1 + 0.7) / 2)
    hooks.on_step_start(model, 3, 0, 10)
    assert model.runtime_keep_rate == 0.7
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), model(x, keep_rate=0.7))
    model.set_keep_rate(None)
    plain = timm.create_model("deit_tiny_patch16_224", **TINY)
    assert evit.FAMILY.hooks(plain, family.options_for(evit.FAMILY, args)) is None


def test_runtime_keep_rate_set():
    model, deit = make_pair()
    x = torch.randn(2, 3, 64, 64)
    model.set_keep_rate(1.0)
    with torch.no_grad():
        assert torch.equal(model(x), deit(x))
    with pytest.raises(ValueError):
        model.set_keep_rate(1.5)


@pytest.mark.parametrize("distilled", [False, True])
@pytest.mark.parametrize("fuse", [False, True])
def test_runtime_keep_rate_counts_equal_the_rate_path(distilled, fuse):
    """set_keep_rate's per-block integer counts (what forward uses on the model's own grid) are
    the ones the rate gives block by block, float rounding included (0.55 * 100 keeps 56), and
    another image size falls back to the rate itself."""
    model, _ = make_pair(img_size=160, distilled=distilled, drop_loc=(1, 2, 3), fuse_token=fuse,
                         dynamic_img_size=True)  # 100 patches
    x = torch.randn(2, 3, 160, 160)
    for rate in (0.55, 0.7, 0.93, 0.999, 0.3):
        model.set_keep_rate(rate)
        with torch.no_grad():
            logits, kept = model(x, get_idx=True)
            expected, expected_kept = model(x, keep_rate=rate, get_idx=True)
        assert [k.shape[1] for k in kept] == [k.shape[1] for k in expected_kept], rate
        assert torch.equal(logits, expected), rate
        assert model.runtime_tokens_grid == 100
    model.set_keep_rate(0.55)
    assert model.blocks[1].runtime_tokens == 56 and model.blocks[0].runtime_tokens == 100
    small = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(small), model(small, keep_rate=0.55))
    model.set_keep_rate(None)
    assert model.runtime_tokens_grid is None and all(b.runtime_tokens is None for b in model.blocks)


def _layout(model):
    return {k: list(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("size", ["tiny", "small", "base"])
def test_state_dict_matches_official_keys(size, shared_dir):
    model = timm.create_model(f"deit_{size}_patch16_shrink_base", device="meta")
    expected = {k: v[0] for k, v in json.load(open(os.path.join(shared_dir, "parity", "keys", f"deit_{size}_patch16_224.json"))).items()}
    assert _layout(model) == expected
    if size == "small":
        official = json.load(open(os.path.join(shared_dir, "parity", "keys", "deit_small_patch16_shrink_base.json")))
        assert _layout(model) == {k: v[0] for k, v in official.items()}


@pytest.mark.parametrize("size", ["tiny", "small", "base"])
def test_distilled_keys_match_timm(size):
    model = timm.create_model(f"deit_{size}_distilled_patch16_shrink_base", device="meta")
    deit = timm.create_model(f"deit_{size}_distilled_patch16_224", device="meta")
    assert _layout(model) == _layout(deit)


def test_deit_checkpoint_loads_strictly_and_param_count():
    model, deit = make_pair()
    assert set(model.state_dict()) == set(deit.state_dict())
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in deit.parameters())
    assert not list(model.buffers())


def test_batch_independence():
    model, _ = make_pair(base_keep_rate=0.5, fuse_token=True)
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        batched = model(x)
        single = torch.cat([model(x[i:i + 1]) for i in range(4)])
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fuse", [True, False])
def test_distilled_protects_cls_and_dist(fuse):
    model, deit = make_pair(distilled=True, base_keep_rate=0.5, drop_loc=(1, 4), fuse_token=fuse)
    lengths = record_lengths(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out, idxs = model(x, get_idx=True)
    assert out.shape == (2, 10)
    assert [i.shape[1] for i in idxs] == [8, math.ceil(0.5 * (8 + fuse))]  # a kept fused token is a candidate
    assert lengths[1] == 2 + 8 + fuse
    with torch.no_grad():
        ref, _ = reference_forward(model, x, fuse)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    model.set_keep_rate(1.0)
    with torch.no_grad():
        assert torch.equal(model(x), deit(x))


def test_other_resolution_and_dynamic_size():
    model = timm.create_model("deit_small_patch16_shrink_base", img_size=96, **TINY).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 96, 96)).shape == (1, 10)
    dynamic = timm.create_model("deit_small_patch16_shrink_base", img_size=64, dynamic_img_size=True,
                                fuse_token=True, **TINY).eval()
    with torch.no_grad():
        out, idxs = dynamic(torch.randn(2, 3, 80, 96), get_idx=True)
    assert out.shape == (2, 10) and idxs[0].shape == (2, math.ceil(0.7 * 30))


@pytest.mark.parametrize("kwargs", [
    dict(base_keep_rate=0.0), dict(base_keep_rate=1.2), dict(drop_loc=(3, 12)), dict(drop_loc=(-1,)),
    dict(keep_rate=(0.5,) * 5), dict(keep_rate=(1.0, 0.0) * 6),
])
def test_bad_kwargs_raise_model_config_error(kwargs):
    with pytest.raises(ModelConfigError) as info:
        timm.create_model("deit_small_patch16_shrink_base", img_size=32, **TINY, **kwargs)
    assert "\n" not in str(info.value)


def test_training_step_gradients():
    model = timm.create_model("deit_small_patch16_shrink_base", img_size=64, base_keep_rate=0.5,
                              drop_loc=(1, 2), fuse_token=True, depth=4, drop_path_rate=0.1, **TINY)
    model.train()
    model(torch.randn(2, 3, 64, 64)).logsumexp(-1).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_cli_kwargs_are_constructor_kwargs():
    assert [f.kwarg for f in evit.FAMILY.flags if f.kwarg] == ["base_keep_rate", "drop_loc", "fuse_token"]
    model = timm.create_model("deit_tiny_patch16_shrink_base", img_size=32, base_keep_rate=0.6,
                              drop_loc=[1, 2], fuse_token=True, **TINY)
    assert model.keep_rates[1:3] == (0.6, 0.6) and model.fuse_token


# ---------------------------------------------------------------------------
# tools/evit_tools.py
# ---------------------------------------------------------------------------

def test_patch_states_follow_fused_token():
    from tools.evit_tools import patch_states
    # 6 patches: keep 4, 1 (fused: rest); then keep the fused token (index 2) only
    states = patch_states([torch.tensor([[4, 1]]), torch.tensor([[2]])], 6, fused=True)
    assert states[0].tolist() == [[2, 1, 2, 2, 1, 2]]
    assert states[1].tolist() == [[2, 2, 2, 2, 2, 2]]  # the kept fused token still holds 0, 2, 3, 5; 4 and 1 fused now
    states = patch_states([torch.tensor([[4, 1]]), torch.tensor([[1]])], 6, fused=False)
    assert states[1].tolist() == [[0, 1, 0, 0, 0, 0]]  # token 1 holds patch 1


def test_speed_test_writes_file(tmp_path):
    from tools.evit_tools import run_speed_test
    model = timm.create_model("deit_small_patch16_shrink_base", img_size=32, depth=4, drop_loc=(1, 2), **TINY)
    args = argparse.Namespace(output_dir=str(tmp_path), input_size=32)
    result = run_speed_test(model, args, "cpu")
    text = (tmp_path / "speed_macs.txt").read_text().splitlines()
    assert text[0].startswith("inference_speed: ") and " GMACs: " in text[0]
    assert text[1].startswith("args: Namespace(")
    assert result["inference_speed"] > 0 and 0 < result["gmacs"] < 0.01
    assert model.training  # mode restored


def test_visualize_mask_writes_pngs(tmp_path):
    from PIL import Image

    from tools.evit_tools import visualize_mask
    model = timm.create_model("deit_small_patch16_shrink_base", img_size=32, depth=4, drop_loc=(1, 2),
                              base_keep_rate=0.5, fuse_token=True, **TINY)
    data = [(torch.randn(2, 3, 32, 32), torch.zeros(2, dtype=torch.long)) for _ in range(3)]
    args = argparse.Namespace(output_dir=str(tmp_path), n_visualization=3)
    result = visualize_mask(model, data, args, torch.device("cpu"))
    files = sorted(p.name for p in (tmp_path / "visualize_mask").iterdir())
    assert result["written"] == 4 and files == [f"img_{n}.png" for n in range(4)]
    width, height = Image.open(tmp_path / "visualize_mask" / "img_0.png").size
    assert (width, height) == (3 * 32 + 4 * 2, 32 + 2 * 2)  # original + 2 drop locations, 2 px padding


# ---------------------------------------------------------------------------
# Per-forward state: blocks run through __call__, the state lives for one call
# ---------------------------------------------------------------------------

def test_forward_intermediates_follow_the_pruning():
    model = timm.create_model("deit_small_patch16_shrink_base", img_size=64, base_keep_rate=0.5,
                              drop_loc=(1, 3), depth=4, fuse_token=True, **TINY).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x, output_fmt="NLC")
        assert [y.shape[1] for y in inter] == [16, 8 + 1, 9, 5 + 1]  # 16 -> keep 8 (+ fused) -> keep 5 (+ fused)
        torch.testing.assert_close(final, model.forward_features(x))
        _, at_full_rate = model.forward_intermediates(x, output_fmt="NLC", keep_rate=1.0)
    assert [y.shape[1] for y in at_full_rate] == [16] * 4
    with pytest.raises(ValueError, match="NLC"):
        model.forward_intermediates(x)
    assert model._state_slot.state is None


def test_state_is_dropped_after_the_forward_even_on_error():
    model = timm.create_model("deit_small_patch16_shrink_base", img_size=64, drop_loc=(1,), depth=2, **TINY).eval()
    with torch.no_grad(), pytest.raises(ValueError, match="keeps 40 of 16"):
        model(torch.randn(1, 3, 64, 64), tokens=40)
    assert model._state_slot.state is None
    with torch.no_grad():
        _, idxs = model(torch.randn(1, 3, 64, 64), get_idx=True)
    assert len(idxs) == 1


def test_blocks_alone_use_their_configured_rate():
    model = timm.create_model("deit_small_patch16_shrink_base", img_size=64, base_keep_rate=0.5,
                              drop_loc=(0,), depth=2, **TINY).eval()
    x = torch.randn(1, 17, 48)
    with torch.no_grad():
        assert model.blocks[0](x).shape == (1, 1 + 8, 48)
        assert model.blocks[1](x).shape == (1, 17, 48)


def test_gradient_checkpointing_is_refused():
    model = timm.create_model("deit_small_patch16_shrink_base", img_size=32, depth=2, drop_loc=(1,), **TINY)
    model.set_grad_checkpointing(True)
    with pytest.raises(ValueError, match="gradient checkpointing"):
        model(torch.randn(1, 3, 32, 32))
