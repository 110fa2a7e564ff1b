"""DiffRate (models/diffrate.py): the checks of docs/methods/diffrate.md (the spec's section 14) and more.

The references below restate the official forward independently: an explicit attention
matrix, the ranking and the merge per sample with Python loops (evaluation), and the
official training forward with its autograd functions (straight-through ceil and min, the
looped keep probabilities).
"""
import copy
import json
import math
import os

import pytest
import timm
import torch
import torch.nn.functional as F

import models  # noqa: F401  (registers the models)
from models import diffrate
from models.errors import ModelConfigError
from vit_utils import check_intermediates

TINY = dict(embed_dim=48, num_heads=3, num_classes=10)


def make_model(depth=4, img_size=64, patch_size=16, name="vit_deit_small_patch16_224", **kwargs):
    """A small DiffRate DeiT (16 patches at 64 px) in eval mode."""
    return timm.create_model(name, img_size=img_size, patch_size=patch_size, depth=depth, **TINY, **kwargs).eval()


def make_deit(depth=4, img_size=64, **kwargs):
    return timm.create_model("deit_small_patch16_224", img_size=img_size, depth=depth, **TINY, **kwargs).eval()


def randomize_proxies(model, scale=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in model.blocks[1:]:
            for proxy in (block.prune_ddp, block.merge_ddp):
                proxy.selected_probability.copy_(torch.randn(proxy.selected_probability.shape, generator=g) * scale)


# ---------------------------------------------------------------------------
# references
# ---------------------------------------------------------------------------

class RefSTECeil(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.ceil(x)

    @staticmethod
    def backward(ctx, g):
        return g


class RefSTEMin(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, c):
        return torch.minimum(torch.minimum(a, b), c)

    @staticmethod
    def backward(ctx, g):
        return None, g, g


def ref_attention(blk, x, size, mask=None):
    a = blk.attn
    B, N, C = x.shape
    qkv = a.qkv(blk.norm1(x)).reshape(B, N, 3, a.num_heads, C // a.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = (q @ k.transpose(-2, -1)) * a.scale + size.log()[:, None, None, :, 0]
    if mask is None:
        attn = attn.softmax(dim=-1)
    else:
        eps = 1e-6
        pol = mask.reshape(B, 1, 1, N)
        eye = torch.eye(N, dtype=pol.dtype).view(1, 1, N, N)
        pol = pol + (1.0 - pol) * eye
        e = (attn - attn.max(dim=-1, keepdim=True)[0]).exp() * pol
        attn = (e + eps / N) / (e.sum(dim=-1, keepdim=True) + eps)
    out = a.proj((attn @ v).transpose(1, 2).reshape(B, N, C))
    return out, attn


def ref_eval_forward(model, images, prune, merge):
    """Evaluation forward with per-sample loops for every selection. Returns (logits, sizes, sources, tokens)."""
    x = model._pos_embed(model.patch_embed(images))
    B, T, C = x.shape
    size = torch.ones(B, T, 1, dtype=x.dtype)
    source = torch.eye(T, dtype=x.dtype)[None].repeat(B, 1, 1)
    tokens = []
    for i, blk in enumerate(model.blocks):
        out, attn = ref_attention(blk, x, size)
        x = x + out
        n = x.shape[1]
        p_num, m_num = prune[i], merge[i]
        xs, sizes, sources = [], [], []
        for b in range(B):
            scores = attn[b, :, 0, 1:].mean(0).tolist()
            order = [0] + [1 + j for j in sorted(range(n - 1), key=lambda j: -scores[j])]
            order = order[:min(p_num, n)]
            xb, sb, ob = x[b, order], size[b, order], source[b, order]
            if m_num < p_num and m_num < len(order):
                dst, src = list(range(m_num)), list(range(m_num, len(order)))
                unit = xb / xb.norm(dim=-1, keepdim=True)
                groups = {d: [] for d in dst}
                for s in src:
                    sims = [float(unit[s] @ unit[d]) for d in dst[1:]]
                    best = max(range(len(sims)), key=lambda j: (sims[j], -j))
                    groups[dst[1 + best]].append((s, sims[best]))
                new_x, new_s, new_o = [], [], []
                for d in dst:
                    members = [s for s, _ in groups[d]]
                    new_x.append((xb[d] + sum((xb[s] for s in members), torch.zeros(C, dtype=x.dtype)))
                                 / (1 + len(members)))
                    new_s.append(sb[d] + sum((sb[s] * sim for s, sim in groups[d]), torch.zeros(1, dtype=x.dtype)))
                    new_o.append(torch.stack([ob[d]] + [ob[s] for s in members]).amax(0))
                xb, sb, ob = torch.stack(new_x), torch.stack(new_s), torch.stack(new_o)
            xs.append(xb)
            sizes.append(sb)
            sources.append(ob)
        x, size, source = torch.stack(xs), torch.stack(sizes), torch.stack(sources)
        tokens.append(x.shape[1])
        x = x + blk.mlp(blk.norm2(x))
    return model.forward_head(model.norm(x)), size, source, tokens


def ref_kept(proxy):
    p = proxy.selected_probability.softmax(dim=-1)
    return RefSTECeil.apply(torch.matmul(proxy.kept_token_candidate, p)) + 1, p


def ref_token_mask(proxy, kept, active, length):
    _, p = ref_kept(proxy)
    prob = torch.zeros(length)
    for c, pk in zip(proxy.kept_token_candidate, p):
        prob[:int(c + 1)] += pk
    mask = torch.ones_like(prob)
    mask[int(kept):int(active)] = 0
    return mask - prob.detach() + prob


def ref_train_forward(model, images):
    """The official training forward restated (sequence stays full length). Returns (logits, flops, kept lists)."""
    x = model._pos_embed(model.patch_embed(images))
    B, T, C = x.shape
    size = torch.ones(B, T, 1)
    mask = torch.ones(B, T)
    prune_list, merge_list = [], []
    for blk in model.blocks:
        out, attn = ref_attention(blk, x, size, mask)
        x = x + out
        cls_attn = attn[:, :, 0, 1:].mean(dim=1)
        idx = torch.sort(cls_attn, descending=True, stable=True).indices
        idx = torch.cat([torch.zeros(B, 1, dtype=torch.long), idx + 1], dim=1)
        x = x.gather(1, idx[..., None].expand(-1, -1, C))
        size = size.gather(1, idx[..., None])
        mask = mask.gather(1, idx)
        last = int(mask[0].sum())
        kp, _ = ref_kept(blk.prune_ddp)
        prune_list.append(kp)
        if kp < last:
            mask = mask * ref_token_mask(blk.prune_ddp, kp, last, T).expand(B, -1)
        mid = min(last, int(kp))
        km, _ = ref_kept(blk.merge_ddp)
        merge_list.append(km)
        if km < mid:
            merge_mask = ref_token_mask(blk.merge_ddp, km, mid, T)
            k = int(km)
            head = x[:, :mid]
            with torch.no_grad():
                metric = head / head.norm(dim=-1, keepdim=True)
                sim = metric[:, k:] @ metric[:, :k].transpose(-1, -2)
                sim[..., :, 0] = -math.inf
                node_max, node_idx = sim.max(dim=-1)
            dst_idx = node_idx[..., None]
            merged = head[:, :k].scatter_reduce(1, dst_idx.expand(-1, -1, C), head[:, k:], reduce="mean")
            x = torch.cat([merged, head[:, k:], x[:, mid:]], dim=1)
            s = torch.cat([size[:, :k], size[:, k:mid] * node_max[..., None]], dim=1).clamp(1)
            s_merged = s[:, :k].scatter_reduce(1, dst_idx, s[:, k:], reduce="sum")
            size = torch.cat([s_merged, s[:, k:], size[:, mid:]], dim=1)
            mask = mask * merge_mask
        x = x + blk.mlp(blk.norm2(x))
    logits = model.forward_head(model.norm(x))
    n = torch.tensor(float(T))
    flops = 0
    for kp, km in zip(prune_list, merge_list):
        flops += 4 * n * C * C + 2 * n * n * C
        n = RefSTEMin.apply(n, kp, km)
        flops += 8 * n * C * C
    flops += T * C * (model.patch_embed.patch_size[0] ** 2 * 3) + C * model.num_classes
    return logits, flops, prune_list, merge_list


SMALL_SCHEDULE = ([17, 15, 15, 12], [17, 12, 9, 6])  # prune-only, prune+merge, merge-only, both (16 patches)


# ---------------------------------------------------------------------------
# evaluation numerics
# ---------------------------------------------------------------------------

def test_no_reduction_equals_deit():
    """Check 1: P = M = all tokens gives plain DeiT."""
    deit = make_deit()
    model = make_model(prune_kept_num=[17] * 4, merge_kept_num=[17] * 4)
    sd = {k: v for k, v in model.state_dict().items() if "_ddp." not in k}
    model.load_state_dict({**model.state_dict(), **deit.state_dict()}, strict=True)
    assert sd.keys() == deit.state_dict().keys()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), deit(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("schedule", [SMALL_SCHEDULE, ([17, 9, 17, 5], [17, 17, 4, 2]), ([14, 17, 16, 12], [11, 13, 15, 7])])
def test_eval_matches_per_sample_reference(schedule):
    """Checks 2, 4, 5: token counts, kept sets, source->destination pairs, unweighted means, sizes."""
    model = make_model(prune_kept_num=schedule[0], merge_kept_num=schedule[1], trace_source=True).double()
    x = torch.randn(3, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        out = model(x)
        ref, size, source, tokens = ref_eval_forward(model, x, *schedule)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    assert model._diffrate_info["tokens"] == tokens == diffrate.tokens_per_block(*schedule, 17)
    torch.testing.assert_close(model._diffrate_info["size"], size, atol=1e-10, rtol=1e-10)
    assert torch.equal(model._diffrate_info["source"], source)


def test_eval_matches_reference_in_float32_at_224():
    """DeiT-S 2.9 schedule at 224 px (small width): fp32 model vs the float64 reference."""
    model = timm.create_model("vit_deit_small_patch16_224", target_flops=2.9, **TINY).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        out = model(x)
        ref = ref_eval_forward(model.double(), x.double(), *model.get_kept_num())[0]
    assert model._diffrate_info["tokens"] == [197, 194, 176, 156, 141, 133, 121, 107, 88, 64, 56, 3]
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)


def test_source_groups_and_class_token():
    """Check 5: with trace_source every original token is in at most one group, pruned ones in none;
    the class token stays first and alone."""
    model = make_model(prune_kept_num=SMALL_SCHEDULE[0], merge_kept_num=SMALL_SCHEDULE[1], trace_source=True)
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64))
    source = model._diffrate_info["source"]
    assert source.shape == (2, 6, 17)
    assert torch.all(source.sum(dim=1) <= 1)
    assert torch.equal(source[:, 0], F.one_hot(torch.tensor(0), 17).float().expand(2, -1))
    # sizes are similarity-weighted counts: each group's size lies between 1 and its member count
    size = model._diffrate_info["size"][..., 0]
    members = source.sum(dim=-1)
    assert torch.all(size >= 1 - 1e-6) and torch.all(size <= members + 1e-6)


def test_prune_keeps_top_class_attention():
    """Check 4: after a prune-only block the patch tokens kept are those with the P - 1 largest head-mean
    class attentions (computed here from the block's input with an explicit attention matrix)."""
    model = make_model(prune_kept_num=[10, 17, 17, 17], merge_kept_num=[17] * 4, trace_source=True)
    x = torch.randn(2, 3, 64, 64)
    captured = {}
    model.blocks[0].register_forward_pre_hook(lambda m, args: captured.setdefault("x", args[0]))
    with torch.no_grad():
        model(x)
        _, attn = ref_attention(model.blocks[0], captured["x"], torch.ones(2, 17, 1))
    top = attn[:, :, 0, 1:].mean(1).topk(9, dim=1).indices + 1
    kept = model._diffrate_info["source"][:, 1:].argmax(dim=-1)
    assert torch.equal(kept.sort(dim=1).values, top.sort(dim=1).values)


def test_duplicate_token_merge_keeps_feature_and_adds_size():
    """Check 5: a source identical to a destination leaves the feature unchanged and adds exactly its size."""
    x = torch.randn(1, 5, 8)
    x[0, 4] = x[0, 2]
    size = torch.tensor([[[1.0], [2.0], [3.0], [1.0], [1.5]]])
    node_max, node_idx = diffrate.match_to_destinations(x, 4)
    assert node_idx.tolist() == [[2]] and node_max.item() == pytest.approx(1.0, abs=1e-6)
    merged = diffrate.merge_into(x[:, :4], x[:, 4:], node_idx, "mean")
    torch.testing.assert_close(merged, x[:, :4])
    new_size = diffrate.merge_into(size[:, :4], size[:, 4:] * node_max[..., None], node_idx, "sum")
    torch.testing.assert_close(new_size[0, :, 0], torch.tensor([1.0, 2.0, 4.5, 1.0]))


def test_merge_never_targets_class_token():
    x = torch.randn(2, 6, 8)
    x[:, 5] = x[:, 0]  # a source identical to the class token still goes elsewhere
    _, node_idx = diffrate.match_to_destinations(x, 3)
    assert torch.all(node_idx >= 1)


def test_batch_independent_and_deterministic():
    """Check 6."""
    model = make_model(prune_kept_num=SMALL_SCHEDULE[0], merge_kept_num=SMALL_SCHEDULE[1])
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        out = model(x)
        again = model(x)
        alone = torch.cat([model(x[i:i + 1]) for i in range(4)])
    assert torch.equal(out, again)
    torch.testing.assert_close(alone, out, atol=1e-5, rtol=0)


def test_shipped_schedules_tokens_and_flops():
    """Checks 2, 3: the shipped table's token counts and the official GFLOPs (3 decimals)."""
    table = diffrate.load_schedules()
    dims = {"ViT-T-DeiT": 192, "ViT-S-DeiT": 384, "ViT-B-DeiT": 768}
    assert set(table) == set(dims)
    for key, entries in table.items():
        for flops_key, entry in entries.items():
            prune, merge = entry["prune_kept_num"], entry["merge_kept_num"]
            tokens = diffrate.tokens_per_block(prune, merge, 197)
            expected = merge if (key, flops_key) != ("ViT-T-DeiT", "1.0") else \
                [197, 197, 196, 190, 186, 154, 148, 148, 145, 135, 125, 21]
            assert tokens == expected, (key, flops_key)
            gflops = diffrate.inference_flops(dims[key], 196, 256, 1000, prune, merge) / 1e9
            assert round(gflops, 3) == entry["official_gflops"], (key, flops_key)
            assert abs(gflops - float(flops_key)) / float(flops_key) < 0.1  # DeiT-T 0.6 reaches 0.655
    for key, unreduced in (("ViT-T-DeiT", 1.254), ("ViT-S-DeiT", 4.599), ("ViT-B-DeiT", 17.564)):
        full = [197] * 12
        assert round(diffrate.inference_flops(dims[key], 196, 256, 1000, full, full) / 1e9, 3) == unreduced


def test_schedule_file_is_plain_json():
    with open(diffrate.SCHEDULE_FILE) as f:
        raw = json.load(f)
    entry = raw["ViT-S-DeiT"]["2.9"]
    assert isinstance(entry["prune_kept_num"], list) and all(isinstance(v, int) for v in entry["prune_kept_num"])


def test_registered_models_pick_their_table():
    for name, key, flops in (("vit_deit_tiny_patch16_224", "ViT-T-DeiT", 0.9),
                             ("vit_deit_small_patch16_224", "ViT-S-DeiT", 2.9),
                             ("vit_deit_base_patch16_224", "ViT-B-DeiT", 11.5)):
        with torch.device("meta"):
            model = timm.create_model(name, target_flops=flops)
        assert model.get_kept_num() == diffrate.shipped_schedule(key, flops)
        assert round(model.calculate_flop_inference() / 1e9, 3) == \
            diffrate.load_schedules()[key][str(flops)]["official_gflops"]


def test_patch_deit_equals_registered_model():
    deit = timm.create_model("deit_small_patch16_224", **TINY).eval()
    registered = timm.create_model("vit_deit_small_patch16_224", target_flops=2.9, **TINY).eval()
    diffrate.patch(deit, target_flops=2.9, schedule_key="ViT-S-DeiT")
    registered.load_state_dict(deit.state_dict(), strict=True)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(deit(x), registered(x))


# ---------------------------------------------------------------------------
# schedules, state dict, patch / unpatch
# ---------------------------------------------------------------------------

def test_state_dict_layout_matches_official(shared_dir):
    for keys_file, name, kwargs in (("vit_deit_small_patch16_224.json", "vit_deit_small_patch16_224", {}),
                                    ("vit_deit_tiny_patch16_224__granularity_1.json", "vit_deit_tiny_patch16_224",
                                     {"granularity": 1})):
        with open(os.path.join(shared_dir, "parity", "keys", keys_file)) as f:
            layout = json.load(f)
        with torch.device("meta"):
            model = timm.create_model(name, **kwargs)
        state = model.state_dict()
        assert {k: [list(v.shape), str(v.dtype)] for k, v in state.items()} == layout


def test_proxy_shapes_and_initial_kept_numbers():
    """Checks 7 and 9: candidates 196, 192, ... (g = 4), one candidate in block 0; init 101 / 100 / 100."""
    for granularity, init in ((4, 101), (2, 100), (1, 100)):
        with torch.device("meta"):
            shapes = timm.create_model("vit_deit_tiny_patch16_224", granularity=granularity)
        assert shapes.blocks[0].prune_ddp.kept_token_candidate.shape == (1,)
        assert shapes.blocks[1].merge_ddp.kept_token_candidate.shape == (math.ceil(196 / granularity),)
        model = timm.create_model("vit_deit_tiny_patch16_224", granularity=granularity, depth=3, embed_dim=12,
                                  num_heads=1, num_classes=2)
        assert model.blocks[1].prune_ddp.kept_token_candidate[:3].tolist() == [196, 196 - granularity,
                                                                               196 - 2 * granularity]
        assert model.get_kept_num() == ([197, init, init], [197, init, init])


def test_searched_checkpoint_evaluates_its_own_schedule(tmp_path):
    """Check 9 / DESIGN CHOICE: kept numbers follow the loaded selected_probability; an explicit schedule wins."""
    model = make_model()
    randomize_proxies(model)
    expected = model.get_kept_num()
    assert expected != ([17] * 4, [17] * 4)
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": model.state_dict()}, path)
    fresh = make_model()
    fresh.load_state_dict(torch.load(path, weights_only=True)["model"], strict=True)
    assert fresh.get_kept_num() == expected
    explicit = make_model(prune_kept_num=SMALL_SCHEDULE[0], merge_kept_num=SMALL_SCHEDULE[1])
    explicit.load_state_dict(torch.load(path, weights_only=True)["model"], strict=True)
    assert explicit.get_kept_num() == (list(SMALL_SCHEDULE[0]), list(SMALL_SCHEDULE[1]))
    explicit.set_kept_num(None, None)
    assert explicit.get_kept_num() == expected
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = fresh(x)
        ref = ref_eval_forward(fresh, x, *expected)[0]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_patch_unpatch_round_trip_and_idempotent():
    """Check 10."""
    deit = make_deit()
    original_state = copy.deepcopy(deit.state_dict())
    classes = {name: type(m) for name, m in deit.named_modules()}
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        plain = deit(x)
    diffrate.patch(deit, prune_kept_num=SMALL_SCHEDULE[0], merge_kept_num=SMALL_SCHEDULE[1])
    assert diffrate.is_patched(deit)
    randomize_proxies(deit)
    state_once = copy.deepcopy(deit.state_dict())
    with torch.no_grad():
        once = deit(x)
    diffrate.patch(deit, prune_kept_num=SMALL_SCHEDULE[0], merge_kept_num=SMALL_SCHEDULE[1])
    with torch.no_grad():
        assert torch.equal(deit(x), once)
    assert all(torch.equal(v, deit.state_dict()[k]) for k, v in state_once.items())
    diffrate.unpatch(deit)
    assert not diffrate.is_patched(deit)
    assert {name: type(m) for name, m in deit.named_modules()} == classes
    assert deit.state_dict().keys() == original_state.keys()
    with torch.no_grad():
        assert torch.equal(deit(x), plain)


def test_repatch_with_other_granularity_resets_proxies():
    model = make_model()
    randomize_proxies(model)
    diffrate.patch(model, granularity=2)
    assert model.blocks[1].prune_ddp.kept_token_candidate.shape == (8,)
    assert torch.all(model.blocks[1].prune_ddp.selected_probability == 0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(prune_kept_num=[17, 17, 17], merge_kept_num=[17] * 4), "3 entries for 4 blocks"),
    (dict(prune_kept_num=[17] * 4, merge_kept_num=None), "needs both"),
    (dict(prune_kept_num=[17, 0, 17, 17], merge_kept_num=[17] * 4), "ints in [1, 17]"),
    (dict(prune_kept_num=[17, 18, 17, 17], merge_kept_num=[17] * 4), "ints in [1, 17]"),
    (dict(prune_kept_num=[17, 9.0, 17, 17], merge_kept_num=[17] * 4), "ints in [1, 17]"),
    (dict(prune_kept_num=[17] * 4, merge_kept_num=[17, 1, 17, 17]), "merge numbers must be >= 2"),
    (dict(target_flops=2.9, prune_kept_num=[17] * 4, merge_kept_num=[17] * 4), "not both"),
    (dict(target_flops=2.9), "shipped schedules are for 224-px, 12-block DeiT-T/S/B"),
    (dict(granularity=0), "granularity must be an int >= 1"),
])
def test_bad_schedules_raise_one_line(kwargs, message):
    with pytest.raises(ModelConfigError) as err:
        diffrate.patch(make_deit(), **kwargs)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_merge_of_one_allowed_where_nothing_is_merged():
    # block 1 keeps 1 token by pruning: a merge number of 1 there merges nothing (valid)
    diffrate.patch(make_deit(), prune_kept_num=[17, 1, 17, 17], merge_kept_num=[17, 1, 1, 1])


