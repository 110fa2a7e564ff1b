"""LTMP (models/ltmp.py): the invariants of docs/methods/ltmp.md, official layouts,
checkpoint loading both ways, batch exactness, the training pieces and the public parity case.

Most tests use tiny ViTs (embed 32, 2-3 blocks, 32 px, patch 8: N = 17 tokens) with the parity
cases' deterministic weights (`shared/parity/fill.py`), and compare the models with
`reference_*` forwards written here per sample with Python loops, straight from the spec.
"""
import json
import math
import os
import subprocess
import sys

import pytest
import timm
import torch
import torch.nn.functional as F

import models  # noqa: F401
from models import ltmp
from models.errors import ModelConfigError
from vit_utils import check_intermediates

PARITY = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "parity")
sys.path.insert(0, PARITY)
from fill import fill_state_dict, layout, make_input  # noqa: E402

TINY = dict(embed_dim=32, depth=2, num_heads=2, img_size=32, patch_size=8, num_classes=10)
TRAIN_NAMES = [f"ltmp_vit_{s}_patch16_224" for s in ("tiny", "small", "base", "large")] + \
              [f"ltmp_deit_{s}_patch16_224" for s in ("tiny", "small", "base")]
INFERENCE_NAMES = ["inference_" + n for n in TRAIN_NAMES] + ["inference_ltmp_deit_base_patch16_384"]


def tiny(name="ltmp_deit_tiny_patch16_224", **kwargs):
    """A tiny LTMP model with the parity cases' deterministic weights, in eval mode."""
    model = timm.create_model(name, **dict(TINY, **kwargs))
    state = fill_state_dict(layout(model.state_dict()))
    model.load_state_dict(state, strict=True)
    return model.eval()


def set_thresholds(model, merge, prune):
    """Per-block thresholds by state-dict key, as the parity setup lines do (any value allowed)."""
    sd = model.state_dict()
    depth = len(model.blocks)
    merge = merge if isinstance(merge, (list, tuple)) else [merge] * depth
    prune = prune if isinstance(prune, (list, tuple)) else [prune] * depth
    for i in range(depth):
        sd[f"blocks.{i}.merge_masker.threshold"].fill_(merge[i])
        sd[f"blocks.{i}.prune_masker.threshold"].fill_(prune[i])


def images(n, size=32, seed=0):
    return make_input([n, 3, size, size], seed)


# ---------------------------------------------------------------------------------------------
# Per-sample references (spec sections 2-5), Python loops over tokens
# ---------------------------------------------------------------------------------------------

def _embed(model, image):
    return model.norm_pre(model._pos_embed(model.patch_embed(image)))[0]  # [N, C]


