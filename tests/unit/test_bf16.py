"""bf16 inference: `engine.cast_for_inference`, token-selection scores in fp32, benchmark precisions.

bf16 results differ between CPUs (AMX or not), so nothing here compares exact bf16
values: properties (dtypes, the fp32 path of bf16 inputs), tolerances, and decisions
whose scores are far apart.
"""
import json
import math

import pytest
import timm
import torch

import benchmark
from utils import measure
import models  # noqa: F401  (registers the project's models)
import models.ltm
import models.ltmp
from models import ltmp_layers
import models.tome
from engine import autocast_in, cast_for_inference
from models import token_ops

VIT = dict(img_size=64, patch_size=16, embed_dim=48, num_heads=3, num_classes=10)


def _images(batch=2, seed=0):
    return torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def _randomize(model, seed=0):
    """Weights with non-trivial scale everywhere (timm zero-inits biases and sets gains to 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() <= 1 and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(max(p[0].numel(), 1)))
    return model


def test_cast_for_inference_casts_weights_inputs_and_outputs():
    model = timm.create_model("deit_tiny_patch16_224", **dict(VIT, depth=2)).eval()
    assert cast_for_inference(model, torch.bfloat16) is model
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        out = model(_images())  # fp32 images: the pre-hook casts them
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    hooks = len(model._forward_pre_hooks)
    cast_for_inference(model, torch.bfloat16)  # again: no second hook
    assert len(model._forward_pre_hooks) == hooks == 1


def test_cast_for_inference_fp32_is_a_no_op():
    model = timm.create_model("deit_tiny_patch16_224", **dict(VIT, depth=1)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for dtype in (None, torch.float32):
        cast_for_inference(model, dtype)
    assert not model._forward_pre_hooks
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_cast_keeps_ltm_mask_scalars_fp32_and_computes_masks_in_fp32():
    model = timm.create_model("ltm_vit_small_patch16_224", **dict(VIT, depth=2, compression_ratio=0.8)).eval()
    cast_for_inference(model, torch.bfloat16)
    block = model.blocks[0]
    assert block.mask_module.logit_scale.dtype == torch.float32 == block.mask_module.prev_weight.dtype
    assert block.attn.qkv.weight.dtype == torch.bfloat16
    masks = []
    block.mask_module.register_forward_hook(lambda m, a, out: masks.append(out.mask))
    with torch.no_grad():
        model(_images())
    assert masks[0].dtype == torch.float32
    torch.testing.assert_close(masks[0].sum(-1), torch.ones_like(masks[0][..., 0]))


def test_ltm_mask_is_fp32_even_after_a_plain_bf16_cast():
    mask_module = models.ltm.LTMMaskModule(0.8).to(torch.bfloat16)
    tokens = torch.randn(2, 16, 8, dtype=torch.bfloat16)
    state = mask_module(tokens, (4, 4))
    assert state.mask.dtype == torch.float32


@pytest.mark.parametrize("mode", ["bf16 tensors", "autocast"])
def test_class_attention_is_the_fp32_path_of_its_inputs(mode):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 1, 16, generator=g).bfloat16()
    k = torch.randn(2, 3, 10, 16, generator=g).bfloat16()
    expected = token_ops.class_attention(q.float(), k.float(), 0.25)
    if mode == "autocast":
        with autocast_in("cpu", torch.bfloat16):
            got = token_ops.class_attention(q.float(), k.float(), 0.25)
    else:
        got = token_ops.class_attention(q, k, 0.25)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["bf16 tensors", "autocast"])
def test_bipartite_matching_is_the_fp32_path_of_its_metric(mode):
    metric = torch.randn(2, 17, 8, generator=torch.Generator().manual_seed(1)).bfloat16()
    expected = token_ops.bipartite_soft_matching(metric.float(), 4, class_token=True)
    if mode == "autocast":
        with autocast_in("cpu", torch.bfloat16):
            got = token_ops.bipartite_soft_matching(metric.float(), 4, class_token=True)
    else:
        got = token_ops.bipartite_soft_matching(metric, 4, class_token=True)
    for a, b in zip(got[:3], expected[:3]):
        assert torch.equal(a, b)


def test_tome_merge_metric_is_fp32_in_a_bf16_model():
    model = models.tome.patch(timm.create_model("deit_tiny_patch16_224", **dict(VIT, depth=1)), r=2).eval()
    cast_for_inference(model, torch.bfloat16)
    tokens = torch.randn(2, 17, 48, dtype=torch.bfloat16)
    out, metric = models.tome._attention_with_metric(model.blocks[0].attn, tokens, None)
    assert out.dtype == torch.bfloat16 and metric.dtype == torch.float32


@pytest.mark.parametrize("mode", ["bf16 weights", "autocast"])
def test_ltmp_importance_and_merge_scores_are_fp32_in_a_bf16_model(mode):
    model = timm.create_model("ltmp_deit_tiny_patch16_224", **dict(VIT, depth=1)).eval()
    tokens = torch.randn(2, 17, 48)
    size = torch.ones(2, 17, 1)
    mask = torch.ones(2, 17)
    attn = model.blocks[0].attn
    _, metric32, importance32 = models.ltmp.ltmp_attention(attn, tokens, size, mask=mask)
    if mode == "bf16 weights":
        cast_for_inference(model, torch.bfloat16)
        context, tokens, size, mask = torch.no_grad(), tokens.bfloat16(), size.bfloat16(), mask.bfloat16()
    else:
        context = autocast_in("cpu", torch.bfloat16)
    with context:
        out, metric, importance = models.ltmp.ltmp_attention(attn, tokens, size, mask=mask)
        normed = metric / metric.norm(dim=-1, keepdim=True)
        node_max, _ = ltmp_layers._best_partner(normed)
    assert out.dtype == torch.bfloat16
    assert metric.dtype == importance.dtype == node_max.dtype == torch.float32
    expected, _ = ltmp_layers._best_partner(normed.float())  # the scores: the fp32 path of the metric
    assert torch.equal(node_max, expected)
    # only the bf16 inputs of the scores differ from fp32, not their accumulation
    torch.testing.assert_close(importance[:, 1:], importance32[:, 1:], rtol=0.05, atol=1e-3)


def test_well_separated_evit_selection_survives_bf16():
    """Class attention with a clear winner set: bf16 q/k keep exactly the tokens fp32 keeps."""
    g = torch.Generator().manual_seed(2)
    k = torch.randn(2, 3, 12, 16, generator=g)
    q = torch.randn(2, 3, 1, 16, generator=g)
    # tokens 0..5 get a large positive logit shift along q, the rest a negative one
    direction = q / q.norm(dim=-1, keepdim=True)
    shift = torch.tensor([4.0] * 6 + [-4.0] * 6)[None, None, :, None]
    k = k + shift * direction * 4
    scores32 = token_ops.class_attention(q, k, 0.25)
    scores16 = token_ops.class_attention(q.bfloat16(), k.bfloat16(), 0.25)
    x = torch.randn(2, 13, 8, generator=g)
    _, idx32 = token_ops.keep_topk_tokens(x, scores32[:, 1:], 5)
    _, idx16 = token_ops.keep_topk_tokens(x.bfloat16(), scores16[:, 1:], 5)
    assert [set(r) for r in idx32.tolist()] == [set(r) for r in idx16.tolist()]


@pytest.mark.parametrize("name,kwargs", [
    ("deit_tiny_patch16_shrink_base", dict(depth=4, drop_loc=(1, 2), base_keep_rate=0.7, fuse_token=True)),
    ("deit_tiny_patch16_224", dict(depth=3)),
])
def test_bf16_model_stays_close_to_fp32(name, kwargs):
    """Logits within a few percent of the fp32 logit scale; EViT keeps mostly the same tokens."""
    model = _randomize(timm.create_model(name, **dict(VIT, **kwargs))).eval()
    if name == "deit_tiny_patch16_224":
        models.tome.patch(model, r=2)
    x = _images()
    with torch.no_grad():
        ref = model(x, get_idx=True) if "shrink_base" in name else (model(x), None)
        cast = cast_for_inference(model, torch.bfloat16)
        out = cast(x, get_idx=True) if "shrink_base" in name else (cast(x), None)
    scale = ref[0].abs().max().item()
    assert (out[0].float() - ref[0]).abs().max().item() <= 0.1 * scale
    if ref[1] is not None:  # first pruning block: same inputs up to bf16 rounding
        first32, first16 = ref[1][0].tolist(), out[1][0].tolist()
        same = sum(len(set(a) & set(b)) for a, b in zip(first32, first16))
        assert same >= 0.75 * sum(len(a) for a in first32)


def test_benchmark_precisions_and_peak_dtype():
    cpu = torch.device("cpu")
    assert measure.autocast_dtype("bf16-weights", cpu) is None
    assert measure.weights_dtype("bf16-weights") == torch.bfloat16 and measure.weights_dtype("bf16") is None
    assert measure.compute_dtype("bf16", cpu) == measure.compute_dtype("bf16-weights", cpu) == torch.bfloat16
    assert measure.compute_dtype("amp", cpu) == torch.bfloat16
    assert measure.compute_dtype("fp32", cpu) == torch.float32
    peak = measure.measure_peak_gflops("cpu", size=64, repeats=1, dtype=torch.bfloat16)
    assert peak["peak_dtype"] == "bfloat16" and peak["peak_gflops"] > 0


def test_benchmark_bf16_weights_casts_and_records_it():
    model = timm.create_model("deit_tiny_patch16_224", **dict(VIT, depth=1)).eval()
    result = measure.measure_inference(model, 2, 64, "cpu", precision="bf16-weights", warmup=1, rounds=1,
                                         iters_per_round=1)
    assert result["weights_dtype"] == "bfloat16" and result["autocast_dtype"] is None
    assert next(model.parameters()).dtype == torch.bfloat16


def test_benchmark_cli_bf16_weights_with_peak(tmp_path):
    out = tmp_path / "r.jsonl"
    argv = ["--model", "test_vit", "--img-size", "32", "--batch-size", "2", "--warmup", "1", "--rounds", "1",
            "--iters-per-round", "1", "--precision", "bf16-weights", "--peak", "--peak-size", "64",
            "--output", str(out)]
    assert benchmark.main(argv) == 0
    record = json.loads(out.read_text().splitlines()[0])
    assert record["precision"] == "bf16-weights" and record["weights_dtype"] == "bfloat16"
    assert record["peak_dtype"] == "bfloat16" and record["pct_of_peak"] > 0