def test_unknown_shipped_flops_lists_the_keys():
    with pytest.raises(ModelConfigError, match=r"no ViT-S-DeiT schedule for 2.8 GFLOPs; available: 2.3, 2.5"):
        timm.create_model("vit_deit_small_patch16_224", target_flops=2.8)


@pytest.mark.parametrize("name, kwargs, message", [
    ("deit_small_distilled_patch16_224", {}, "no distillation or register tokens"),
    ("vit_small_patch16_224", dict(reg_tokens=2), "no distillation or register tokens"),
    ("vit_small_patch16_224", dict(class_token=False, global_pool="avg"), "class token"),
    ("deit_small_patch16_shrink_base", dict(drop_loc=(1,)), "EViTBlock"),
])
def test_unsupported_models_are_refused(name, kwargs, message):
    model = timm.create_model(name, img_size=64, depth=2, **TINY, **kwargs)
    with pytest.raises(ModelConfigError, match=message):
        diffrate.patch(model)


def test_tome_patched_model_is_refused():
    from models import tome
    model = tome.patch(make_deit(), r=2)
    with pytest.raises(ModelConfigError, match="ToMe"):
        diffrate.patch(model)


# ---------------------------------------------------------------------------
# training forward (the search)
# ---------------------------------------------------------------------------