def _attention(attn, h, size):
    n, c = h.shape
    heads = attn.num_heads
    q, k, v = attn.qkv(h).reshape(n, 3, heads, c // heads).permute(1, 2, 0, 3)  # [H, n, d] each
    logits = (q * attn.scale) @ k.transpose(-1, -2) + size.log()[None, None, :]
    return logits, k, v


def _head(model, x):
    return model.head(model.fc_norm(model.norm(x)[0]))


@torch.no_grad()
def reference_inference(model, image):
    """Batch-1 inference forward (tokens removed). Returns (logits [classes], tokens per block, sizes)."""
    x = _embed(model, image)
    size = torch.ones(x.shape[0])
    counts = []
    for blk in model.blocks:
        theta_m = float(blk.merge_masker.threshold)
        theta_p = float(blk.prune_masker.threshold)
        n, c = x.shape
        logits, k, v = _attention(blk.attn, blk.norm1(x), size)
        probs = logits.softmax(-1)
        imp = probs.mean(dim=(0, 1))
        imp[0] = math.inf
        x = x + blk.attn.proj((probs @ v).transpose(0, 1).reshape(n, c))
        metric = k.mean(0)
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a_pos, b_pos = list(range(0, n, 2)), list(range(1, n, 2))
        sources = {b: [] for b in b_pos}
        merged = set()
        for a in a_pos[1:]:
            if not b_pos:
                break
            sims = torch.stack([metric[a] @ metric[b] for b in b_pos])
            j = int(sims.argmax())
            if float(sims[j]) > theta_m:
                sources[b_pos[j]].append(a)
                merged.add(a)
        tokens = []  # (x * size, size, importance) in the output order
        for a in a_pos:
            if a not in merged:
                tokens.append((x[a] * size[a], size[a], imp[a]))
        for b in b_pos:
            members = [b] + sources[b]
            tokens.append((sum(x[t] * size[t] for t in members), sum(size[t] for t in members),
                           max(imp[t] for t in members)))
        kept = [t for t in tokens if float(t[2]) > theta_p]
        size = torch.stack([t[1] for t in kept])
        x = torch.stack([t[0] for t in kept]) / size[:, None]
        x = x + blk.mlp(blk.norm2(x))
        counts.append(x.shape[0])
    return _head(model, x), counts, size


def reference_masked(model, image, training=False, eps=1e-5):
    """One sample through the masked forward. Returns (logits, masks per block [N], x per block)."""
    x = _embed(model, image)
    n, c = x.shape
    size = torch.ones(n)
    mask = torch.ones(n)
    masks = []
    for blk in model.blocks:
        tau = blk.merge_masker.tau
        theta_m = float(blk.merge_masker.threshold)
        theta_p = float(blk.prune_masker.threshold)
        logits, k, v = _attention(blk.attn, blk.norm1(x), size)
        e = torch.exp(logits - logits.max(dim=-1, keepdim=True).values) * mask[None, None, :]
        probs = (e + eps / n) / (e.sum(-1, keepdim=True) + eps) if training else e / e.sum(-1, keepdim=True)
        imp = probs.mean(dim=(0, 1))
        imp[0] = math.inf
        x = x + blk.attn.proj((probs @ v).transpose(0, 1).reshape(n, c))
        metric = k.mean(0)
        metric = metric / metric.norm(dim=-1, keepdim=True) * mask[:, None]
        a_pos, b_pos = list(range(0, n, 2)), list(range(1, n, 2))
        xs = x * size[:, None]
        new_x = [xs[a] for a in a_pos] + [xs[b].clone() for b in b_pos]
        new_size = [size[a] for a in a_pos] + [size[b].clone() for b in b_pos]
        new_imp = [imp[a] for a in a_pos] + [imp[b].clone() for b in b_pos]
        new_mask = []
        for i, a in enumerate(a_pos):
            sims = torch.stack([metric[a] @ metric[b] for b in b_pos])
            if i == 0:
                sims = torch.full_like(sims, -math.inf)
            j = int(sims.argmax())
            merge = bool(torch.sigmoid((sims[j] - theta_m) / tau) > 0.5)
            new_mask.append(0.0 if mask[a] == 0 else float(not merge))
            if merge:
                slot = len(a_pos) + j
                new_x[slot] = new_x[slot] + xs[a]
                new_size[slot] = new_size[slot] + size[a]
                new_imp[slot] = torch.maximum(new_imp[slot], imp[a] if i else torch.zeros(()))
        new_mask += [float(mask[b]) for b in b_pos]
        size = torch.stack(new_size)
        x = torch.stack(new_x) / size[:, None]
        imp = torch.stack(new_imp)
        mask = torch.tensor(new_mask)
        keep = (torch.sigmoid((imp - theta_p) / tau) > 0.5).float()
        mask = torch.where(mask == 1, keep, mask)
        masks.append(mask)
        x = x + blk.mlp(blk.norm2(x))
    return _head(model, x), masks


def _counts(model):
    return [int(t) for t in torch.stack(model.ltmp_info["tokens"], dim=1)[0]]


# Threshold settings for the cross-checks: mild, aggressive, merge-only, prune-only, mixed per block.
CONFIGS = {
    "mild": ([0.7, 0.8, 0.85], [0.03, 0.04, 0.05]),
    "aggressive": ([0.2, 0.3, 0.3], [0.06, 0.07, 0.08]),
    "merge_only": ([0.4, 0.5, 0.5], [-1.0, -1.0, -1.0]),
    "prune_only": ([2.0, 2.0, 2.0], [0.05, 0.06, 0.06]),
    "mixed_blocks": ([0.5, 2.0, 0.6], [-1.0, 0.06, 0.05]),
}


# ---------------------------------------------------------------------------------------------
# Registry, layouts, checkpoints (invariant 9)
# ---------------------------------------------------------------------------------------------

def test_official_names_are_registered_in_this_module():
    registered = set(timm.list_models(module="ltmp"))
    hybrids = {f"{p}ltmp_{b}" for p in ("", "inference_") for b in ("mobilevit_xs", "mobilevit_s", "efficientvit_b1")}
    assert registered == set(TRAIN_NAMES) | set(INFERENCE_NAMES) | hybrids  # hybrids: tests/unit/test_ltmp_hybrid.py
    assert len(TRAIN_NAMES) == 7 and len(INFERENCE_NAMES) == 8


@pytest.mark.parametrize("key_file", ["ltmp_deit_small_patch16_224", "inference_ltmp_deit_tiny_patch16_224",
                                      "inference_ltmp_deit_small_patch16_224", "inference_ltmp_deit_base_patch16_224"])
def test_state_dict_layout_is_official(key_file):
    with open(os.path.join(PARITY, "keys", f"{key_file}.json")) as f:
        official = json.load(f)
    with torch.device("meta"):
        model = timm.create_model(key_file)
    ours = layout(model.state_dict())
    assert set(ours) == set(official)
    for key, (shape, dtype) in official.items():
        assert ours[key] == [shape, dtype], key
    thresholds = [k for k in ours if ltmp.is_threshold_key(k)]
    assert len(thresholds) == 24 and all(ours[k] == [[1], "torch.float32"] for k in thresholds)
    assert not list(model.buffers())


def test_official_checkpoints_load_strictly_into_both_models():
    with open(os.path.join(PARITY, "keys", "ltmp_deit_small_patch16_224.json")) as f:
        official = fill_state_dict(json.load(f))
    for name in ("ltmp_deit_small_patch16_224", "inference_ltmp_deit_small_patch16_224"):
        with torch.device("meta"):
            model = timm.create_model(name)
        model.load_state_dict(official, strict=True, assign=True)
        assert torch.equal(model.blocks[3].prune_masker.threshold, official["blocks.3.prune_masker.threshold"])


def test_checkpoints_load_strictly_both_ways():
    masked = tiny()
    set_thresholds(masked, [0.5, 0.6], [0.05, 0.06])
    inference = timm.create_model("inference_ltmp_deit_tiny_patch16_224", **TINY)
    inference.load_state_dict(masked.state_dict(), strict=True)
    assert all(torch.equal(a, b) for a, b in zip(masked.state_dict().values(), inference.state_dict().values()))
    back = timm.create_model("ltmp_deit_tiny_patch16_224", **TINY)
    back.load_state_dict(inference.state_dict(), strict=True)
    assert back.thresholds() == {"merge": pytest.approx([0.5, 0.6]), "prune": pytest.approx([0.05, 0.06])}


def test_inits_follow_the_official_code():
    masked = timm.create_model("ltmp_deit_tiny_patch16_224", **TINY)
    inference = timm.create_model("inference_ltmp_deit_tiny_patch16_224", **TINY)
    assert masked.thresholds() == {"merge": [pytest.approx(0.9)] * 2, "prune": [0.0, 0.0]}
    assert inference.thresholds() == {"merge": [1.0, 1.0], "prune": [0.0, 0.0]}
    assert masked.tau == 0.1 and masked.blocks[0].merge_masker.tau == 0.1
    assert timm.create_model("ltmp_deit_tiny_patch16_224", tau=0.5, **TINY).blocks[1].prune_masker.tau == 0.5


def test_pretrained_filter_fills_missing_thresholds():
    plain = timm.create_model("deit_tiny_patch16_224", **TINY)
    model = timm.create_model("ltmp_deit_tiny_patch16_224", **TINY)
    filtered = ltmp.checkpoint_filter_fn(plain.state_dict(), model)
    model.load_state_dict(filtered, strict=True)
    assert model.thresholds()["merge"] == [pytest.approx(0.9)] * 2
    assert torch.equal(model.blocks[1].mlp.fc1.weight, plain.blocks[1].mlp.fc1.weight)


def test_inference_twin_and_plain_twin_keep_the_weights():
    masked = tiny(depth=3)
    set_thresholds(masked, 0.5, 0.05)
    twin = ltmp.inference_twin(masked)
    assert isinstance(twin, ltmp.InferenceLTMPVisionTransformer) and not twin.training
    assert all(torch.equal(a, b) for a, b in zip(masked.state_dict().values(), twin.state_dict().values()))


# ---------------------------------------------------------------------------------------------
# Invariant 1: no reduction == plain DeiT
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["ltmp_deit_tiny_patch16_224", "inference_ltmp_deit_tiny_patch16_224"])
def test_no_reduction_equals_plain_deit(name):
    model = tiny(name, depth=3)
    set_thresholds(model, 1.5, -0.5)
    plain = timm.create_model("deit_tiny_patch16_224", **dict(TINY, depth=3))
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not ltmp.is_threshold_key(k)}, strict=True)
    plain.eval()
    x = images(3)
    with torch.no_grad():
        ours, ref = model(x), plain(x)
    assert ours.shape == (3, 10)
    assert torch.allclose(ours, ref, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# Invariants 2-3, 8: inference model against the per-sample reference, batch exactness
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_inference_model_matches_reference(config):
    model = tiny("inference_ltmp_deit_tiny_patch16_224", depth=3)
    set_thresholds(model, *CONFIGS[config])
    x = images(3, seed=11)
    for i in range(3):
        ref_logits, ref_counts, ref_size = reference_inference(model, x[i:i + 1])
        with torch.no_grad():
            out = model(x[i:i + 1])
        assert _counts(model) == ref_counts
        assert torch.allclose(out[0], ref_logits, atol=1e-5, rtol=1e-5)
        assert torch.allclose(model.ltmp_info["size"][0, :, 0], ref_size)
    if config == "mild":
        assert ref_counts[-1] < 17  # the configuration reduces something


def test_inference_lengths_follow_the_decisions_and_sizes_add_up():
    """Invariants 2-3: length = in - merged - pruned, cls stays first, sizes + pruned = N."""
    model = tiny("inference_ltmp_deit_tiny_patch16_224", depth=3)
    set_thresholds(model, [0.3, 0.4, 0.4], [0.055, 0.06, 0.065])
    x = images(4, seed=5)
    records = []

    def record(block, inputs, output):
        records.append((inputs[0].shape[1], output.shape[1]))

    handles = [b.register_forward_hook(record) for b in model.blocks]
    for i in range(4):
        records.clear()
        with torch.no_grad():
            model(x[i:i + 1])
        total = model.ltmp_info["size"][0].sum() + model.ltmp_info["pruned_size"][0]
        assert float(total) == 17.0
        lengths = [out for _, out in records]
        assert lengths == _counts(model)
        assert all(out <= inp for inp, out in records)
    for h in handles:
        h.remove()


def test_merge_kernel_several_sources_per_destination():
    """Invariant 3 on a hand-made sequence: A tokens 2 and 4 both merge into B token 1."""
    x = torch.arange(6 * 2, dtype=torch.float32).reshape(1, 6, 2) + 1
    size = torch.tensor([1.0, 2.0, 1.0, 1.0, 3.0, 1.0]).reshape(1, 6, 1)
    imp = torch.tensor([[math.inf, 0.2, 0.5, 0.1, 0.3, 0.4]])
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    # B tokens: 1 -> e1, 3 -> e2, 5 -> e2; A tokens 2, 4 -> e1 (cos 1 with token 1)
    metric = torch.stack([e2, e1, e1, 0.1 * e1 - e2, e1, e2])[None]
    out_x, out_size, valid, pruned, _ = ltmp.merge_prune_compact(
        x, size, imp, metric, torch.tensor([0.9]), torch.tensor([0.15]))
    assert valid is None
    # order: unmerged A (cls), B tokens 1, 3 (pruned: 0.1 <= 0.15), 5
    assert out_size[0, :, 0].tolist() == [1.0, 2.0 + 1.0 + 3.0, 1.0]
    expected_dst = (x[0, 1] * 2 + x[0, 2] * 1 + x[0, 4] * 3) / 6
    assert torch.allclose(out_x[0, 1], expected_dst)
    assert torch.equal(out_x[0, 0], x[0, 0])
    assert float(pruned[0]) == 1.0
    assert float(out_size.sum() + pruned.sum()) == float(size.sum())


@pytest.mark.parametrize("config", ["mild", "aggressive", "mixed_blocks"])
def test_inference_batch_equals_each_sample_alone(config):
    """Invariant 8: samples keep different numbers of tokens; no mixing between samples."""
    model = tiny("inference_ltmp_deit_tiny_patch16_224", depth=3)
    set_thresholds(model, *CONFIGS[config])
    x = images(6, seed=3)
    with torch.no_grad():
        batched = model(x)
        counts = torch.stack(model.ltmp_info["tokens"], dim=1)
        alone = []
        for i in range(6):
            alone.append(model(x[i:i + 1]))
            assert counts[i].tolist() == _counts(model)
    assert len({tuple(c) for c in counts.tolist()}) > 1  # the counts really differ
    assert torch.allclose(batched, torch.cat(alone), atol=1e-5, rtol=1e-5)
    total = (model.ltmp_info["size"][..., 0] * 1).sum(1)  # last run: batch 1
    assert float(total[0] + model.ltmp_info["pruned_size"][0]) == 17.0


def test_inference_batch_sizes_add_up_with_padding():
    model = tiny("inference_ltmp_deit_tiny_patch16_224", depth=3)
    set_thresholds(model, *CONFIGS["aggressive"])
    with torch.no_grad():
        model(images(5, seed=8))
    info = model.ltmp_info
    valid = info["valid"] if info["valid"] is not None else torch.ones(info["size"].shape[:2], dtype=torch.bool)
    survivors = (info["size"][..., 0] * valid).sum(1)
    assert torch.equal(survivors + info["pruned_size"], torch.full((5,), 17.0))
    assert torch.equal(valid.sum(1), info["tokens"][-1])


def test_inference_only_cls_left_still_runs():
    model = tiny("inference_ltmp_deit_tiny_patch16_224", depth=3)
    set_thresholds(model, 2.0, [1.0, 1.0, 1.0])  # prune everything but cls in block 0
    with torch.no_grad():
        out = model(images(2))
    assert torch.isfinite(out).all() and _counts(model) == [1, 1, 1]


# ---------------------------------------------------------------------------------------------
# Invariants 4-5: masked model
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_masked_model_matches_reference(config, training):
    model = tiny(depth=3)
    set_thresholds(model, *CONFIGS[config])
    model.train(training)
    x = images(3, seed=21)
    with torch.no_grad():
        out = model(x)
    for i in range(3):
        with torch.no_grad():
            ref_logits, ref_masks = reference_masked(model, x[i:i + 1], training=training)
        assert torch.allclose(out[i], ref_logits, atol=1e-5, rtol=1e-5)
        for ours, ref in zip(model.masks, ref_masks):
            assert torch.equal(ours[i], ref)


def test_masked_model_shapes_masks_and_monotonicity():
    """Invariant 4: shape kept, L masks of exact 0/1, a masked token never comes back."""
    model = tiny(depth=3)
    set_thresholds(model, *CONFIGS["aggressive"])
    shapes = []
    handles = [b.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape))) for b in model.blocks]
    with torch.no_grad():
        model(images(4, seed=2))
    for h in handles:
        h.remove()
    assert shapes == [(4, 17, 32)] * 3
    assert len(model.masks) == 3
    previous = torch.ones(4, 17)
    for mask in model.masks:
        assert mask.shape == (4, 17)
        assert bool(((mask == 0) | (mask == 1)).all())
        permuted = torch.cat([previous[:, ::2], previous[:, 1::2]], dim=1)  # the block's output order
        assert bool((mask <= permuted).all())
        assert bool((mask[:, 0] == 1).all())  # cls
        previous = mask
    assert float(model.masks[-1].sum()) < 4 * 17


