"""MCTF patch (models/mctf.py): the checks of docs/methods/mctf.md ("Checks") against an
independent slow reference, the official quirks' design choices, and the training forward."""
import copy
import math

import pytest
import timm
import torch
from timm.loss import LabelSmoothingCrossEntropy
from torch import nn

import models  # noqa: F401  (registers the models)
from models import mctf
from models.errors import ModelConfigError

TINY = dict(embed_dim=48, num_heads=3, num_classes=10)


def make_vit(name="deit_small_patch16_224", img_size=64, seed=0, **kwargs):
    torch.manual_seed(seed)
    model = timm.create_model(name, img_size=img_size, **{**TINY, **kwargs}).eval()
    with torch.no_grad():  # larger cls/pos tokens and head: logits and attention far from uniform
        model.pos_embed.mul_(20)
        model.head.weight.mul_(10)
    return model


def images(batch=2, size=64, seed=1):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------
# An independent reference: the official algorithm written with explicit groups and Python
# loops, one sample at a time, on an UNPATCHED model (explicit attention everywhere).
# ---------------------------------------------------------------------------

def ref_scores(x, a, size, taus):
    """Same formula and float32 operation order as the official matcher (selections have tiny margins)."""
    tau_sim, tau_info, tau_size = taus
    m = x / x.norm(dim=-1, keepdim=True)
    w = m[::2] @ m[1::2].T
    w = ((w + 1) / 2) ** (1 / tau_sim) if tau_sim else torch.ones_like(w)
    if tau_info > 0:
        inv = 1 / a
        inv = inv / inv.max()
        w = w * (inv[::2, None] * inv[None, 1::2]) ** (1 / tau_info)
    if tau_size and size is not None:
        inv = 1 / size
        inv = inv / inv.max()
        w = w * (inv[::2, None] * inv[None, 1::2]) ** (1 / tau_size)
    return w