def test_training_forward_matches_official_restatement():
    """Logits, FLOPs and the gradients of every proxy against the restated official training forward."""
    torch.manual_seed(1)
    model = make_model(depth=4, granularity=2)
    randomize_proxies(model, scale=1.5, seed=3)
    model.train()
    x = torch.randn(2, 3, 64, 64)
    target = torch.tensor([1, 7])
    ref_model = copy.deepcopy(model)

    logits, flops = model(x, return_flop=True)
    assert model._diffrate_info["size"].shape == (2, 17, 1)
    loss = F.cross_entropy(logits, target) + 5 * (flops / 1e9 - 1e-4) ** 2
    loss.backward()

    ref_logits, ref_flops, prune_list, merge_list = ref_train_forward(ref_model, x)
    ref_loss = F.cross_entropy(ref_logits, target) + 5 * (ref_flops / 1e9 - 1e-4) ** 2
    ref_loss.backward()
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(flops, ref_flops)
    assert model.get_kept_num() == ([int(k) for k in prune_list], [int(k) for k in merge_list])
    for (name, p), (_, q) in zip(model.named_parameters(), ref_model.named_parameters()):
        if "selected_probability" in name:
            torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-4, msg=name)


def test_training_sequence_length_masks_and_kept_numbers():
    """Check 7: the sequence stays full length, masks are exactly 0/1, kept numbers as the proxies say."""
    model = timm.create_model("vit_deit_small_patch16_224", depth=3, **TINY).train()
    lengths = []
    for block in model.blocks:
        block.register_forward_hook(lambda m, i, o: lengths.append(o.shape[1]))
    masks = []
    original = diffrate.DiffRateBlockMixin._search_forward

    def spy(self, x, state):
        out = original(self, x, state)
        masks.append(state.mask.detach().clone())
        return out
    diffrate.DiffRateBlockMixin._search_forward = spy
    try:
        model(torch.randn(2, 3, 224, 224))
    finally:
        diffrate.DiffRateBlockMixin._search_forward = original
    assert lengths == [197, 197, 197]
    for mask in masks:
        assert torch.all((mask == 0) | (mask == 1))
    assert [int(m[0].sum()) for m in masks] == [197, 101, 101]
    assert model._diffrate_info["tokens"] == [197, 101, 101]
    assert model.get_kept_num() == ([197, 101, 101], [197, 101, 101])