def test_softmax_with_mask_gives_masked_keys_zero_in_eval():
    logits = torch.randn(2, 3, 5, 5)
    mask = torch.tensor([[1, 0, 1, 1, 0], [1, 1, 0, 1, 1]], dtype=torch.float32)
    probs = ltmp.softmax_with_mask(logits, mask, training=False)
    assert bool((probs[0, :, :, [1, 4]] == 0).all()) and bool((probs[1, :, :, 2] == 0).all())
    assert torch.allclose(probs.sum(-1), torch.ones(2, 3, 5))
    train_probs = ltmp.softmax_with_mask(logits, mask, training=True)
    assert bool((train_probs[0, :, :, 1] > 0).all()) and bool((train_probs[0, :, :, 1] < 1e-5).all())


def test_masked_counts_match_inference_after_block_zero():
    """Invariant 5: mask sums are the active counts; block 0 equals the inference model."""
    masked = tiny(depth=3)
    set_thresholds(masked, *CONFIGS["mild"])
    inference = tiny("inference_ltmp_deit_tiny_patch16_224", depth=3)
    inference.load_state_dict(masked.state_dict(), strict=True)
    x = images(5, seed=4)
    with torch.no_grad():
        masked(x)
        inference(x)
    active = torch.stack([m.sum(1) for m in masked.masks], dim=1).long()
    kept = torch.stack(inference.ltmp_info["tokens"], dim=1)
    assert torch.equal(active[:, 0], kept[:, 0])
    assert bool((active[:, 0] < 17).any())