def ref_match(w, r, protected_cls, dist, bidirection):
    """Groups of input positions, in output order, for one sample. w: [t1, t2] list of lists."""
    w = [list(row) for row in w.tolist()]
    t1, t2 = len(w), len(w[0])
    if protected_cls:
        w[0] = [-math.inf] * t2
    if dist:
        for row in w:
            row[0] = -math.inf
    r1, r2 = (r // 2, r - r // 2) if bidirection else (r, 0)
    best = [max(range(t2), key=lambda j: (row[j], -j)) for row in w]  # first index on ties
    m = [w[i][best[i]] for i in range(t1)]
    ranked = sorted(range(t1), key=lambda i: -m[i])
    sources, kept_a = ranked[:r1], ranked[r1:]
    if protected_cls:
        kept_a = sorted(kept_a)
    groups_b = {j: [2 * j + 1] for j in range(t2)}
    for i in sources:
        groups_b[best[i]].append(2 * i)
    groups_a = {i: [2 * i] for i in kept_a}
    if not bidirection:
        out = [groups_a[i] for i in kept_a] + [groups_b[j] for j in range(t2)]
        order_b = list(range(t2))
    else:
        best2 = [max(range(len(kept_a)), key=lambda k: (w[kept_a[k]][j], -k)) for j in range(t2)]
        m2 = [w[kept_a[best2[j]]][j] for j in range(t2)]
        ranked2 = sorted(range(t2), key=lambda j: -m2[j])
        for j in ranked2[:r2]:
            groups_a[kept_a[best2[j]]] += groups_b[j]
        order_b = ranked2[r2:]
        out = [groups_a[i] for i in kept_a] + [groups_b[j] for j in order_b]
    if dist:  # cls, dist, other kept A, other kept B
        d = next(g for g in out if 1 in g)
        out = [out[0], d] + [g for g in out[1:] if g is not d]
    return out


def ref_reduction(tokens, r, protected):
    if tokens - r < 10:
        r = tokens - 10
    r_l = int((tokens - protected) * r) if r < 1 else r
    return max(min(r_l, (tokens - protected) // 2), 0)


def ref_attention(blk, xn, size):
    attn = blk.attn
    T, C = xn.shape
    qkv = (xn @ attn.qkv.weight.T + (attn.qkv.bias if attn.qkv.bias is not None else 0))
    qkv = qkv.reshape(T, 3, attn.num_heads, attn.head_dim).permute(1, 2, 0, 3)
    q, k, v = qkv[0], qkv[1], qkv[2]
    logits = (q @ k.transpose(-2, -1)) * attn.scale
    if size is not None:
        logits = logits + size.log()[None, None, :]
    return logits.softmax(-1), v


def ref_pool(values, group, weights, pooling):
    """Pool rows values[i] over group members i with weights (pooling 0, 1, 3) or max (2)."""
    if pooling == 2:
        return torch.stack([values[i] for i in group]).amax(0)
    total = sum(weights[i] * values[i] for i in group)
    return total / sum(weights[i] for i in group)


def ref_fuse(x, A, size, groups, pooling, fuse_attn=True):
    a = A.mean(dim=(0, 1))
    s = size if size is not None else torch.ones(x.shape[0])
    if pooling == 1:
        weights = a * s / s.max()
    elif pooling == 0:
        weights = s
    else:
        weights = torch.ones_like(s)
    new_x = torch.stack([ref_pool(x, g, weights, pooling) for g in groups])
    new_s = torch.stack([s[g].sum() for g in groups])
    new_A = None
    if fuse_attn:
        keys = torch.stack([A[:, :, g].sum(-1) for g in groups], dim=-1)  # [H, T, T']
        new_A = torch.stack([ref_pool(keys.transpose(0, 1), g, weights, pooling) for g in groups]).transpose(0, 1)
    return new_x, new_s, new_A


def reference_forward(model, image, r, activate, mode=1, prop_attn=True, taus=(1.0, 20.0, 40.0),
                      bidirection=True, pooling=1, record=None):
    """One image `[3, H, W]` -> logits; `record` collects (tokens after each block, groups per fusion)."""
    cls = model.cls_token is not None
    dist = getattr(model, "dist_token", None) is not None
    protected = int(cls) + int(dist)
    x = model.norm_pre(model._pos_embed(model.patch_embed(image[None])))[0]
    size = None
    for index, blk in enumerate(model.blocks):
        T = x.shape[0]
        r_l = ref_reduction(T, r, protected) if index in activate else 0
        bias = size if prop_attn else None
        if r_l and mode in (1, 2):
            A, _ = ref_attention(blk, blk.norm1(x), bias)
            groups = ref_match(ref_scores(x, A.mean((0, 1)), size, taus), r_l, cls, dist, bidirection)
            x, size, fused = ref_fuse(x, A, size, groups, pooling)
            xn = blk.norm1(x)
            if mode == 1:
                _, v = ref_attention(blk, xn, None)
                out = (fused @ v).transpose(0, 1).reshape(x.shape[0], -1)
            else:
                A2, v = ref_attention(blk, xn, size if prop_attn else None)
                out = (A2 @ v).transpose(0, 1).reshape(x.shape[0], -1)
            x = x + blk.ls1(blk.attn.proj(out))
            x = x + blk.ls2(blk.mlp(blk.norm2(x)))
        else:
            xn = blk.norm1(x)
            A, v = ref_attention(blk, xn, bias)
            x = x + blk.ls1(blk.attn.proj((A @ v).transpose(0, 1).reshape(T, -1)))
            x = x + blk.ls2(blk.mlp(blk.norm2(x)))
            groups = None
            if r_l:  # mode 0: fuse the block's output
                groups = ref_match(ref_scores(x, A.mean((0, 1)), size, taus), r_l, cls, dist, bidirection)
                x, size, _ = ref_fuse(x, A, size, groups, pooling, fuse_attn=False)
        if record is not None:
            record.append((x.shape[0], groups))
    return model.forward_head(model.norm(x)[None])[0]


def reference_logits(model, batch, **kwargs):
    with torch.no_grad():
        return torch.stack([reference_forward(model, image, **kwargs) for image in batch])


def patched(model, **kwargs):
    return mctf.patch(copy.deepcopy(model), **kwargs)


def block_lengths(model, x):
    lengths = []
    handles = [b.register_forward_hook(lambda m, i, o: lengths.append(o.shape[1])) for b in model.blocks]
    with torch.no_grad():
        out = model(x)
    for h in handles:
        h.remove()
    return out, lengths


# ---------------------------------------------------------------------------
# the eval forward against the reference, in many configurations
# ---------------------------------------------------------------------------

CONFIGS = [
    dict(r=4, activate=range(1, 4)),
    dict(r=0.3, activate=(1, 3)),
    dict(r=5, activate=range(4), bidirection=False),
    dict(r=4, activate=range(1, 4), pooling=0),
    dict(r=4, activate=range(1, 4), pooling=2),
    dict(r=4, activate=range(1, 4), pooling=3),
    dict(r=6, activate=(0, 2), mode=0),
    dict(r=6, activate=range(4), mode=2),
    dict(r=4, activate=range(1, 4), prop_attn=False),
    dict(r=4, activate=range(1, 4), taus=(1.0, 0.0, 0.0)),  # similarity only (all three off: all ties)
    dict(r=4, activate=range(1, 4), taus=(0.0, 20.0, 40.0)),
    dict(r=4, activate=range(1, 4), taus=(0.5, 5.0, 2.0)),
    dict(r=40, activate=range(4)),  # the T - r < 10 clamp and the half clamp
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_eval_forward_matches_the_reference(config):
    model = make_vit(depth=4, img_size=96)  # 37 tokens
    x = images(size=96)
    kwargs = dict(config)
    activate = list(kwargs.pop("activate"))
    mode, pooling = kwargs.pop("mode", 1), kwargs.pop("pooling", 1)
    taus = kwargs.pop("taus", (1.0, 20.0, 40.0))
    ours = patched(model, r=kwargs["r"], activate_layer=activate, one_step_ahead=mode, pooling_type=pooling,
                   tau_sim=taus[0], tau_info=taus[1], tau_size=taus[2],
                   bidirection=kwargs.get("bidirection", True), prop_attn=kwargs.get("prop_attn", True))
    with torch.no_grad():
        out = ours(x)
    ref = reference_logits(model, x, activate=activate, mode=mode, pooling=pooling, taus=taus, **kwargs)
    assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4), (out - ref).abs().max()


@pytest.mark.parametrize("name", ["deit_tiny_patch16_224", "deit_base_patch16_224"])
def test_other_model_sizes_match_the_reference(name):
    model = make_vit(name, depth=3, embed_dim=64, num_heads=4 if "base" in name else 2)
    x = images()
    out = patched(model, r=6, activate_layer=[1, 2])(x)
    assert torch.allclose(out, reference_logits(model, x, r=6, activate=[1, 2]), atol=1e-4, rtol=1e-4)


def test_groups_and_token_counts_follow_the_reference():
    model = make_vit(depth=4)
    x = images(batch=1)
    ours = patched(model, r=5, activate_layer=[1, 2, 3], trace_source=True)
    with torch.no_grad():
        ours(x)
    record = []
    with torch.no_grad():
        reference_forward(model, x[0], r=5, activate=[1, 2, 3], record=record)
    assert ours._mctf_info["tokens"] == [n for n, _ in record]
    # compose the reference's groups into a map original token -> final token
    position = list(range(record[0][0]))
    for _, groups in record:
        if groups:
            where = {member: g for g, members in enumerate(groups) for member in members}
            position = [where[p] for p in position]
    assert ours._mctf_info["group"][0].tolist() == position
    source = ours._mctf_info["source"][0]
    assert source.shape == (record[-1][0], 17) and torch.equal(source.sum(0), torch.ones(17))


# ---------------------------------------------------------------------------
# Checks 1-8 of the docs page
# ---------------------------------------------------------------------------

def test_r0_and_no_activated_block_equal_plain_timm():
    model = make_vit(depth=4)
    x = images()
    with torch.no_grad():
        plain = model(x)
        assert torch.allclose(patched(model, r=0)(x), plain, atol=1e-5, rtol=0)
        assert torch.allclose(patched(model, r=8, activate_layer=[])(x), plain, atol=1e-5, rtol=0)
        assert torch.allclose(patched(model, r=8, activate_layer=[7, 9])(x), plain, atol=1e-5, rtol=0)


TOKEN_TABLE = [
    (16, range(1, 12), 1, [197, 181, 165, 149, 133, 117, 101, 85, 69, 53, 37, 21]),
    (0.35, (3, 6, 9), 1, [197, 197, 197, 129, 129, 129, 85, 85, 85, 56, 56, 56]),
    (24, range(1, 12), 1, [197, 173, 149, 125, 101, 77, 53, 29, 15, 10, 10, 10]),
    (30, (0, 4, 8), 0, [167, 167, 167, 167, 137, 137, 137, 137, 107, 107, 107, 107]),
]


@pytest.mark.parametrize("r,activate,mode,expected", TOKEN_TABLE)
def test_tokens_after_each_block_at_224(r, activate, mode, expected):
    assert mctf.token_counts(197, 12, r, activate) == expected
    model = timm.create_model("deit_small_patch16_224", embed_dim=24, num_heads=2, num_classes=10).eval()
    mctf.patch(model, r=r, activate_layer=list(activate), one_step_ahead=mode)
    _, lengths = block_lengths(model, torch.randn(1, 3, 224, 224))
    assert lengths == expected


def test_sizes_cls_and_two_way_split():
    model = make_vit(depth=4)
    x = images()
    ours = patched(model, r=7, activate_layer=[1, 2, 3], trace_source=True)
    with torch.no_grad():
        ours(x)
    size = ours._mctf_info["size"]
    assert torch.equal(size.sum(dim=(1, 2)), torch.full((2,), 17.0))
    assert torch.equal(size[:, 0, 0], torch.ones(2))
    assert torch.equal(ours._mctf_info["group"][:, 0], torch.zeros(2, dtype=torch.long))
    # one block: exactly r // 2 A tokens and r - r // 2 B tokens are fused
    metric = torch.randn(2, 17, 8)
    match = mctf.mctf_matching(metric, torch.rand(2, 17), None, 7)
    assert match.src_idx.shape == (2, 3) and match.src_idx2.shape == (2, 4)
    assert match.unm_idx.shape == (2, 9 - 3) and match.unm_idx2.shape == (2, 8 - 4)
    assert not (match.src_idx == 0).any()  # cls never a source


@pytest.mark.parametrize("pooling", [0, 1, 3])
def test_fused_attention_rows_sum_to_one(pooling):
    torch.manual_seed(0)
    x = torch.randn(2, 15, 8)
    A = torch.randn(2, 3, 15, 15).softmax(-1)
    info = A.mean(dim=(1, 2))
    size = torch.randint(1, 4, (2, 15, 1)).float()
    match = mctf.mctf_matching(x, info, size, 6)
    new_x, new_size, fused = mctf.mctf_fuse(match, x, A, info, size, pooling)
    assert fused.shape == (2, 3, 9, 9) and new_x.shape == (2, 9, 8)
    assert torch.allclose(fused.sum(-1), torch.ones(2, 3, 9), atol=1e-6)
    assert torch.equal(new_size.sum(1), size.sum(1))


def test_max_pooling_keeps_its_unnormalised_map():
    torch.manual_seed(0)
    x = torch.randn(1, 15, 8)
    A = torch.randn(1, 2, 15, 15).softmax(-1)
    info = A.mean(dim=(1, 2))
    match = mctf.mctf_matching(x, info, None, 6)
    new_x, _, fused = mctf.mctf_fuse(match, x, A, info, None, 2)
    index = mctf.fused_index(match, 15)[0]
    for g in range(9):
        members = (index == g).nonzero()[:, 0]
        assert torch.equal(new_x[0, g], x[0, members].amax(0))
    assert (fused.sum(-1) >= 1 - 1e-6).all()


@pytest.mark.parametrize("pooling", [0, 1, 3])
def test_duplicate_tokens_one_step_ahead_equals_precise(pooling):
    """When every fused group holds identical tokens the fused map is proportional attention
    on the fused tokens: modes 1 and 2 give the same block output."""
    torch.manual_seed(3)
    model = make_vit(depth=2)
    pairs = torch.randn(1, 8, 48)
    # [cls, p0, p0, p1, p1, ...]: B token 2i-1 and A token 2i are identical
    x = torch.cat([torch.randn(1, 1, 48), pairs.repeat_interleave(2, dim=1)], dim=1)
    outs = {}
    for mode in (1, 2):
        ours = patched(model, r=4, activate_layer=[1], one_step_ahead=mode, pooling_type=pooling, trace_source=True)
        blk = ours.blocks[1]
        cfg = ours._mctf_cfg
        student = mctf.MCTFPass(4)
        cfg.slot.state = mctf.MCTFState(current=student, student=student)
        try:
            with torch.no_grad():
                outs[mode] = blk(x)
        finally:
            cfg.slot.state = None
        index = student.group[0]
        for g in range(outs[mode].shape[1]):
            members = (index == g).nonzero()[:, 0]
            assert all(torch.equal(x[0, members[0]], x[0, m]) for m in members), "a group of distinct tokens"
        assert student.applied == [4]
    assert torch.allclose(outs[1], outs[2], atol=2e-6)


def test_bidirectional_output_order_is_descending_step2_score():
    torch.manual_seed(5)
    T, r = 21, 8
    x = torch.randn(1, T, 16)
    info = torch.rand(1, T)
    match = mctf.mctf_matching(x, info, None, r)
    index = mctf.fused_index(match, T)[0]
    w = ref_scores(x[0], info[0], None, (1.0, 20.0, 40.0))
    groups = ref_match(w, r, True, False, True)
    expected = [None] * T
    for g, members in enumerate(groups):
        for t in members:
            expected[t] = g
    assert index.tolist() == expected
    # kept B tokens after the kept A ones, by descending best score over the kept A tokens
    r1, t1 = r // 2, (T + 1) // 2
    kept_a = match.unm_idx[0].tolist()
    scores = w.clone()
    scores[0] = -math.inf
    m2 = scores[kept_a].max(0).values
    kept_b = match.unm_idx2[0].tolist()
    assert [index[2 * j + 1].item() for j in kept_b] == list(range(t1 - r1, t1 - r1 + len(kept_b)))
    assert all(m2[a] >= m2[b] for a, b in zip(kept_b, kept_b[1:]))
    assert kept_a == sorted(kept_a) and kept_a[0] == 0


def test_merge_equals_group_sums():
    torch.manual_seed(2)
    x = torch.randn(3, 20, 5)
    for bidirection in (True, False):
        match = mctf.mctf_matching(x, torch.rand(3, 20), None, 7, bidirection=bidirection)
        merged = mctf.mctf_merge(x, match, "sum")
        index = mctf.fused_index(match, 20)
        expected = torch.zeros(3, 13, 5).index_put_((torch.arange(3)[:, None].expand(3, 20), index), x,
                                                     accumulate=True)
        assert torch.allclose(merged, expected, atol=1e-6)


def test_batch_independence():
    model = make_vit(depth=4)
    x = images(batch=3)
    ours = patched(model, r=5, activate_layer=[1, 2, 3])
    with torch.no_grad():
        batched = ours(x)
        single = torch.cat([ours(x[i:i + 1]) for i in range(3)])
    assert torch.allclose(batched, single, atol=1e-5)


def test_determinism_reversibility_and_settings():
    model = make_vit(depth=4)
    x = images()
    with torch.no_grad():
        plain = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    n_params = sum(p.numel() for p in model.parameters())
    mctf.patch(model, r=5)
    assert mctf.is_patched(model)
    with torch.no_grad():
        a, b = model(x), model(x)
    assert torch.equal(a, b)
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert sum(p.numel() for p in model.parameters()) == n_params
    mctf.patch(model, r=5)  # patching twice equals patching once
    with torch.no_grad():
        assert torch.equal(model(x), a)
        model.r = 2
        assert torch.allclose(model(x), reference_logits(model, x, r=2, activate=[1, 2, 3]), atol=1e-4)
        model.r = 5
    mctf.unpatch(model)
    assert not mctf.is_patched(model) and type(model.blocks[0]).__name__ == "Block"
    assert not hasattr(model, "_mctf_cfg") and not hasattr(model.blocks[1], "_mctf_cfg")
    with torch.no_grad():
        assert torch.equal(model(x), plain)


def test_r_eval_keyword_overrides_r_in_eval():
    model = make_vit(depth=4)
    x = images()
    ours = patched(model, r=5)
    with torch.no_grad():
        assert torch.equal(ours(x, r_eval=2), patched(model, r=2)(x))
        assert ours.r == 5


# ---------------------------------------------------------------------------
# Training forward (check 9), gradients (check 10)
# ---------------------------------------------------------------------------

def test_training_forward_teacher_student_consistency():
    model = make_vit(depth=4)
    x = images()
    ours = patched(model, r=5, activate_layer=[1, 2, 3], r_teacher_max=1, task_type=[1, 1, 0.4])
    with torch.no_grad():
        student_eval = ours(x)
        plain = model(x)
    ours.train()
    out = ours(x)
    assert set(out) == {"x_student", "x_teacher", "loss_consistency"}
    assert torch.allclose(out["x_teacher"], plain, atol=1e-5)
    assert torch.allclose(out["x_student"], student_eval, atol=1e-5)
    # the consistency loss is the mean squared difference of the final-norm cls features
    features = []
    hook = ours.norm.register_forward_hook(lambda m, i, o: features.append(o[:, 0]) and None)
    out = ours(x)
    hook.remove()
    teacher_cls, student_cls = features  # teacher first, as officially
    expected = ((teacher_cls - student_cls) ** 2).mean(dim=1)
    assert out["loss_consistency"].shape == (2,)
    assert torch.allclose(out["loss_consistency"], expected, atol=1e-7) and (expected > 0).all()
    ours.r = 0
    assert torch.equal(ours(x)["loss_consistency"], torch.zeros(2))


def test_training_student_only_returns_logits_and_teacher_only_a_dict():
    model = make_vit(depth=3)
    x = images()
    ours = patched(model, r=4).train()
    out = ours(x)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 10)
    ours = patched(model, r=4, task_type=[0, 1, 0], r_teacher_max=3).train()
    assert set(ours(x)) == {"x_teacher"}


def test_teacher_r_is_drawn_once_per_training_forward_only():
    model = make_vit(depth=4)
    x = images()
    ours = patched(model, r=5, r_teacher_max=8, task_type=[1, 1, 0.4])
    state = torch.get_rng_state()
    with torch.no_grad():
        ours(x)  # eval: no draw (the official code draws here too)
    assert torch.equal(torch.get_rng_state(), state)
    ours.train()
    torch.manual_seed(7)
    expected = int(torch.randint(0, 8, size=(1,)))
    torch.manual_seed(7)
    ours(x)
    assert ours._mctf_cfg.last_r_teacher == expected
    # a fraction: randint(0, int(100 r_max)) / 100 in float32
    ours.r_teacher_max = 0.15
    torch.manual_seed(7)
    drawn = float(torch.randint(0, 15, size=(1,)) / 100)
    torch.manual_seed(7)
    ours(x)
    assert ours._mctf_cfg.last_r_teacher == drawn


def test_teacher_fraction_rounds_like_float32():
    assert mctf.block_reduction(101, float(torch.tensor(0.35)), 1, float32_fraction=True) == int(
        (torch.tensor(100.0) * torch.tensor(0.35)).item())
    assert mctf.block_reduction(197, 0.35, 1) == 68


def test_gradients_reach_queries_and_keys_through_the_fused_map():
    model = make_vit(depth=2)
    ours = patched(model, r=4, activate_layer=[1]).train()
    ours(images()).sum().backward()
    grad = ours.blocks[1].attn.qkv.weight.grad
    dim = ours.blocks[1].attn.attn_dim
    assert grad[:2 * dim].abs().sum() > 0 and grad[2 * dim:].abs().sum() > 0


def test_scores_and_weights_are_outside_the_graph():
    torch.manual_seed(0)
    x = torch.randn(1, 15, 8, requires_grad=True)
    A = torch.randn(1, 2, 15, 15).softmax(-1).requires_grad_()
    info = A.detach().mean(dim=(1, 2))
    match = mctf.mctf_matching(x, info, None, 6)
    new_x, _, _ = mctf.mctf_fuse(match, x, A, info, None, 1, fuse_attn=False)
    new_x.sum().backward()
    assert A.grad is None  # the pooling weights come from A without gradient
    # d(sum x')/dx_i = w_i / sum_{group} w
    index = mctf.fused_index(match, 15)[0]
    weights = info[0]
    norm = torch.zeros(9).index_add_(0, index, weights)
    assert torch.allclose(x.grad[0, :, 0], weights / norm[index], atol=1e-6)


# ---------------------------------------------------------------------------
# Official quirks and their design choices
# ---------------------------------------------------------------------------

def test_negative_r_for_small_token_counts_is_no_fusion():
    """Quirk 8: 9 tokens with r > 0 (official: r = -1 and a crash) keeps all 9 tokens."""
    assert mctf.block_reduction(9, 4, 1) == 0 and mctf.block_reduction(9, 0.5, 1) == 0
    model = make_vit(img_size=32, depth=2, patch_size=16)  # 4 patches + cls = 5 tokens
    ours = patched(model, r=4, activate_layer=[0, 1])
    _, lengths = block_lengths(ours, images(size=32))
    assert lengths == [5, 5]


def test_no_qkv_bias_matches_the_reference():
    model = make_vit(depth=3, qkv_bias=False)
    x = images()
    out = patched(model, r=5, activate_layer=[1, 2])(x)
    assert torch.allclose(out, reference_logits(model, x, r=5, activate=[1, 2]), atol=1e-4, rtol=1e-4)


def test_distilled_deit_protects_cls_and_dist():
    model = make_vit("deit_small_distilled_patch16_224", depth=4)
    x = images()
    ours = patched(model, r=5, activate_layer=[1, 2, 3], trace_source=True)
    with torch.no_grad():
        out = ours(x)
    info = ours._mctf_info
    assert info["group"][:, :2].tolist() == [[0, 1], [0, 1]]
    assert torch.equal(info["size"][:, :2, 0], torch.ones(2, 2))
    assert torch.allclose(out, reference_logits(model, x, r=5, activate=[1, 2, 3]), atol=1e-4, rtol=1e-4)
    for bidirection in (True, False):  # the kernel alone, both layouts
        match = mctf.mctf_matching(torch.randn(2, 18, 8), torch.rand(2, 18), None, 6, True, True,
                                   bidirection=bidirection)
        index = mctf.fused_index(match, 18)
        assert index[:, :2].tolist() == [[0, 1], [0, 1]]
        assert (index[:, 2:] > 1).all()


def test_class_token_free_vit_runs_unprotected():
    model = make_vit("vit_small_patch16_224", depth=3, class_token=False, global_pool="avg")
    x = images()
    ours = patched(model, r=5, activate_layer=[1, 2])
    _, lengths = block_lengths(ours, x)
    assert lengths == [16, 11, 10]  # T=11: 11 - 5 < 10 -> r 1
    with torch.no_grad():
        assert torch.allclose(ours(x), reference_logits(model, x, r=5, activate=[1, 2]), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kwargs,fragment", [
    (dict(tau_sim=-1), "tau_sim"), (dict(tau_info=-0.5), "tau_info"), (dict(tau_size=-40), "tau_size"),
    (dict(r=16.5), "neither a token count"), (dict(r=-1), ">= 0"), (dict(r=True), "int >= 0"),
    (dict(one_step_ahead=3), "one_step_ahead"), (dict(pooling_type=4), "pooling_type"),
    (dict(activate_layer=[-1]), "activate_layer"), (dict(task_type=[1, 1]), "task_type"),
    (dict(r_teacher_max=-2), "r_teacher_max"),
])
def test_bad_settings_are_one_line_errors(kwargs, fragment):
    with pytest.raises(ModelConfigError, match=fragment) as err:
        mctf.patch(make_vit(depth=1), **kwargs)
    assert "\n" not in str(err.value)


def test_r_values_normalise():
    assert mctf.normalize_r(16.0) == 16 and isinstance(mctf.normalize_r(16.0), int)
    assert mctf.normalize_r(0.0) == 0 and mctf.normalize_r(0.35) == 0.35
    model = patched(make_vit(depth=1), r=16.0)
    assert model.r == 16
    with pytest.raises(ModelConfigError):
        model.r = 2.5


def test_unsupported_models_are_refused():
    from models import tome
    vit = make_vit(depth=2)
    with pytest.raises(ModelConfigError, match="already patched by tome"):
        mctf.patch(tome.patch(copy.deepcopy(vit), r=2))
    with pytest.raises(ModelConfigError, match="register tokens"):
        mctf.patch(make_vit("vit_small_patch16_224", depth=1, reg_tokens=2))
    with pytest.raises(ModelConfigError, match="EViT"):
        mctf.patch(timm.create_model("deit_small_patch16_shrink_base", depth=2, embed_dim=48, num_heads=3,
                                     img_size=32))
    with pytest.raises(ModelConfigError, match="VisionTransformers"):
        mctf.patch(nn.Sequential(nn.Linear(2, 2)))
    ours = patched(vit, r=2).train()
    ours.set_grad_checkpointing(True)
    with pytest.raises(ModelConfigError, match="gradient checkpointing"):
        ours(images())


def test_mctf_type_kwargs_maps_the_official_list():
    assert mctf.mctf_type_kwargs([16, 8, 0, 1, 1, 1, 20, 40, 1, 1, 0]) == dict(
        r=16, r_teacher_max=8, trace_source=False, prop_attn=True, one_step_ahead=1, tau_sim=1, tau_info=20,
        tau_size=40, bidirection=True, pooling_type=1)
    with pytest.raises(ModelConfigError, match="11 values"):
        mctf.mctf_type_kwargs([16, 8])


def test_shrink_blocks_run_unchanged_and_diluted_blocks_fuse_first():
    from test_tome import StandInLambdaBlock, StandInShrinkBlock
    model = make_vit(depth=4)
    x = images()
    shrunk = copy.deepcopy(model)
    shrunk.blocks[2] = StandInShrinkBlock(shrunk.blocks[2])
    ours = patched(shrunk, r=4, activate_layer=[1, 2, 3])
    _, lengths = block_lengths(ours, x)
    assert lengths == [17, 13, 13, 10]  # block 2 has no attention: never activated; 13 - 4 < 10 -> r 3
    diluted = copy.deepcopy(model)
    diluted.blocks[1].__class__ = StandInLambdaBlock
    diluted.blocks[1].lam = 0.5
    ours = patched(diluted, r=4, activate_layer=[1], prop_attn=False)
    with torch.no_grad():
        out = ours(x)
    # reference: fuse at the start of block 1, then (2 - lam) x' + lam * o
    blk = diluted.blocks[1]
    h = diluted.blocks[0](diluted.norm_pre(diluted._pos_embed(diluted.patch_embed(x))))
    with torch.no_grad():
        q, k = mctf._queries_keys(blk.attn, blk.norm1(h))
        probs = mctf._attention_map(blk.attn, q, k, None)
        info = mctf._informativeness(probs)
        match = mctf.mctf_matching(h, info, None, 4)
        h2, _, fused = mctf.mctf_fuse(match, h, probs, info, None, 1)
        xn = blk.norm1(h2)
        o = mctf._attention_output(blk.attn, fused, mctf._values(blk.attn, xn), xn)
        h2 = 1.5 * h2 + 0.5 * o
        h2 = h2 + blk.mlp(blk.norm2(h2))
        for b in diluted.blocks[2:]:
            h2 = b(h2)
        expected = diluted.forward_head(diluted.norm(h2))
    assert torch.allclose(out, expected, atol=1e-5)


def test_bf16_selection_scores_are_float32():
    torch.manual_seed(0)
    x = torch.randn(2, 21, 16)
    info = torch.rand(2, 21)
    fp32 = mctf.mctf_matching(x, info, None, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = mctf.mctf_matching(x, info, None, 8)
    assert all(torch.equal(a, b) for a, b in zip(fp32[:6], under_autocast[:6]))
    model = make_vit(depth=3)
    ours = patched(model, r=4).to(torch.bfloat16)
    with torch.no_grad():
        out = ours(images().to(torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


# ---------------------------------------------------------------------------
# FLOPs (check 11): the official fvcore counts, from the real per-block token counts
# ---------------------------------------------------------------------------

try:
    from models import flops as flop_counter
except ImportError:  # the counter lives at the project root until it moves under models/
    import flops as flop_counter

OFFICIAL_GMACS = {  # r 16 at blocks 1..11, r 0.35 at blocks 3, 6, 9 (MCTF-Fast), unpatched
    "deit_tiny_patch16_224": (0.7092, 0.7481, 1.2584),
    "deit_small_patch16_224": (2.6016, 2.7564, 4.6083),
    "deit_base_patch16_224": (9.9359, 10.5541, 17.5827),
}


@pytest.mark.parametrize("name", [
    "deit_tiny_patch16_224", "deit_small_patch16_224",
    pytest.param("deit_base_patch16_224", marks=pytest.mark.slow)])
def test_gmacs_equal_the_official_counts(name):
    mctf_gmacs, fast_gmacs, plain_gmacs = OFFICIAL_GMACS[name]
    model = timm.create_model(name).eval()
    assert flop_counter.count_flops(model, 224)["gmacs"] == pytest.approx(plain_gmacs, rel=1e-3)
    mctf.patch(model, r=16, activate_layer=list(range(1, 12)))
    assert flop_counter.count_flops(model, 224)["gmacs"] == pytest.approx(mctf_gmacs, rel=1e-3)
    mctf.patch(model, r=0.35, activate_layer=[3, 6, 9])
    assert flop_counter.count_flops(model, 224)["gmacs"] == pytest.approx(fast_gmacs, rel=1e-3)


# ---------------------------------------------------------------------------
# The official model names
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("name,timm_name", [("deit_tiny", "deit_tiny_patch16_224"),
                                            ("deit_small", "deit_small_patch16_224"),
                                            ("deit_base", "deit_base_patch16_224")])
def test_official_names_are_timm_deit_with_the_official_kwargs(name, timm_name):
    kwargs = dict(depth=2, img_size=32)
    ours = timm.create_model(name, use_mctf=True, mctf_type=[2, 0, 0, 1, 1, 1, 20, 40, 1, 1, 0],
                             task_type=[1, 0, 0, 0], activate_layer=[1], **kwargs).eval()
    reference = timm.create_model(timm_name, **kwargs).eval()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in reference.state_dict().items()}
    assert mctf.is_patched(ours) and ours.r == 2 and ours._mctf_cfg.activate == {1}
    reference.load_state_dict(ours.state_dict(), strict=True)
    x = images(size=32)
    with torch.no_grad():
        assert torch.equal(ours(x), mctf.patch(reference, r=2, activate_layer=[1])(x))
    plain = timm.create_model(name, **kwargs)
    assert not mctf.is_patched(plain)
    defaults = timm.create_model(name, use_mctf=True, **kwargs)  # the official main.py defaults (MCTF-Fast)
    assert (defaults.r, defaults.r_teacher_max, sorted(defaults._mctf_cfg.activate)) == (0.35, 0.15, [3, 6, 9])


# ---------------------------------------------------------------------------
# The consistency fine-tuning loss (engine.py of the official code)
# ---------------------------------------------------------------------------

class _PlainCriterion(nn.Module):
    """The trainer's calling convention around a label-smoothing CE."""

    def __init__(self):
        super().__init__()
        self.ce = LabelSmoothingCrossEntropy(0.1)

    def forward(self, samples, outputs, targets):
        return self.ce(outputs, targets)


def test_criterion_is_the_official_weighted_sum_with_confidence_gate():
    torch.manual_seed(0)
    student, teacher = torch.randn(6, 5) * 3, torch.randn(6, 5)
    consistency = torch.rand(6)
    y = torch.randint(0, 5, (6,))
    student[torch.arange(3), y[:3]] += 6  # confident on half of the batch
    criterion = mctf.MCTFCriterion(_PlainCriterion(), [1, 1, 0.4], [1.0, 1.0, 3.0])
    loss = criterion(None, {"x_student": student, "x_teacher": teacher, "loss_consistency": consistency}, y)
    ce = LabelSmoothingCrossEntropy(0.1)
    p = student.softmax(-1)[torch.arange(6), y]
    m = (p > 0.4).float()
    assert 0 < m.sum() < 6
    expected = ce(student, y) + ce(teacher, y) + 3.0 * (consistency * m).sum() / m.sum()
    assert torch.allclose(loss, expected)
    assert criterion.last["confidence_pass"].item() == pytest.approx(m.mean().item())
    # nobody passes the gate: no consistency term
    strict = mctf.MCTFCriterion(_PlainCriterion(), [1, 0, 0.9999], [2.0, 1.0, 3.0])
    assert torch.allclose(strict(None, {"x_student": student, "loss_consistency": consistency}, y),
                          2.0 * ce(student, y))
    # student-only training hands the criterion the logits tensor
    only = mctf.MCTFCriterion(_PlainCriterion(), [1, 0, 0], [0.5, 1.0, 1.0])
    assert torch.allclose(only(None, student, y), 0.5 * ce(student, y))


@pytest.mark.parametrize("mode", ["batch", "pair"])
def test_confidence_under_mixup_adds_the_flipped_label(mode):
    from timm.data import Mixup
    torch.manual_seed(0)
    y = torch.tensor([0, 3, 3, 1, 2, 4])
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=5, mode=mode)
    _, soft = mixup(torch.randn(6, 3, 8, 8), y)
    probs = torch.randn(6, 5).softmax(-1)
    expected = probs[torch.arange(6), y] + probs[torch.arange(6), y.flip(0)]
    assert torch.allclose(mctf.confidence_of_labels(probs, soft), expected, atol=1e-6)
    assert torch.equal(mctf.confidence_of_labels(probs, y), probs[torch.arange(6), y])