def test_training_gradients_only_through_masks_and_flops():
    """Check 8: CE reaches theta only through the masks of later blocks; the FLOPs term pushes the
    expected kept numbers down above the target and up below it, in both proxies of a block."""
    model = make_model(depth=3, granularity=1).train()
    randomize_proxies(model, scale=0.5)
    x = torch.randn(2, 3, 64, 64)
    logits, flops = model(x, return_flop=True)
    F.cross_entropy(logits, torch.tensor([0, 1])).backward()
    last = model.blocks[-1]
    assert last.prune_ddp.selected_probability.grad is None or torch.all(last.prune_ddp.selected_probability.grad == 0)
    assert model.blocks[1].prune_ddp.selected_probability.grad.abs().sum() > 0
    for sign, target in ((1, 1e-6), (-1, 1e3)):
        model.zero_grad()
        _, flops = model(x, return_flop=True)
        (5 * (flops / 1e9 - target) ** 2).backward()
        for block in model.blocks[1:]:
            for proxy in (block.prune_ddp, block.merge_ddp):
                theta = proxy.selected_probability
                c = proxy.kept_token_candidate
                p = theta.softmax(-1)
                # d E[c] / d theta = p * (c - E[c]); a descent step moves E[c] by -lr * sum(grad * that)
                dexp = p * (c - (c * p).sum())
                assert sign * (theta.grad * dexp).sum() > 0