# ---------------------------------------------------------------------------------------------
# Invariants 6-7: STE, gradients, FLOPs ratio
# ---------------------------------------------------------------------------------------------

def test_flops_ratio_formula():
    n, d = 17, 32
    assert abs(float(ltmp.flops_ratio([torch.ones(2, n)] * 3, n, d)) - 1.0) < 1e-6
    big = [torch.ones(4, 197)] * 12
    assert abs(float(ltmp.flops_ratio(big, 197, 768)) - 1.0) < 1e-6
    masks = [torch.tensor([[1.0] * 12 + [0.0] * 5]), torch.tensor([[1.0] * 8 + [0.0] * 9])]
    m = [1.0, 12 / 17, 8 / 17]
    expected = sum((2 * m[i] * n * d * d + (m[i] * n) ** 2 * d + 4 * m[i + 1] * n * d * d)
                   / (6 * n * d * d + n * n * d) for i in range(2)) / 2
    assert float(ltmp.flops_ratio(masks, n, d)) == pytest.approx(expected, rel=1e-6)


def test_ste_gradients_reach_only_the_thresholds():
    model = tiny(depth=2)
    set_thresholds(model, [0.5, 0.6], [0.05, 0.06])
    for block in model.blocks:
        block.merge_masker.tau = block.prune_masker.tau = 0.5
    groups = ltmp.threshold_param_groups(model, [1e-3, 1e-2])
    model.train()
    out = model(images(4, seed=6))
    loss = F.cross_entropy(out, torch.arange(4)) + (ltmp.flops_ratio(model.masks, 17, 32) - 0.5) ** 2
    loss.backward()
    for name, param in model.named_parameters():
        if ltmp.is_threshold_key(name):
            assert param.grad is not None and float(param.grad.abs()) > 0, name
        else:
            assert param.grad is None, name
    assert [g["name"] for g in groups] == ["prune_thresholds", "merge_thresholds"]
    for mask in model.masks:
        assert bool(((mask == 0) | (mask == 1)).all())


