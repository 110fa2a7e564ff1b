"""PiToMe patch (models/pitome.py): the checks of docs/methods/pitome.md ("Checks"),
against an independent per-sample loop reference of the official algorithm."""
import copy
import math

import pytest
import timm
import torch
from timm.models.vision_transformer import Block

import models  # noqa: F401  (registers the models)
from models import pitome
from models.errors import ModelConfigError
from models.token_ops import bipartite_soft_matching, merge_tokens
from vit_utils import tiny_vit

def make_vit(name="deit_small_patch16_224", img_size=64, patch_size=8, depth=4, **kwargs):
    torch.manual_seed(0)
    return tiny_vit(name, img_size, patch_size=patch_size, depth=depth, **kwargs)


def images(batch=2, size=64, seed=1):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------
# An independent reference: one sample at a time, explicit attention, Python loops and
# Python's (stable) sort, written from the method's description rather than the module.
# ---------------------------------------------------------------------------

def _elu(z, alpha):
    return z if z > 0 else alpha * (math.exp(z) - 1.0)


def _reference_merge(tokens, sizes, keys, prefix, r, margin, alpha, bsm):
    """tokens: list of [C] rows, sizes: list of floats, keys: [N, d]. Returns merged tokens and sizes."""
    patch_keys = keys[prefix:]
    t = patch_keys.shape[0]
    unit = [patch_keys[j] / max(float(patch_keys[j].norm()), 1e-12) for j in range(t)]
    cos = [[float(unit[j] @ unit[o]) for o in range(t)] for j in range(t)]
    energy = [sum(_elu(cos[j][o] - margin, alpha) for o in range(t)) / t for j in range(t)]
    order = sorted(range(t), key=lambda j: -energy[j])  # stable: ties keep sequence order

    def best_partner(a, candidates):
        best, where = -math.inf, None
        for pos, b in enumerate(candidates):
            if cos[a][b] > best:  # strict: the first maximum wins
                best, where = cos[a][b], pos
        return best, where

    if bsm:
        set_a, set_b = order[0::2], order[1::2]
        scored = [(best_partner(a, set_b), a) for a in set_a]
        ranked = sorted(scored, key=lambda item: -item[0][0])
        merged = [(a, pos) for (score, pos), a in ranked[:r]]
        kept = [a for _, a in ranked[r:]]
    else:
        set_a, set_b = order[0:2 * r:2], order[1:2 * r:2]
        merged = [(a, best_partner(a, set_b)[1]) for a in set_a]
        kept = order[2 * r:]
    patch_tokens, patch_sizes = tokens[prefix:], sizes[prefix:]
    groups = {pos: [set_b[pos]] for pos in range(len(set_b))}
    for a, pos in merged:
        groups[pos].append(a)
    out_tokens, out_sizes = list(tokens[:prefix]), list(sizes[:prefix])
    for j in kept:
        out_tokens.append(patch_tokens[j])
        out_sizes.append(patch_sizes[j])
    for pos in range(len(set_b)):
        members = groups[pos]
        total = sum(patch_sizes[j] for j in members)
        out_tokens.append(sum(patch_tokens[j] * patch_sizes[j] for j in members) / total)
        out_sizes.append(total)
    return out_tokens, out_sizes