def test_search_loss_output_and_flops_training():
    model = make_model(depth=3)
    model.set_flops_loss(0.001, weight=5.0)
    model.train()
    out = model(torch.randn(2, 3, 64, 64))
    assert set(out) == {"logits", "aux_loss", "gflops"}
    expected = 5.0 * (model.calculate_flop_training() / 1e9 - 0.001) ** 2
    torch.testing.assert_close(out["aux_loss"], expected)
    model.eval()
    assert isinstance(model(torch.randn(1, 3, 64, 64)), torch.Tensor)
    with pytest.raises(ModelConfigError):
        model.set_flops_loss(-1.0)


@pytest.mark.parametrize("fraction", [0.65, 0.95])
def test_search_reaches_flops_target(fraction):
    """A synthetic search: only the proxies train (the backbone frozen) and the FLOPs approach the
    target from the initial schedule (about half the tokens), downwards and upwards."""
    torch.manual_seed(0)
    model = make_model(depth=4, granularity=1)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.arch_parameters():
        p.requires_grad_(True)
    full = diffrate.inference_flops(48, 16, 256, 10, [17] * 4, [17] * 4) / 1e9
    target = fraction * full
    model.set_flops_loss(target, weight=5.0 / full ** 2)  # the official weight, scaled to this model's GFLOPs
    optimizer = torch.optim.AdamW(model.arch_parameters(), lr=0.05, weight_decay=0)
    model.train()
    x, y = torch.randn(8, 3, 64, 64), torch.randint(0, 10, (8,))
    start = None
    for _ in range(60):
        out = model(x)
        loss = F.cross_entropy(out["logits"], y) + out["aux_loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        start = float(out["gflops"]) if start is None else start
    model.eval()
    searched = model.calculate_flop_inference() / 1e9
    assert abs(start - target) > 0.1 * full
    assert abs(searched - target) < 0.03 * full, (start, searched, target)


def test_arch_parameters_and_parameters():
    model = make_model(depth=3)
    arch = model.arch_parameters()
    assert len(arch) == 6 and all(p.requires_grad for p in arch)
    names = {n for n, _ in model.named_parameters()}
    assert "blocks.1.prune_ddp.selected_probability" in names  # parameters() is timm's (DESIGN CHOICE)
    assert not model.blocks[1].prune_ddp.kept_token_candidate.requires_grad


# ---------------------------------------------------------------------------
# model contract: hooks, intermediates, bf16
# ---------------------------------------------------------------------------

def test_hooks_and_intermediates_follow_the_reduction():
    model = make_model(prune_kept_num=SMALL_SCHEDULE[0], merge_kept_num=SMALL_SCHEDULE[1])
    x = torch.randn(2, 3, 64, 64)
    intermediates = check_intermediates(model, x)
    assert [y.shape[1] for y in intermediates] == [16, 11, 8, 5]
    with pytest.raises(ValueError, match="output_fmt='NLC'"):
        model.forward_intermediates(x)
    unreduced = make_model(prune_kept_num=[17] * 4, merge_kept_num=[17] * 4)
    with torch.no_grad():
        assert unreduced.forward_intermediates(x)[1][0].shape == (2, 48, 4, 4)


def test_bf16_autocast_keeps_the_selection():
    model = make_model(prune_kept_num=SMALL_SCHEDULE[0], merge_kept_num=SMALL_SCHEDULE[1], trace_source=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        ref_source = model._diffrate_info["source"].clone()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
    assert model._diffrate_info["size"].dtype == torch.float32
    assert torch.equal(model._diffrate_info["source"].float(), ref_source)
    assert (out.float() - ref).abs().max() < 0.1 * ref.abs().max()
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, flops = model(x, return_flop=True)
    assert flops.dtype == torch.float32 and torch.isfinite(logits.float()).all()