@pytest.mark.parametrize("target", [0.3, 1.0])
def test_regulariser_gradient_moves_flops_toward_target(target):
    """Invariant 6 on one block: d reg / d theta has the sign that moves flops_r to the target."""
    model = tiny(depth=1)
    set_thresholds(model, 0.5, 0.055)
    for block in model.blocks:
        block.merge_masker.tau = block.prune_masker.tau = 0.5
    ltmp.threshold_param_groups(model, [1.0])
    model.train()
    model(images(4, seed=9))
    ratio = ltmp.flops_ratio(model.masks, 17, 32)
    assert 0.3 < float(ratio.detach()) < 1.0
    ((ratio - target) ** 2).backward()
    prune_grad = float(model.blocks[0].prune_masker.threshold.grad)
    merge_grad = float(model.blocks[0].merge_masker.threshold.grad)
    # higher prune threshold -> fewer tokens; higher merge threshold -> more tokens
    if float(ratio.detach()) > target:
        assert prune_grad < 0 and merge_grad > 0  # descent raises prune and lowers merge thresholds
    else:
        assert prune_grad > 0 and merge_grad < 0


# ---------------------------------------------------------------------------------------------
# Training pieces: criterion, parameter groups, clamping, realised FLOPs
# ---------------------------------------------------------------------------------------------

def test_criterion_adds_the_regulariser_and_reads_the_output_masks():
    from losses import DistillationLoss

    model = tiny(depth=2)
    set_thresholds(model, 0.5, 0.05)
    base = DistillationLoss(torch.nn.CrossEntropyLoss(), None, "none")
    criterion = ltmp.LTMPCriterion(base, model, reduction_target=0.6, reg_scale=10.0, cls_scale=2.0)
    assert not list(criterion.parameters())
    model.train()
    x, y = images(3, seed=1), torch.tensor([1, 2, 3])
    outputs = model(x)
    assert isinstance(outputs, dict) and set(outputs) == {"logits", "masks"}
    loss = criterion(x, outputs, y)
    ratio = ltmp.flops_ratio(outputs["masks"], 17, 32)
    expected = 2.0 * F.cross_entropy(outputs["logits"], y) + 10.0 * (ratio - 0.6) ** 2
    assert torch.allclose(loss, expected)
    assert criterion.last["flops_ratio"] == pytest.approx(float(ratio.detach()))
    no_reg = ltmp.LTMPCriterion(base, model, reduction_target=0.6, reg_scale=0.0, cls_scale=2.0)
    assert torch.allclose(no_reg(x, outputs, y), F.cross_entropy(outputs["logits"], y))  # official: CE alone
    model.eval()
    with torch.no_grad():
        assert isinstance(model(x), torch.Tensor)


@pytest.mark.parametrize("lrs,groups,backbone", [([0.1], [0.1, 0.1], False), ([0.1, 0.2], [0.1, 0.2], False),
                                                 ([0.1, 0.2, 0.3], [0.1, 0.2, 0.3], True)])
def test_threshold_param_groups(lrs, groups, backbone):
    model = tiny(depth=2)
    result = ltmp.threshold_param_groups(model, lrs, weight_decay=0.05)
    assert [g["lr"] for g in result] == groups
    assert all(g["weight_decay"] == 0.05 for g in result)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all("prune_masker" in names[id(p)] for p in result[0]["params"]) and len(result[0]["params"]) == 2
    assert all("merge_masker" in names[id(p)] for p in result[1]["params"]) and len(result[1]["params"]) == 2
    for name, param in model.named_parameters():
        if "masker" in name:
            assert param.requires_grad
        elif "norm" in name:
            assert not param.requires_grad
            assert all(param is not p for g in result for p in g["params"])
        else:
            assert param.requires_grad == backbone
    if backbone:
        assert len(result[2]["params"]) == sum(1 for n, _ in model.named_parameters()
                                               if "masker" not in n and "norm" not in n)