@torch.no_grad()
def reference_logits(model, x, ratio, m0=0.75, bsm_layers=None, alpha=1.0, prop_attn=False, margins=None):
    """The official PiToMe forward, one sample at a time (model: an unpatched timm ViT)."""
    depth = len(model.blocks)
    bsm_layers = range(math.ceil(depth / 2)) if bsm_layers is None else bsm_layers
    margins = margins or [m0 - m0 * (i / depth) for i in range(depth)]
    ratios = ratio if isinstance(ratio, list) else [ratio] * depth
    prefix = model.num_prefix_tokens
    out = []
    for b in range(x.shape[0]):
        h = model.norm_pre(model._pos_embed(model.patch_embed(x[b:b + 1])))[0]
        sizes = [1.0] * h.shape[0]
        for i, blk in enumerate(model.blocks):
            lam = blk.attention_weight() if hasattr(blk, "attention_weight") else 1.0
            if not getattr(blk, "has_attention", True) or lam == 0.0:
                h = blk(h[None])[0]
                continue
            n = h.shape[0]
            attn = blk.attn
            qkv = attn.qkv(blk.norm1(h)).reshape(n, 3, attn.num_heads, attn.head_dim).permute(1, 2, 0, 3)
            q, k, v = qkv[0], qkv[1], qkv[2]
            logits = (q @ k.transpose(-1, -2)) * attn.scale
            if prop_attn:
                logits = logits + torch.tensor(sizes, dtype=h.dtype).log()[None, None, :]
            a = attn.proj((logits.softmax(-1) @ v).transpose(0, 1).reshape(n, -1))
            h = (2 - lam) * h + lam * blk.ls1(a) if lam != 1.0 else h + blk.ls1(a)
            t = n - prefix
            r = math.floor(t - t * ratios[i]) if ratios[i] < 1 else 0
            if r > 0:
                rows, sizes = _reference_merge(list(h), sizes, k.mean(0), prefix, r, margins[i], alpha,
                                               i in bsm_layers)
                h = torch.stack(rows)
            h = h + blk.ls2(blk.mlp(blk.norm2(h)))
        out.append(model.forward_head(model.norm(h)[None]))
    return torch.cat(out)


def double(model):
    return copy.deepcopy(model).double()


CONFIGS = [
    pytest.param(dict(name="deit_small_patch16_224", ratio=0.9), id="deit-ratio0.9"),
    pytest.param(dict(name="deit_small_patch16_224", ratio=0.5), id="deit-ratio0.5"),
    pytest.param(dict(name="deit_small_patch16_224", ratio=0.7, depth=5), id="deit-odd-depth"),
    pytest.param(dict(name="deit_small_patch16_224", ratio=[0.8, 1.0, 0.6, 0.95]), id="ratio-list"),
    pytest.param(dict(name="deit_small_patch16_224", ratio=0.8, m0=0.9), id="margin0.9"),
    pytest.param(dict(name="deit_small_patch16_224", ratio=0.8, bsm_layers=[2, 3]), id="mae-order"),
    pytest.param(dict(name="deit_small_patch16_224", ratio=0.8, alpha=0.5, prop_attn=True), id="alpha-prop-attn"),
    pytest.param(dict(name="deit_small_patch16_224", ratio=0.75, init_values=0.5), id="layerscale"),
    pytest.param(dict(name="deit_tiny_distilled_patch16_224", ratio=0.8), id="distilled"),
]


@pytest.mark.parametrize("config", CONFIGS)
def test_logits_equal_the_loop_reference(config):
    config = dict(config)
    name = config.pop("name")
    depth = config.pop("depth", 4)
    init_values = config.pop("init_values", None)
    base = double(make_vit(name, depth=depth, init_values=init_values))
    x = images().double()
    expected = reference_logits(base, x, **config)
    kwargs = dict(ratio=config["ratio"], margin=config.get("m0", 0.75), bsm_layers=config.get("bsm_layers"),
                  alpha=config.get("alpha", 1.0), prop_attn=config.get("prop_attn", False))
    model = pitome.patch(copy.deepcopy(base), **kwargs)
    with torch.no_grad():
        got = model(x)
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)
    # the run merged: the reference is not trivially the unmerged model
    assert model._pitome_info["tokens"][-1] < 64 + base.num_prefix_tokens