def test_clamp_thresholds():
    model = tiny(depth=2)
    set_thresholds(model, [1.4, 0.5], [-0.2, 0.01])
    ltmp.clamp_thresholds(model)
    assert model.thresholds() == {"merge": [1.0, 0.5], "prune": [0.0, pytest.approx(0.01)]}


def test_realised_flops_ratio_counts_the_inference_twin():
    model = tiny(depth=3)
    set_thresholds(model, 1.5, -0.5)
    full = ltmp.realised_flops_ratio(model, images(2), max_images=2)
    assert full["images"] == 2 and full["counter"] == "fvcore"
    assert full["tokens_after_block"] == [17, 17, 17]
    # without reduction only the similarity matmuls are extra
    assert 1.0 <= full["flops_ratio"] < 1.05
    set_thresholds(model, *CONFIGS["aggressive"])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images(4), torch.zeros(4)), batch_size=3)
    reduced = ltmp.realised_flops_ratio(model, loader, max_images=3)
    assert reduced["images"] == 3
    assert reduced["flops_ratio"] < 0.8
    assert reduced["gmacs_unreduced"] == pytest.approx(full["gmacs_unreduced"])


# ---------------------------------------------------------------------------------------------
# Bad input: one clear line
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,word", [(dict(merge_threshold=1.5), "merge_threshold"),
                                         (dict(prune_threshold=-0.1), "prune_threshold"),
                                         (dict(merge_threshold="high"), "merge_threshold"),
                                         (dict(tau=0.0), "tau"),
                                         (dict(global_pool="avg"), "token pooling"),
                                         (dict(reg_tokens=2), "register")])
@pytest.mark.parametrize("name", ["ltmp_deit_tiny_patch16_224", "inference_ltmp_deit_tiny_patch16_224"])
def test_bad_kwargs_raise_one_line(name, kwargs, word):
    with pytest.raises(ModelConfigError) as info:
        timm.create_model(name, **dict(TINY, **kwargs))
    assert isinstance(info.value, ValueError)
    assert word in str(info.value) and "\n" not in str(info.value)


def test_bad_thresholds_and_recipe_values_raise_one_line():
    model = tiny(depth=2)
    for call in (lambda: model.set_thresholds(merge=1.2), lambda: model.set_thresholds(prune=[0.1, -1.0]),
                 lambda: model.set_thresholds(merge=[0.5]),
                 lambda: ltmp.LTMPCriterion(torch.nn.Identity(), model, reduction_target=1.5),
                 lambda: ltmp.LTMPCriterion(torch.nn.Identity(), model, reg_scale=-1),
                 lambda: ltmp.threshold_param_groups(model, [0.1, 0.2, 0.3, 0.4])):
        with pytest.raises(ModelConfigError) as info:
            call()
        assert "\n" not in str(info.value)
    model.set_thresholds(merge=[0.3, 0.4], prune=0.02)
    assert model.thresholds() == {"merge": [pytest.approx(0.3), pytest.approx(0.4)], "prune": [pytest.approx(0.02)] * 2}


# ---------------------------------------------------------------------------------------------
# Invariant 10: determinism and the parity case
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,training", [("ltmp_deit_tiny_patch16_224", False), ("ltmp_deit_tiny_patch16_224", True),
                                           ("inference_ltmp_deit_tiny_patch16_224", False)])
def test_forwards_are_deterministic(name, training):
    model = tiny(name, depth=3)
    set_thresholds(model, *CONFIGS["mild"])
    model.train(training)
    x = images(4, seed=13)
    with torch.no_grad():
        first, second = model(x), model(x)
    assert torch.equal(first, second)


def test_public_parity_case_passes():
    import check

    assert check.run_case(os.path.join(PARITY, "cases", "ltmp_small_inference.pt"), verbose=True)


# ---------------------------------------------------------------------------------------------
# Method family (models/family.py): what main.py discovers
# ---------------------------------------------------------------------------------------------

def _options(**overrides):
    from models import family

    values = dict(reduction_target=0.75, reg_scale=10.0, cls_scale=1.0, tau=0.5, ltmp_flops_images=4,
                  weight_decay=0.0, lr=[1e-3], epochs=1, input_size=32)
    values.update(overrides)
    return family.options_for(family.get_family("ltmp"), values)


def test_family_declares_the_recipe():
    from models import family

    fam = family.family_of_model("ltmp_deit_small_patch16_224")
    assert fam is not None and fam.name == "ltmp"
    assert family.family_of_model("inference_ltmp_deit_base_patch16_384") is fam
    kwargs, _ = family.model_kwargs("ltmp_deit_tiny_patch16_224", dict(tau=0.5))
    assert kwargs == {"tau": 0.5}
    masked = tiny(depth=2)
    inference = tiny("inference_ltmp_deit_tiny_patch16_224", depth=2)
    groups = fam.hooks(masked, _options()).param_groups(masked, [1e-4, 1e-2])
    assert [g["lr"] for g in groups] == [1e-4, 1e-2]
    assert fam.hooks(inference, _options()).param_groups(inference, [1e-4]) is None
    criterion = fam.hooks(masked, _options()).wrap_criterion(torch.nn.Identity(), masked)
    assert isinstance(criterion, ltmp.LTMPCriterion) and criterion.reduction_target == 0.75
    set_thresholds(masked, 1.3, -0.1)
    fam.hooks(masked, _options(reg_scale=0.0)).after_optimizer_step(masked)
    assert masked.thresholds()["merge"] == [pytest.approx(1.3)] * 2  # no clamping without the regulariser
    fam.hooks(masked, _options()).after_optimizer_step(masked)
    assert masked.thresholds() == {"merge": [1.0, 1.0], "prune": [0.0, 0.0]}
    for bad in (dict(reduction_target=0.0), dict(reg_scale=-1.0), dict(tau=0.0), dict(ltmp_flops_images=-1)):
        with pytest.raises(ModelConfigError):
            fam.check_options(_options(**bad))


@pytest.mark.slow
def test_recipe_trains_through_main_and_reports_the_realised_flops_ratio(tmp_path):
    from e2e_utils import assert_ok, read_log, run_main

    out = tmp_path / "run"
    proc = run_main(["--model", "ltmp_deit_tiny_patch16_224", "--model-kwargs",
                     "{'depth': 2, 'embed_dim': 32, 'num_heads': 2, 'patch_size': 8}", "--input-size", "32",
                     "--data-set", "SYNTHETIC", "--synthetic-train-size", "16", "--synthetic-val-size", "8",
                     "--device", "cpu", "--batch-size", "8", "--num_workers", "0", "--epochs", "1",
                     "--print-freq", "0", "--mixup", "0", "--cutmix", "0", "--aa", "none", "--reprob", "0",
                     "--no-model-ema", "--warmup-epochs", "0", "--drop-path", "0", "--weight-decay", "0",
                     "--opt", "momentum", "--momentum", "0", "--unscale-lr", "--lr", "0.000005", "0.005",
                     "--reduction-target", "0.5", "--ltmp-flops-images", "4", "--output_dir", str(out)])
    assert_ok(proc)
    report = [line for line in read_log(out) if line.get("report") == "ltmp"]
    assert len(report) == 1 and report[0]["images"] == 4
    assert 0 < report[0]["flops_ratio"] < 1.05
    ckpt = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)
    state = ckpt["model"]
    assert all(0.0 <= float(state[k]) <= 1.0 for k in state if ltmp.is_threshold_key(k))
    twin = timm.create_model("inference_ltmp_deit_tiny_patch16_224", **TINY)
    twin.load_state_dict(state, strict=True)
    bad = run_main(["--model", "ltmp_deit_tiny_patch16_224", "--reduction-target", "1.5", "--data-set", "SYNTHETIC",
                    "--device", "cpu", "--output_dir", str(tmp_path / "bad")])
    assert bad.returncode == 2 and "reduction_target must be in (0, 1]" in bad.stdout + bad.stderr


@pytest.mark.parametrize("name", ["ltmp_deit_tiny_patch16_224", "inference_ltmp_deit_tiny_patch16_224"])
def test_bf16_autocast_forward_and_backward(name):
    model = tiny(name, depth=2)
    set_thresholds(model, *CONFIGS["mild"])
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images(3))
    assert torch.isfinite(out.float()).all()
    if name.startswith("ltmp"):
        out.float().sum().backward()
        assert model.blocks[0].merge_masker.threshold.grad is not None


def test_inference_source_map_matches_sizes():
    model = tiny("inference_ltmp_deit_tiny_patch16_224", depth=3)
    set_thresholds(model, *CONFIGS["aggressive"])
    model.trace_source = True
    with torch.no_grad():
        model(images(4, seed=8))
    info = model.ltmp_info
    source, size = info["source"], info["size"][..., 0]
    valid = info["valid"] if info["valid"] is not None else torch.ones_like(size, dtype=torch.bool)
    assert torch.equal(source.sum(-1) * valid, size * valid)  # each group holds `size` original patches
    assert bool((source.sum(1) <= 1).all())  # every patch is in at most one group (or pruned)
    assert torch.equal(17 - source.sum((1, 2)), info["pruned_size"])


def test_masked_source_maps_are_traced_on_request():
    model = tiny(depth=2)
    set_thresholds(model, *CONFIGS["merge_only"])
    with torch.no_grad():
        model(images(2))
    assert model.vizs == []
    model.trace_source = True
    with torch.no_grad():
        model(images(2))
    assert [tuple(v.shape) for v in model.vizs] == [(2, 17, 17)] * 2
    # cls is never merged and never a destination: its map stays the one-hot of token 0
    assert torch.equal(model.vizs[-1][:, 0], F.one_hot(torch.zeros(2, dtype=torch.long), 17).float())
    # maps only grow by merging (amax): every token still holds its own original patch somewhere
    assert torch.equal(model.vizs[-1].amax(1), torch.ones(2, 17))


# ---------------------------------------------------------------------------------------------
# --ltmp-threshold: fixed thresholds of the inference models and the --target-gmacs search
# ---------------------------------------------------------------------------------------------

def test_fixed_thresholds_replace_loaded_ones():
    model = tiny("inference_ltmp_deit_tiny_patch16_224", ltmp_threshold=0.02)
    assert model.thresholds()["prune"] == pytest.approx([0.02, 0.02])
    assert model.thresholds()["merge"] == tiny("inference_ltmp_deit_tiny_patch16_224").thresholds()["merge"]
    learned = tiny("ltmp_deit_tiny_patch16_224")
    learned.set_thresholds(merge=[0.7, 0.8], prune=[0.001, 0.002])
    model.load_state_dict(learned.state_dict(), strict=True)
    assert model.thresholds()["prune"] == pytest.approx([0.02, 0.02])  # the rule wins over the checkpoint
    assert model.thresholds()["merge"] == pytest.approx([0.7, 0.8])  # merge thresholds as loaded
    both = tiny("inference_ltmp_deit_tiny_patch16_224", ltmp_threshold=0.01, ltmp_merge_threshold=0.95)
    both.load_state_dict(learned.state_dict(), strict=True)
    assert both.thresholds() == {"merge": pytest.approx([0.95] * 2), "prune": pytest.approx([0.01] * 2)}