def test_float32_merges_like_float64():
    """The selection maths in float32 picks the same merges as in float64 (no near-ties here)."""
    base = make_vit()
    model = pitome.patch(copy.deepcopy(base), ratio=0.8, trace_source=True)
    model64 = pitome.patch(double(base), ratio=0.8, trace_source=True)
    x = images()
    with torch.no_grad():
        y32, y64 = model(x), model64(x.double())
    assert torch.equal(model._pitome_info["source"].double(), model64._pitome_info["source"])
    torch.testing.assert_close(y32.double(), y64, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------
# Check 1: ratio 1 is the unpatched model; unpatch / re-patch; state dict unchanged
# ---------------------------------------------------------------------------

def test_ratio_one_equals_unpatched_and_unpatch_restores():
    base = make_vit()
    x = images()
    with torch.no_grad():
        expected = base(x)
    model = copy.deepcopy(base)
    classes = [type(m) for m in model.modules()]
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    pitome.patch(model)
    assert pitome.is_patched(model) and model.ratio == 1.0
    assert model.state_dict().keys() == keys.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in keys.items())
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
        model.ratio = 0.8
        merged = model(x)
    pitome.unpatch(model)
    assert [type(m) for m in model.modules()] == classes and not pitome.is_patched(model)
    assert not any(hasattr(m, "_pitome_cfg") for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    # patching twice equals patching once; the second call's settings win
    twice = pitome.patch(pitome.patch(copy.deepcopy(base), ratio=0.6, margin=0.1), ratio=0.8)
    once = pitome.patch(copy.deepcopy(base), ratio=0.8)
    assert type(twice) is type(once) and type(twice).__mro__.count(pitome.PiToMeModelMixin) == 1
    with torch.no_grad():
        assert torch.equal(twice(x), once(x)) and torch.equal(once(x), merged)


def test_ratio_set_after_patching_equals_ratio_at_patch_time():
    base = make_vit()
    x = images()
    late = pitome.patch(copy.deepcopy(base))
    late.ratio = 0.85
    early = pitome.patch(copy.deepcopy(base), ratio=0.85)
    with torch.no_grad():
        assert torch.equal(late(x), early(x))


def test_a_tome_patch_is_replaced():
    from models import tome
    base = make_vit()
    model = pitome.patch(tome.patch(copy.deepcopy(base), r=4), ratio=0.8)
    assert not isinstance(model, tome.ToMeModelMixin)
    assert not any(isinstance(m, tome.ToMeBlockMixin) for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(images()), pitome.patch(copy.deepcopy(base), ratio=0.8)(images()))


# ---------------------------------------------------------------------------
# Checks 2, 3: token counts, sizes, sources
# ---------------------------------------------------------------------------

def test_token_counts_of_deit_at_224():
    """Section 5's table: DeiT at 224 px (196 patches, 12 blocks); a narrow model, same counts."""
    model = timm.create_model("deit_tiny_patch16_224", embed_dim=24, num_heads=2, num_classes=4).eval()
    pitome.patch(model, ratio=0.9)
    outs = []
    for block in model.blocks:
        block.register_forward_hook(lambda m, a, out: outs.append(out.shape[1]))
    with torch.no_grad():
        model(torch.randn(2, 3, 224, 224))
    assert outs == [178, 161, 145, 131, 118, 107, 97, 88, 80, 73, 66, 60]
    assert outs == model._pitome_info["tokens"] == pitome.expected_tokens(model)
    table = {0.975: [193, 189, 185, 181, 177, 173, 169, 165, 161, 157, 154, 151],
             0.95: [188, 179, 171, 163, 155, 148, 141, 134, 128, 122, 116, 111],
             0.925: [183, 170, 158, 147, 137, 127, 118, 110, 102, 95, 88, 82],
             0.9125: [180, 165, 151, 138, 127, 116, 106, 97, 89, 82, 75, 69]}
    for ratio, counts in table.items():
        assert pitome.token_counts(196, 1, [ratio] * 12) == counts


def test_merge_count_uses_python_doubles():
    assert pitome.merge_count(200, 0.545) == 90  # exact decimals would give 91
    assert pitome.merge_count(196, 0.925) == 14 and pitome.merge_count(10, 1.0) == 0
    assert pitome.merge_count(5, 0.5) == 2


def test_official_flops_formula_reproduces_the_published_values():
    published = {1.0: (1.225, 4.541, 17.447), 0.975: (1.072, 4.002, 15.439), 0.95: (0.926, 3.482, 13.484),
                 0.925: (0.813, 3.069, 11.913), 0.9125: (0.755, 2.857, 11.103), 0.9: (0.712, 2.698, 10.496)}
    for ratio, values in published.items():
        ours = tuple(round(pitome.official_flops(196, 1, dim, [ratio] * 12) / 1e9, 3) for dim in (192, 384, 768))
        assert ours == values


@pytest.mark.parametrize("name", ["deit_small_patch16_224", "deit_tiny_distilled_patch16_224"])
def test_sizes_and_sources(name):
    model = pitome.patch(make_vit(name, depth=6), ratio=0.6, trace_source=True)
    prefix = model.num_prefix_tokens
    sizes_seen = []

    def check_state(module, args, out):
        state = model._pitome_cfg.slot.state
        sizes_seen.append(state.size.clone())
        assert state.size.shape[1] == out.shape[1]
        assert state.source.shape[1] == out.shape[1]
    for block in model.blocks:
        block.register_forward_hook(check_state)
    with torch.no_grad():
        model(images(3))
    for size in sizes_seen:
        assert torch.equal(size, size.round()) and (size > 0).all()
        assert (size.sum(dim=1) == 64 + prefix).all()
        assert (size[:, :prefix] == 1).all()
    info = model._pitome_info
    source, size = info["source"], info["size"]
    assert (source.sum(dim=1) == 1).all()  # every original token in exactly one group
    torch.testing.assert_close(source.sum(dim=2, keepdim=True), size)
    eye = torch.eye(64 + prefix)[:prefix]
    assert torch.equal(source[:, :prefix], eye.expand(3, -1, -1))  # cls (and dist) stay first, alone


# ---------------------------------------------------------------------------
# Check 4: energies and margins
# ---------------------------------------------------------------------------

def test_margin_schedule():
    assert pitome.margin_schedule(0.75, 12) == [0.75 - 0.0625 * i for i in range(12)]
    assert pitome.margin_schedule([0.1, 0.2], 2) == [0.1, 0.2]
    assert pitome.default_bsm_layers(12) == list(range(6)) and pitome.default_bsm_layers(5) == [0, 1, 2]
    model = pitome.patch(make_vit(depth=12), margin=0.9)
    assert model._pitome_cfg.margins == [0.9 - 0.9 * (i / 12) for i in range(12)]


def test_energy_on_a_hand_made_metric():
    metric = torch.tensor([[[1.0, 0.0], [2.0, 0.0], [0.0, 3.0], [1.0, 1.0]]], dtype=torch.float64)
    unit = metric / metric.norm(dim=-1, keepdim=True)
    energy, sim = pitome.energy_scores(metric, margin=0.25, alpha=0.5)
    for j in range(4):
        terms = [_elu(float(unit[0, j] @ unit[0, o]) - 0.25, 0.5) for o in range(4)]
        assert energy[0, j].item() == pytest.approx(sum(terms) / 4, abs=1e-12)
    assert sim[0, 0, 0].item() == pytest.approx(1.0)


# ---------------------------------------------------------------------------
# Checks 5, 6: the two selection rules
# ---------------------------------------------------------------------------

def _metric(batch=2, tokens=20, dim=8, seed=0):
    return torch.randn(batch, tokens, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_protect_rule_passes_the_low_energy_tokens_through():
    metric = _metric()
    batch, tokens, _ = metric.shape
    r = 6
    x = torch.randn(batch, tokens + 1, 5, dtype=torch.float64)
    size = torch.randint(1, 5, (batch, tokens + 1, 1)).double()
    size[:, 0] = 1
    match = pitome.pitome_match(metric, r, margin=0.3, bsm=False)
    merged, new_size = pitome.merge_wavg(match, x, size)
    assert merged.shape[1] == tokens + 1 - r
    energy, _ = pitome.energy_scores(metric, 0.3)
    for b in range(batch):
        low = set(energy[b].argsort(descending=True)[2 * r:].tolist())
        assert set(match.keep[b].tolist()) == low
        protected = match.keep[b]
        torch.testing.assert_close(merged[b, 1:1 + len(low)], x[b, 1:][protected])
        assert torch.equal(new_size[b, 1:1 + len(low)], size[b, 1:][protected])
        high = set(energy[b].argsort(descending=True)[:2 * r].tolist())
        assert set(match.src[b].tolist()) | set(match.dst[b].tolist()) == high
        assert len(set(match.src[b].tolist())) == r  # exactly r of the 2r high-energy tokens disappear
    torch.testing.assert_close(merged[:, 0], x[:, 0])


def test_bsm_rule_is_tome_matching_on_the_energy_sorted_tokens():
    metric = _metric(tokens=21)
    x = torch.randn(2, 21, 6, dtype=torch.float64)
    energy, _ = pitome.energy_scores(metric, 0.5)
    order = energy.argsort(dim=-1, descending=True)
    sorted_metric = metric.gather(1, order[..., None].expand_as(metric))
    sorted_x = x.gather(1, order[..., None].expand_as(x))
    for r in (1, 5, 10):
        expected = merge_tokens(sorted_x, bipartite_soft_matching(sorted_metric, r), mode="sum")
        match = pitome.pitome_match(metric, r, margin=0.5, bsm=True)
        assert torch.equal(pitome.merge_sum(x, match, num_prefix=0), expected)


def test_stable_sort_and_first_index_argmax_on_ties():
    metric = torch.tensor([[[1.0, 0.0]] * 4 + [[0.0, 1.0]] * 2])  # two clusters of exact ties
    match = pitome.pitome_match(metric, 2, margin=0.5, bsm=False)
    # energies: the 4 equal tokens tie (highest), then the 2 equal ones; stable order 0, 1, 2, 3
    assert match.src.tolist() == [[0, 2]] and match.dst.tolist() == [[1, 3]] and match.keep.tolist() == [[4, 5]]
    assert match.dst_pos.tolist() == [[0, 0]]  # equal similarities: the first destination wins
    bsm = pitome.pitome_match(metric, 1, margin=0.5, bsm=True)
    assert bsm.src.tolist() == [[0]] and bsm.keep.tolist() == [[2, 4]] and bsm.dst.tolist() == [[1, 3, 5]]


# ---------------------------------------------------------------------------
# Checks 7-11
# ---------------------------------------------------------------------------

def test_batch_independence_and_determinism():
    model = pitome.patch(make_vit(), ratio=0.75)
    x = images(3)
    with torch.no_grad():
        batched = model(x)
        alone = torch.cat([model(x[i:i + 1]) for i in range(3)])
        again = model(x)
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)
    assert torch.equal(batched, again)


def test_train_mode_with_drop_path_zero_equals_eval():
    model = pitome.patch(make_vit(), ratio=0.75)
    x = images()
    with torch.no_grad():
        expected = model(x)
        model.train()
        torch.testing.assert_close(model(x), expected, atol=1e-6, rtol=1e-6)


def test_distillation_token_is_protected():
    model = pitome.patch(make_vit("deit_tiny_distilled_patch16_224", depth=6), ratio=0.5, trace_source=True)
    with torch.no_grad():
        model(images())
    source = model._pitome_info["source"]
    assert source[:, 1, 1].eq(1).all() and source[:, 1].sum(-1).eq(1).all()
    assert source[:, :, 1].sum(-1).eq(1).all() and model._pitome_info["size"][:, 1].eq(1).all()


def test_prop_attn_reaches_attention_only_when_asked(monkeypatch):
    seen = []
    original = pitome.attention_with_keys

    def spy(attn, x, size=None):
        seen.append(None if size is None else size.clone())
        return original(attn, x, size)
    monkeypatch.setattr(pitome, "attention_with_keys", spy)
    x = images()
    with torch.no_grad():
        pitome.patch(make_vit(), ratio=0.8)(x)
        assert seen and all(s is None for s in seen)
        seen.clear()
        pitome.patch(make_vit(), ratio=0.8, prop_attn=True)(x)
    assert seen[0] is None and all(s is not None for s in seen[1:])
    assert [s.shape[1] for s in seen[1:]] == [53, 43, 35]


def test_prop_attn_merging_identical_tokens_leaves_other_outputs_unchanged():
    from models.token_ops import attention_with_keys
    block = make_vit().blocks[0]
    tokens = torch.randn(1, 6, 48, dtype=torch.float64)
    block = block.double()
    duplicated = torch.cat([tokens, tokens[:, 2:3]], dim=1)  # token 2 twice
    with torch.no_grad():
        full = attention_with_keys(block.attn, duplicated).out
        size = torch.ones(1, 6, 1, dtype=torch.float64)
        size[0, 2] = 2
        merged = attention_with_keys(block.attn, tokens, size).out
    torch.testing.assert_close(merged, full[:, :6], atol=1e-12, rtol=1e-12)


def test_backward_gives_finite_gradients_everywhere():
    model = pitome.patch(make_vit(), ratio=0.7).train()
    out = model(images())
    out.logsumexp(-1).sum().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name


@pytest.mark.parametrize("bad", [0.49, 1.01, -1, float("nan"), "0.9", True, [0.9] * 3, [0.9, 0.9, 0.4, 0.9]])
def test_bad_ratio_is_a_config_error(bad):
    with pytest.raises(ModelConfigError, match="ratio"):
        pitome.patch(make_vit(), ratio=bad)
    model = pitome.patch(make_vit(), ratio=0.9)
    with pytest.raises(ModelConfigError, match="ratio"):
        model.ratio = bad
    assert model.ratio == 0.9


@pytest.mark.parametrize("kwargs", [dict(margin=[0.5]), dict(margin=float("inf")), dict(margin="0.75"),
                                    dict(bsm_layers=[4]), dict(bsm_layers="0"), dict(alpha=0.0)])
def test_bad_settings_are_config_errors(kwargs):
    with pytest.raises(ModelConfigError, match="PiToMe"):
        pitome.patch(make_vit(), **kwargs)


def test_a_block_with_r_zero_runs_unchanged():
    """16 patches at ratio 0.97: r = floor(16 - 15.52) = 0 in every block: the model is timm's."""
    base = make_vit(patch_size=16)
    model = pitome.patch(copy.deepcopy(base), ratio=0.97)
    x = images()
    with torch.no_grad():
        assert torch.equal(model(x), base(x))
    assert model._pitome_info["tokens"] == [17] * 4 and model._pitome_info["size"] is None


@pytest.mark.parametrize("name,kwargs,why", [
    ("vit_small_patch16_224", dict(class_token=False, global_pool="avg"), "class token"),
    ("vit_small_patch16_224", dict(reg_tokens=4), "register tokens"),
    ("vit_small_patch16_224", dict(global_pool="map"), "global_pool"),
    ("deit_small_patch16_shrink_base", dict(drop_loc=(1,)), "EViT"),
])
def test_unsupported_models_are_refused(name, kwargs, why):
    model = timm.create_model(name, img_size=64, embed_dim=48, num_heads=3, depth=2, num_classes=4, **kwargs)
    with pytest.raises(ModelConfigError, match=why):
        pitome.patch(model)


def test_non_vit_models_are_refused():
    model = timm.create_model("resnet10t", num_classes=4)
    with pytest.raises(ModelConfigError, match="VisionTransformer"):
        pitome.patch(model)


# ---------------------------------------------------------------------------
# Attention-shrink models, pooling, precision
# ---------------------------------------------------------------------------

def test_attention_free_blocks_never_merge_and_keep_their_schedule_position():
    base = timm.create_model("deit_tiny_patch16_224_shrink", img_size=64, patch_size=8, embed_dim=48, num_heads=3,
                             depth=4, num_classes=10, done_layer=[1]).eval()
    x = images()
    model = pitome.patch(copy.deepcopy(base), ratio=[0.9, 0.5, 0.8, 0.8])
    with torch.no_grad():
        got = model(x)
    assert model._pitome_info["tokens"] == [59, 59, 48, 39]  # block 1's ratio 0.5 is not used
    assert model._pitome_info["tokens"] == pitome.expected_tokens(model)
    torch.testing.assert_close(got, reference_logits(base, x, [0.9, 0.5, 0.8, 0.8]), atol=1e-5, rtol=1e-5)


def test_lambda_blocks_merge_after_the_diluted_residual():
    base = timm.create_model("deit_tiny_patch16_224_copy_lambda", img_size=64, patch_size=8, embed_dim=48,
                             num_heads=3, depth=4, num_classes=10, prune_layer=[1], done_layer=[3]).eval().double()
    base.set_lambda(0.4)
    x = images().double()
    model = pitome.patch(copy.deepcopy(base), ratio=0.8)
    with torch.no_grad():
        got = model(x)
    assert model._pitome_info["tokens"] == [53, 43, 35, 35]  # block 3 (lambda 0) does not merge
    torch.testing.assert_close(got, reference_logits(base, x, 0.8), atol=1e-10, rtol=1e-10)
    model.set_lambda(0.0)
    assert pitome.expected_tokens(model) == [53, 53, 43, 43]


def test_avg_pool_weights_tokens_by_size():
    model = pitome.patch(make_vit("vit_small_patch16_224", global_pool="avg", fc_norm=False), ratio=0.6)
    x = images()
    captured = {}
    model.norm.register_forward_hook(lambda m, a, out: captured.update(features=out))
    with torch.no_grad():
        logits = model(x)
    size = model._pitome_info["size"][:, 1:]
    pooled = (captured["features"][:, 1:] * size).sum(1) / size.sum(1)
    torch.testing.assert_close(logits, model.head(pooled))


def test_selection_is_float32_under_bf16_autocast():
    metric = _metric(tokens=30).float()
    expected = pitome.pitome_match(metric, 8, margin=0.5, bsm=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = pitome.pitome_match(metric, 8, margin=0.5, bsm=True)
        got_bf16_input = pitome.pitome_match(metric.bfloat16(), 8, margin=0.5, bsm=True)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert got_bf16_input.keep.dtype == torch.long
    model = pitome.patch(make_vit(), ratio=0.8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(images())
    assert model._pitome_info["size"].dtype == torch.float32
    assert model._pitome_info["tokens"] == pitome.expected_tokens(model)


def test_forward_intermediates_follow_the_merges():
    model = pitome.patch(make_vit(), ratio=0.8)
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(images(), output_fmt="NLC")
        features = model.forward_features(images())
    torch.testing.assert_close(final, features)
    assert [y.shape[1] for y in intermediates] == [c - 1 for c in pitome.expected_tokens(model)]


def test_blocks_keep_timms_signature():
    model = pitome.patch(make_vit(), ratio=0.8)
    assert all(isinstance(b, Block) for b in model.blocks)
    x = torch.randn(2, 10, 48)
    torch.testing.assert_close(model.blocks[0](x), Block.forward(model.blocks[0], x))  # outside a forward: timm's


# ---------------------------------------------------------------------------
# The family: Examples, hooks, --target-gmacs, the visualisation
# ---------------------------------------------------------------------------

def test_examples_build_patched_and_merge():
    from models.factory import build_example
    for example in pitome.FAMILY.examples:
        model = build_example(example).eval()
        assert pitome.is_patched(model)
        calls = []
        for block in model.blocks:
            block.register_forward_hook(lambda m, a, out: calls.append(type(out)))
        with torch.no_grad():
            model(torch.randn(2, 3, example.input_size, example.input_size))
        assert calls == [torch.Tensor] * len(model.blocks)  # each block's hook fires once, with a Tensor
        tokens = model._pitome_info["tokens"]
        assert tokens == pitome.expected_tokens(model) and tokens[-1] < tokens[0]


def test_hooks_log_the_ratio_and_tokens_and_report_the_official_flops():
    from types import SimpleNamespace
    model = pitome.patch(make_vit(), ratio=[0.8, 0.9, 1.0, 0.7])
    hooks = pitome.PiToMeHooks(model, SimpleNamespace(input_size=64))
    assert hooks.log_state(model) == {"pitome_ratio": pytest.approx(0.85)}
    with torch.no_grad():
        model(images())
    assert hooks.log_state(model)["pitome_tokens"] == pitome.expected_tokens(model)[-1] == 34
    report = hooks.report(model, None)
    assert report["pitome_tokens_per_block"] == [53, 48, 48, 34]
    dim, counts_in = 48, [65, 53, 48, 48]
    expected = sum(12 * n * dim * dim + 2 * n * n * dim for n in counts_in) / 1e9
    assert report["pitome_official_gflops"] == pytest.approx(expected)


def test_target_gmacs_search_finds_the_ratio():
    from models import flops

    def build(ratio):
        return pitome.patch(make_vit(depth=2), ratio=ratio)

    def gmacs_of(model):
        return flops.count_flops(model, 64)["gmacs"]
    low, high = gmacs_of(build(0.5)), gmacs_of(build(1.0))
    target = (low + high) / 2
    ratio, gmacs = pitome.FAMILY.reduction.search(build, target, gmacs_of)
    assert 0.5 < ratio < 1.0 and gmacs == gmacs_of(build(ratio))
    assert abs(gmacs - target) < 0.05 * (high - low)
    with pytest.raises(ModelConfigError, match="below what the method reaches"):
        pitome.FAMILY.reduction.search(build, low * 0.5, gmacs_of)


def test_fvcore_counts_the_real_token_counts_and_the_similarity():
    """GMACs of a patched model = the unpatched blocks' cost at each block's real lengths + the T x T similarity."""
    from models import flops
    model = pitome.patch(make_vit(depth=4), ratio=0.75)
    base = make_vit(depth=4)
    dim, hidden, prefix = 48, 192, 1
    counts_in = [65] + pitome.expected_tokens(model)[:-1]
    counts_out = pitome.expected_tokens(model)

    def block_macs(n_in, n_out):
        attention = n_in * dim * 3 * dim + 2 * n_in * n_in * dim + n_in * dim * dim
        return attention + n_out * 2 * dim * hidden + 5 * dim * (n_in + n_out)  # + the two LayerNorms
    plain = flops.count_flops(base, 64)["gmacs"] * 1e9
    merged = flops.count_flops(model, 64)["gmacs"] * 1e9
    similarity = sum((n - prefix) ** 2 * (dim // 3) for n in counts_in)
    saved = sum(block_macs(65, 65) - block_macs(i, o) for i, o in zip(counts_in, counts_out))
    final_norm = 5 * dim * (65 - counts_out[-1])
    assert merged == pytest.approx(plain - saved - final_norm + similarity, rel=1e-9)


def test_visualisation_writes_an_image(tmp_path):
    from PIL import Image
    from tools import pitome_visualize
    out = tmp_path / "groups.png"
    rc = pitome_visualize.main(["--model", "deit_small_patch16_224", "--model-kwargs",
                                "{'depth': 4, 'embed_dim': 48, 'num_heads': 3}", "--input-size", "64",
                                "--pitome-ratio", "0.6", "--out", str(out)])
    assert rc == 0 and Image.open(out).size == (128, 64)
    model = pitome.patch(make_vit(patch_size=16, depth=4), ratio=0.6)
    maps = pitome_visualize.group_maps(model, images(2), blocks=1)
    assert len(maps) == 2 and maps[0].shape == (1 + 16 - 6, 17)  # after block 0 only: r = floor(16 - 9.6) = 6
    assert model._pitome_cfg.ratios == [0.6] * 4 and not model._pitome_cfg.trace_source  # settings restored
    assert pitome_visualize.main(["--model", "deit_small_patch16_224", "--model-kwargs", "{'depth': 2}",
                                  "--input-size", "64", "--blocks", "5", "--out", str(out)]) == 2


def test_selection_is_float32_in_a_bf16_model(monkeypatch):
    seen = []
    original = pitome.energy_scores

    def spy(metric, margin, alpha=1.0):
        seen.append(metric.dtype)
        energy, sim = original(metric, margin, alpha)
        seen.append(sim.dtype)
        return energy, sim
    monkeypatch.setattr(pitome, "energy_scores", spy)
    model = pitome.patch(make_vit(), ratio=0.8).to(torch.bfloat16)
    with torch.no_grad():
        out = model(images().to(torch.bfloat16))
    assert out.dtype == torch.bfloat16 and seen and set(seen) == {torch.float32}
    assert model._pitome_info["size"].dtype == torch.float32
    assert model._pitome_info["tokens"] == pitome.expected_tokens(model)