@pytest.mark.parametrize("name,kwargs", [("ltmp_deit_tiny_patch16_224", dict(ltmp_threshold=0.01)),
                                         ("inference_ltmp_deit_tiny_patch16_224", dict(ltmp_threshold=1.5)),
                                         ("inference_ltmp_deit_tiny_patch16_224", dict(ltmp_threshold="auto"))])
def test_fixed_threshold_misuse_is_one_line(name, kwargs):
    with pytest.raises(ModelConfigError) as info:
        timm.create_model(name, **dict(TINY, **kwargs))
    assert "\n" not in str(info.value)


def test_threshold_search_meets_the_target_on_one_rewound_rng_state():
    """A fake model whose GMACs fall with P and depend on the random draws of build and count: every
    candidate sees the same draws (those the caller's next build and count would make), and the
    caller's RNG is left where it was."""
    torch.manual_seed(5)
    before = torch.get_rng_state()
    draws = []

    def build(p):
        return {"p": p, "w": float(torch.rand(()))}

    def gmacs_of(model):
        noise = float(torch.rand(()))
        draws.append((model["w"], noise))
        return 1.0 + 3.0 * (1.0 - model["p"]) ** 0.5 * (0.9 + 0.1 * model["w"] * noise)

    p, gmacs = ltmp.search_threshold(build, 2.0, gmacs_of)
    assert abs(gmacs - 2.0) <= 0.01 * 2.0 and 0.0 < p < 1.0
    assert len(set(draws)) == 1 and torch.equal(torch.get_rng_state(), before)
    expected = build(p)
    assert gmacs == pytest.approx(gmacs_of(expected))  # the caller's own build and count reproduce it
    for target, word in ((4.5, "above the unreduced"), (0.5, "below what the method reaches")):
        with pytest.raises(ModelConfigError, match=word):
            ltmp.search_threshold(build, target, gmacs_of)


def test_threshold_search_positions_span_zero_to_one():
    assert ltmp.threshold_of(1.0) == 0.0 and ltmp.threshold_of(0.0) == 1.0
    values = [ltmp.threshold_of(u / 10) for u in range(11)]
    assert values == sorted(values, reverse=True)
    assert ltmp.FAMILY.reduction.dest == "ltmp_threshold"


def _benchmark(*argv):
    root = os.path.join(os.path.dirname(__file__), "..", "..")
    return subprocess.run([sys.executable, "benchmark.py", *argv], cwd=root, capture_output=True, text=True,
                          timeout=1200, env=dict(os.environ, OMP_NUM_THREADS="1"))


def _record_gmacs(record: dict) -> float:
    for key in ("gmacs", "gmacs_fvcore"):
        if isinstance(record.get(key), (int, float)):
            return float(record[key])
    return _record_gmacs(record["flops"])


@pytest.mark.slow
def test_benchmark_target_gmacs_reaches_three_within_one_percent(tmp_path):
    out = tmp_path / "records.jsonl"
    proc = _benchmark("--model", "inference_ltmp_deit_small_patch16_224", "--ltmp-threshold", "auto",
                      "--target-gmacs", "3.0", "--flops-only", "--output", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(out.read_text().splitlines()[-1])
    assert abs(_record_gmacs(record) - 3.0) <= 0.03, record


@pytest.mark.slow
@pytest.mark.parametrize("target,word", [("9.0", "above the unreduced model"), ("0.1", "below what the method")])
def test_benchmark_unreachable_target_is_one_error_line(target, word):
    proc = _benchmark("--model", "inference_ltmp_deit_small_patch16_224", "--ltmp-threshold", "auto",
                      "--target-gmacs", target, "--flops-only")
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if word in line]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize("name", ["ltmp_deit_tiny_patch16_224", "inference_ltmp_deit_tiny_patch16_224"])
def test_forward_intermediates_run_with_the_ltmp_state(name):
    model = tiny(name)
    model.set_thresholds(merge=0.5, prune=0.02)
    x = images(2)
    intermediates = check_intermediates(model, x)
    if name.startswith("inference"):
        assert [y.shape[1] + 1 for y in intermediates] == [int(t.max()) for t in model.ltmp_info["tokens"]]
        assert intermediates[-1].shape[1] < intermediates[0].shape[1]
    else:
        assert len(model.masks) == len(model.blocks) and float(model.masks[-1].mean()) < 1
    with pytest.raises(ModelConfigError, match="output_fmt='NLC'"):
        model.forward_intermediates(x)


def test_no_report_line_when_the_flops_count_is_switched_off(tmp_path, caplog):
    from types import SimpleNamespace

    import main
    args = main.parse_args(["--model", "ltmp_deit_tiny_patch16_224", "--ltmp-flops-images", "0", "--device", "cpu"])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images(4), torch.zeros(4)), batch_size=2)
    from models import family

    def run_for(args):
        model = tiny()
        hooks = family.training_hooks(model, args.model, args)
        return SimpleNamespace(model_without_ddp=model, val_loader=loader, parts=SimpleNamespace(hooks=hooks))

    log_path = tmp_path / "log.txt"
    caplog.set_level("INFO")
    main.report_families(args, run_for(args), torch.device("cpu"), str(log_path))
    assert not log_path.exists() and not [r for r in caplog.records if "ltmp report" in r.getMessage()]
    args.ltmp_flops_images = 2
    main.report_families(args, run_for(args), torch.device("cpu"), str(log_path))
    assert json.loads(log_path.read_text())["images"] == 2
