"""ATS patch (models/ats.py): the checks of docs/methods/ats.md ("Checks"), against a slow
re-statement of the official algorithm written here (policy masks, eps softmax, padded candidate
vectors and the pick de-duplication, one image or one batch at a time)."""
import copy

import pytest
import timm
import torch
import torch.nn.functional as F

import models  # noqa: F401  (registers the models)
from models import ats
from models.errors import ModelConfigError

TINY = dict(embed_dim=48, num_heads=3, num_classes=10)


def make_vit(name="deit_small_patch16_224", img_size=64, depth=6, **kwargs):
    torch.manual_seed(0)
    model = timm.create_model(name, img_size=img_size, depth=depth, **TINY, **kwargs).eval()
    _sharpen(model)
    return model


def _sharpen(model):
    """Random-init ViTs attend almost uniformly (every token kept); larger qk weights make the
    class attention peaked, so images keep different, smaller numbers of tokens."""
    with torch.no_grad():
        for block in model.blocks:
            if getattr(block, "attn", None) is not None:
                c = block.attn.qkv.in_features
                block.attn.qkv.weight[: 2 * c].mul_(8.0)
        model.pos_embed.mul_(20.0)


def images(count, size=64, seed=1):
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------
# Reference: the official forward, written out (spec sections 1-6)
# ---------------------------------------------------------------------------

def _ref_softmax(logits, policy, eps=1e-6):
    """Official softmax with a key policy: masked keys get eps / N, masked queries see themselves."""
    n = logits.shape[-1]
    keep = policy.reshape(policy.shape[0], 1, 1, n)
    keep = keep + (1.0 - keep) * torch.eye(n).view(1, 1, n, n)
    e = (logits - logits.max(dim=-1, keepdim=True).values).exp() * keep
    return (e + eps / n) / (e.sum(dim=-1, keepdim=True) + eps)


def _ref_block(block, x, policy):
    attn = block.attn
    b, n, c = x.shape
    qkv = attn.qkv(block.norm1(x)).reshape(b, n, 3, attn.num_heads, c // attn.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    a = _ref_softmax((q @ k.transpose(-2, -1)) * attn.scale, policy)
    x = x + attn.proj((a @ v).transpose(1, 2).reshape(b, n, c))
    x = x * policy
    x = x + block.mlp(block.norm2(x))
    return x * policy


def _ref_unique(picks, max_value):
    ordered = torch.sort(picks, dim=1).values
    right = F.pad(ordered[:, 1:], (0, 1), value=1)
    return torch.sort(torch.where(right - ordered == 0, torch.full_like(ordered, max_value), ordered), dim=1).values


def _ref_ats_block(block, x, policy, n_tokens, n_ref, drop_tokens):
    """The official ATS block called with (n_tokens, n_ref_tokens); returns (x, policy)."""
    attn = block.attn
    b, n, c = x.shape
    h = attn.num_heads
    n_tokens = min(n_tokens, n)
    raw = x
    qkv = attn.qkv(block.norm1(x)).reshape(b, n, 3, h, c // h).permute(2, 0, 3, 1, 4)
    qkv = qkv * policy.unsqueeze(0).unsqueeze(2)
    q, k, v = qkv[0], qkv[1], qkv[2]
    a = _ref_softmax((q @ k.transpose(-2, -1)) * attn.scale, policy)
    vnorm = torch.linalg.norm(v.transpose(1, 2).reshape(b, n, c), ord=2, dim=2)
    score = (a[:, :, 0].sum(dim=1) * vnorm)[:, 1:]
    score = score / score.sum(dim=1, keepdim=True)
    scores, order = torch.sort(score, dim=1, stable=True)
    cdf = torch.cumsum(scores, dim=1)
    cdf = (cdf - cdf.min(dim=1).values[:, None]) / (cdf.max(dim=1).values - cdf.min(dim=1).values)[:, None]
    s = n_ref - 1
    lam = torch.linspace(0, 1, s)[None].repeat(b, 1)
    start = torch.min(cdf + (cdf == 0).float() * 1e8, dim=1).values[:, None].expand_as(lam)
    steps = torch.arange(0, s, dtype=torch.float32)[None].expand_as(start)
    ys = (start + ((lam * (n_ref - 2)) - start * steps) / (n_ref - 2))[:, :, None]
    diff = s - (n - 1)
    picks = torch.min(torch.abs(ys.expand(b, s, s) - F.pad(cdf[:, None], (diff, 0))), dim=2).indices - diff
    a_sorted = F.pad(torch.gather(a[:, :, 1:], 2, order[:, None, :, None].expand(b, h, n - 1, n)), (0, 0, 0, 1))
    x_sorted = F.pad(torch.gather(raw[:, 1:], 1, order[..., None].expand(b, n - 1, c)), (0, 0, 0, 1))
    unique = _ref_unique(picks, n - 1)[:, : n - 1]
    a_kept = torch.gather(a_sorted, 2, unique[:, None, :, None].expand(b, h, n_tokens - 1, n))
    x_kept = torch.gather(x_sorted, 1, unique[..., None].expand(b, n_tokens - 1, c))
    a_kept = torch.cat([a[:, :, :1], a_kept], dim=2)
    selected = torch.cat([raw[:, :1], x_kept], dim=1)
    policy = F.pad((unique != n - 1)[..., None].float(), (0, 0, 1, 0), value=1.0)
    out = (a_kept @ v).transpose(1, 2).reshape(b, n_tokens, c)
    if drop_tokens:  # compact the real rows, padding the batch to its largest count
        longest = int(policy.sum(dim=1).max())
        keep = policy[..., 0].bool()
        out = torch.stack([F.pad(o[m], (0, 0, 0, longest - int(m.sum()))) for o, m in zip(out, keep)])
        selected = torch.stack([F.pad(o[m], (0, 0, 0, longest - int(m.sum()))) for o, m in zip(selected, keep)])
        policy = torch.stack([F.pad(torch.ones(int(m.sum()), 1), (0, 0, 0, longest - int(m.sum()))) for m in keep])
    out = attn.proj(out) * policy
    x = (selected + out) * policy
    x = x + block.mlp(block.norm2(x))
    return x * policy, policy


def official_forward(model, x, ats_blocks, caps=None, drop_tokens=True):
    """Logits and real tokens leaving each block of the official model on batch `x`.

    caps: {block: K} (official block called with n_tokens = n_ref_tokens = K); default K = N0.
    """
    with torch.no_grad():
        x = model._pos_embed(model.patch_embed(x))
        n0 = x.shape[1]
        policy = torch.ones(x.shape[0], n0, 1)
        counts = []
        for i, block in enumerate(model.blocks):
            if i in ats_blocks:
                k = (caps or {}).get(i, n0)
                x, policy = _ref_ats_block(block, x, policy, k, k, drop_tokens)
            else:
                x = _ref_block(block, x, policy)
            counts.append(policy[..., 0].sum(dim=1).long())
        return model.head(model.norm(x)[:, 0]), torch.stack(counts, dim=1)


def official_per_image(model, x, ats_blocks, caps=None, drop_tokens=True):
    parts = [official_forward(model, x[i:i + 1], ats_blocks, caps, drop_tokens) for i in range(x.shape[0])]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def run(model, x):
    with torch.no_grad():
        out = model(x)
    return out, model._ats_info["tokens"]


# ---------------------------------------------------------------------------
# Sampling: the worked examples of the spec (section 3)
# ---------------------------------------------------------------------------

def _sample(p, k, excluded=None):
    s = ats.inverse_transform_sampling(torch.tensor([p]), k - 1,
                                       None if excluded is None else torch.tensor([excluded]))
    kept = (s.kept_entries()[0].nonzero().flatten() + 1).tolist()
    return kept, (s.picks[0] - s.first[0]).tolist()


@pytest.mark.parametrize("p, k, kept, picks", [
    ((0.40, 0.05, 0.30, 0.10, 0.15), 6, [1, 3, 4, 5], [1, 2, 3, 3, 4]),
    ((0.40, 0.05, 0.30, 0.10, 0.15), 11, [1, 3, 4, 5], [1, 2, 2, 2, 3, 3, 3, 4, 4, 4]),
    ((0.40, 0.05, 0.30, 0.10, 0.15), 4, [1, 3, 5], [2, 3, 4]),
    ((0.02, 0.5, 0.03, 0.05, 0.2, 0.04, 0.16), 8, [2, 3, 4, 5, 7], [1, 3, 4, 5, 5, 6, 6]),
])
def test_worked_examples(p, k, kept, picks):
    assert _sample(p, k) == (kept, picks)


def test_sample_points_match_the_official_values():
    ys = ats.sample_points(torch.tensor([0.10 / 0.95]), 5)  # c^ = (0, 0.10, 0.25, 0.55, 0.95) / 0.95
    torch.testing.assert_close(ys[0], torch.tensor([0.10526, 0.32895, 0.55263, 0.77632, 1.0]), atol=1e-5, rtol=0)
    assert ys[0, 0] == torch.tensor(0.10 / 0.95)


def test_excluded_entries_are_invisible():
    """Padding entries anywhere in the vector change nothing (batch padding is invisible)."""
    base = (0.02, 0.5, 0.03, 0.05, 0.2, 0.04, 0.16)
    padded = (0.0, 0.02, 0.5, 0.0, 0.03, 0.05, 0.2, 0.04, 0.0, 0.16)
    excluded = (True, False, False, True, False, False, False, False, True, False)
    kept, picks = _sample(padded, 8, excluded)
    original = [i for i, e in enumerate(excluded, start=1) if not e]
    assert [original.index(t) + 1 for t in kept] == _sample(base, 8)[0]
    assert picks == _sample(base, 8)[1]
    # caps below the count: the crop to the top S ranks ignores the padding as well
    assert _sample(padded, 4, excluded)[1] == _sample(base, 4)[1]


def test_sampling_invariants_on_random_scores():
    torch.manual_seed(3)
    for m in (5, 16, 40):
        p = torch.rand(64, m) ** 3
        p = p / p.sum(dim=1, keepdim=True)
        s = ats.inverse_transform_sampling(p, m)  # K = m + 1 >= n_in
        order = p.argsort(dim=1)
        kept = s.kept_entries()
        rows = torch.arange(64)
        assert not kept[rows, order[:, 0]].any()  # lowest never
        assert kept[rows, order[:, 1]].all() and kept[rows, order[:, -1]].all()  # second-lowest, highest always
        assert ((s.counts >= 2) & (s.counts <= m - 1)).all()
        capped = ats.inverse_transform_sampling(p, 3)  # K = 4: at most 3 patches
        assert (capped.counts <= 3).all()


def test_single_entry_keeps_it():
    s = ats.inverse_transform_sampling(torch.tensor([[0.0, 1.0]]), 7, torch.tensor([[True, False]]))
    assert s.kept_entries().tolist() == [[False, True]]


# ---------------------------------------------------------------------------
# The patched model against the official algorithm
# ---------------------------------------------------------------------------

CONFIGS = [
    pytest.param(dict(blocks=[1, 2, 3, 4, 5]), id="multi"),
    pytest.param(dict(blocks=[2]), id="single"),
    pytest.param(dict(blocks=[1, 3, 4], caps={1: 12, 3: 9, 4: 9}), id="caps"),
    pytest.param(dict(blocks=[1, 2, 4], caps={1: 30}), id="cap-above-n0"),
]


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("drop_tokens", [True, False], ids=["drop", "masked"])
def test_matches_official_algorithm(config, drop_tokens):
    model = make_vit()
    x = images(3)
    caps = config.get("caps")
    num_tokens = None
    if caps:
        num_tokens = [caps.get(i, 17) for i in range(6)]
    if drop_tokens:  # the official batch result depends on the batch: the reference runs one image at a time
        ref, ref_counts = official_per_image(model, x, config["blocks"], caps, True)
    else:  # the official masked layout is batch independent
        ref, ref_counts = official_forward(model, x, config["blocks"], caps, False)
    ats.patch(model, ats_blocks=config["blocks"], num_tokens=num_tokens, drop_tokens=drop_tokens)
    out, counts = run(model, x)
    assert torch.equal(counts, ref_counts)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)
    assert counts[:, -1].min() < 17  # tokens were really dropped


def test_tiny_and_base_shapes():
    for embed_dim, heads in ((24, 2), (96, 6)):
        torch.manual_seed(0)
        model = timm.create_model("deit_tiny_patch16_224", img_size=64, depth=4, embed_dim=embed_dim,
                                  num_heads=heads, num_classes=7).eval()
        _sharpen(model)
        x = images(2, seed=embed_dim)
        ref, ref_counts = official_per_image(model, x, [1, 2, 3])
        out, counts = run(ats.patch(model, ats_blocks=[1, 2, 3]), x)
        assert torch.equal(counts, ref_counts)
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)


def test_official_batch_depends_on_the_batch_ours_does_not():
    model = make_vit()
    x = images(4)
    batch_ref, batch_counts = official_forward(model, x, [1, 2, 3, 4, 5])
    alone_ref, alone_counts = official_per_image(model, x, [1, 2, 3, 4, 5])
    ats.patch(model, ats_blocks=[1, 2, 3, 4, 5])
    out, counts = run(model, x)
    assert torch.equal(counts, alone_counts)
    torch.testing.assert_close(out, alone_ref, atol=2e-5, rtol=1e-5)
    # the official padded batch: padding enters later distributions (spec section 6)
    assert not torch.equal(batch_counts, alone_counts) or (batch_ref - alone_ref).abs().max() > 1e-3


# ---------------------------------------------------------------------------
# Per-image semantics, layouts, caps
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("drop_tokens", [True, False], ids=["drop", "masked"])
def test_every_image_gets_its_batch_of_one_answer(drop_tokens):
    model = ats.patch(make_vit(), ats_blocks=[1, 2, 3, 4, 5], drop_tokens=drop_tokens)
    x = images(6)
    out, counts = run(model, x)
    assert len(set(counts[:, -1].tolist())) > 1, "the batch should mix images keeping different counts"
    for i in range(x.shape[0]):
        alone, alone_counts = run(model, x[i:i + 1])
        torch.testing.assert_close(out[i:i + 1], alone, atol=1e-5, rtol=1e-5)
        assert torch.equal(alone_counts[0], counts[i])
    # reversed batch order, same answers
    rev, rev_counts = run(model, x.flip(0))
    torch.testing.assert_close(rev.flip(0), out, atol=1e-5, rtol=1e-5)
    assert torch.equal(rev_counts.flip(0), counts)


def test_drop_layout_invariants():
    model = ats.patch(make_vit(depth=6), ats_blocks=[1, 2, 3, 4, 5], num_tokens=[17, 17, 14, 17, 12, 12])
    outputs = []
    for block in model.blocks:
        block.register_forward_hook(lambda module, args, out: outputs.append(out))
    x = images(5)
    _, counts = run(model, x)
    caps = {1: 17, 2: 14, 3: 17, 4: 12, 5: 12}
    n_in = torch.full((5,), 17)
    for i, count in enumerate(counts.T):
        if i in caps:
            assert ((count - 1 >= 1) & (count <= torch.clamp(n_in, max=caps[i]))).all()
            assert (count <= n_in).all()
        n_in = count
        # padded rows are exactly zero, real rows are not
        y = outputs[i]
        assert y.shape[1] == int(count.max())
        rows = torch.arange(y.shape[1])[None] < count[:, None]
        assert (y[~rows] == 0).all() and (y[rows].abs().sum(-1) > 0).all()
    assert (counts[:, 1:] <= counts[:, :-1]).all()
    # cls stays at index 0: kept positions index patches only, and the class row is the model's
    for block_index, positions in model._ats_info["kept"].items():
        real = positions >= 0
        assert (positions[real] < 16).all()
        assert torch.equal(real.sum(1) + 1, counts[:, block_index])


def test_masked_layout():
    model = make_vit()
    caps = [17, 14, 17, 12, 12, 17]
    drop = ats.patch(copy.deepcopy(model), ats_blocks=[1, 3, 4], num_tokens=caps)
    masked = ats.patch(model, ats_blocks=[1, 3, 4], num_tokens=caps, drop_tokens=False)
    outputs = []
    for block in masked.blocks:
        block.register_forward_hook(lambda module, args, out: outputs.append(out))
    x = images(4)
    _, counts = run(masked, x)
    lengths = [y.shape[1] for y in outputs]
    assert lengths == [17, 14, 14, 12, 12, 12]  # min(K, rows) at ATS blocks 1 (K 14), 3 (K 12), 4 (K 12)
    for y, count in zip(outputs, counts.T):
        filled = y.abs().sum(-1) > 0
        assert torch.equal(filled.sum(1), count)  # masked rows exactly 0, real rows not
        rows = torch.arange(y.shape[1])[None] < count[:, None]
        assert torch.equal(filled, rows)  # real rows first
    # the first ATS block selects as the drop layout does
    run(drop, x)
    drop_kept = drop._ats_info["kept"][1]
    masked_kept = masked._ats_info["kept"][1]
    width = min(drop_kept.shape[1], masked_kept.shape[1])
    assert torch.equal(drop_kept[:, :width], masked_kept[:, :width])
    assert (drop_kept[:, width:] == -1).all() and (masked_kept[:, width:] == -1).all()


def test_caps():
    model = make_vit()
    x = images(3)
    default, default_counts = run(ats.patch(model, ats_blocks=[1, 2, 3]), x)
    explicit, explicit_counts = run(ats.patch(model, ats_blocks=[1, 2, 3], num_tokens=17), x)
    assert torch.equal(default, explicit) and torch.equal(default_counts, explicit_counts)
    listed, listed_counts = run(ats.patch(model, ats_blocks=[1, 2, 3], num_tokens=[5, 17, 17, 17, 5, 5]), x)
    assert torch.equal(default, listed)  # entries at non-ATS blocks are ignored
    _, capped = run(ats.patch(model, ats_blocks=[1, 2, 3], num_tokens=9), x)
    assert (capped[:, 1:4] <= 9).all()
    for bad in (7, 3.5, [9, 9], "9", True):
        with pytest.raises(ModelConfigError):
            ats.patch(model, ats_blocks=[1], num_tokens=bad)
    for bad in ([6], [-1], [1, 1], "3", [1.0]):
        with pytest.raises(ModelConfigError):
            ats.patch(model, ats_blocks=bad)
    with pytest.raises(ModelConfigError):
        ats.patch(model, drop_tokens="yes")


# ---------------------------------------------------------------------------
# Patch mechanics, training, state dict
# ---------------------------------------------------------------------------

def test_no_ats_blocks_and_unpatch_give_timm():
    model = make_vit()
    x = images(2)
    with torch.no_grad():
        reference = model(x)
    classes = [type(m) for m in model.modules()]
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    ats.patch(model, ats_blocks=())
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference, atol=1e-5, rtol=0)
    assert model._ats_info["tokens"].tolist() == [[17] * 6] * 2
    ats.patch(model)  # default blocks 3..5
    assert model._ats_cfg.ats_blocks == [3, 4, 5]
    ats.patch(model, ats_blocks=[1, 2])
    twice = run(model, x)[0]
    ats.patch(model, ats_blocks=[1, 2])
    torch.testing.assert_close(run(model, x)[0], twice, atol=0, rtol=0)
    assert set(model.state_dict()) == set(keys)
    assert all(torch.equal(v, keys[k]) for k, v in model.state_dict().items())
    ats.unpatch(model)
    assert [type(m) for m in model.modules()] == classes
    assert not ats.is_patched(model) and not hasattr(model, "_ats_cfg")
    with torch.no_grad():
        assert torch.equal(model(x), reference)


def test_train_equals_eval_gradients_and_determinism():
    model = ats.patch(make_vit(), ats_blocks=[1, 2, 3, 4, 5])
    x = images(3)
    out_eval, counts = run(model, x)
    model.train()
    out_train = model(x)
    torch.testing.assert_close(out_train, out_eval, atol=0, rtol=0)
    out_train.logsumexp(-1).sum().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
    model.eval()
    again, again_counts = run(model, x)
    assert torch.equal(again, out_eval) and torch.equal(again_counts, counts)


def test_distilled_model_keeps_both_prefix_tokens():
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_distilled_patch16_224", img_size=64, depth=4, **TINY).eval()
    _sharpen(model)
    ats.patch(model, ats_blocks=[1, 2, 3])
    x = images(3)
    out, counts = run(model, x)
    assert counts[0, 0] == 18 and (counts[:, -1] < 18).all()
    for i in range(3):
        alone, _ = run(model, x[i:i + 1])
        torch.testing.assert_close(out[i:i + 1], alone, atol=1e-5, rtol=1e-5)


def test_refused_models():
    from models import tome
    with pytest.raises(ModelConfigError, match="ToMe"):
        ats.patch(tome.patch(make_vit(), r=2))
    with pytest.raises(ModelConfigError, match="class token"):
        ats.patch(timm.create_model("vit_small_patch16_224", img_size=64, depth=2, global_pool="avg", **TINY))
    with pytest.raises(ModelConfigError, match="EViT"):
        ats.patch(timm.create_model("deit_small_patch16_shrink_base", img_size=64, depth=4, **TINY))


def test_deployed_shrink_model():
    torch.manual_seed(0)
    model = timm.create_model("deit_small_patch16_224_shrink", img_size=64, depth=6, done_layer=[2], **TINY).eval()
    _sharpen(model)
    with pytest.raises(ModelConfigError, match="no attention"):
        ats.patch(model, ats_blocks=[2, 3])
    ats.patch(model, ats_blocks=[1, 3, 4])
    x = images(3)
    out, counts = run(model, x)
    for i in range(3):
        torch.testing.assert_close(run(model, x[i:i + 1])[0], out[i:i + 1], atol=1e-5, rtol=1e-5)
    assert ats.ats_macs(model, counts[0].tolist()) > 0


def test_hooks_and_intermediates():
    model = ats.patch(make_vit(), ats_blocks=[1, 3, 4])
    x = images(3)
    outputs = []
    for block in model.blocks:
        block.register_forward_hook(lambda module, args, out: outputs.append(out))
    with torch.no_grad():
        features = model.forward_features(x)
        assert len(outputs) == 6 and all(isinstance(o, torch.Tensor) for o in outputs)
        outputs.clear()
        final, intermediates = model.forward_intermediates(x, output_fmt="NLC")
    torch.testing.assert_close(final, features)
    for y, out in zip(intermediates, outputs):
        torch.testing.assert_close(y, out[:, 1:])
    assert intermediates[-1].shape[1] < intermediates[0].shape[1]
    with pytest.raises(ModelConfigError, match="NLC"):
        model.forward_intermediates(x)


# ---------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------

def test_official_trainer_checkpoint_filter():
    model = make_vit(depth=4)
    state = model.state_dict()
    official = {"model_state": {f"module.{k}": v.clone() for k, v in state.items()}, "epoch": 3}
    for i in (1, 2, 3):
        official["model_state"][f"module.blocks.{i}.attn.out_zero_mask"] = torch.zeros(1, 48)
    fresh = make_vit(depth=4)
    fresh.load_state_dict(ats.checkpoint_filter_fn(official, fresh), strict=True)
    assert all(torch.equal(v, state[k]) for k, v in fresh.state_dict().items())
    official["model_state"]["module.blocks.2.attn.out_zero_mask"][0, 3] = 1.0
    with pytest.raises(ModelConfigError, match="out_zero_mask"):
        ats.checkpoint_filter_fn(official, fresh)


# ---------------------------------------------------------------------------
# FLOPs
# ---------------------------------------------------------------------------

def test_flops_formula_matches_the_published_deit_counts():
    for name, expected in (("deit_small_patch16_224", 4.60), ("deit_tiny_patch16_224", 1.25),
                           ("deit_base_patch16_224", 17.56)):
        model = ats.patch(timm.create_model(name, pretrained=False), ats_blocks=())
        assert round(ats.ats_macs(model, [197] * 12) / 1e9, 2) == expected


def test_flops_formula_on_the_public_case_counts():
    model = ats.patch(timm.create_model("deit_small_patch16_224"), ats_blocks=list(range(3, 12)))
    tokens = [[197, 197, 197, 165, 151, 144, 138, 134, 131, 129, 127, 125],
              [197, 197, 197, 168, 151, 143, 139, 133, 130, 129, 127, 125]]
    gmacs = ats.ats_gmacs(model, tokens)
    assert [round(g, 4) for g in gmacs.tolist()] == [3.5726, 3.5748]
    # the official profile charges every image the batch's largest counts, and A v on every row
    assert ats.padded_batch_gmacs(model, torch.tensor(tokens)) > gmacs.max()


def _fvcore_macs(model, x):
    import importlib
    try:
        return importlib.import_module("models.flops").fvcore_macs(model, x)
    except ImportError:  # before the counter moved into models/
        return importlib.import_module("flops")._fvcore_macs(model, x)


def test_flops_formula_equals_fvcore_per_image():
    pytest.importorskip("fvcore")
    model = ats.patch(make_vit(), ats_blocks=[1, 2, 3, 4, 5])
    x = images(3)
    for i in range(3):
        macs, _ = _fvcore_macs(model, x[i:i + 1])
        tokens = model._ats_info["tokens"][0].tolist()
        assert len(set(tokens)) > 1
        assert macs == ats.ats_macs(model, tokens, include_norms=True, convention="executed")
        # the paper's convention charges the full q k^T and A v on the kept rows: (n^2 - n - n' n) C
        # more per ATS block than the class row plus fused attention of the kept rows
        entering = [17] + tokens[:-1]
        extra = sum((entering[i] ** 2 - entering[i] - tokens[i] * entering[i]) * 48 for i in (1, 2, 3, 4, 5))
        assert ats.ats_macs(model, tokens, include_norms=True) - macs == extra >= 0


# ---------------------------------------------------------------------------
# bf16
# ---------------------------------------------------------------------------

def test_bf16_scores_are_float32():
    model = ats.patch(make_vit(), ats_blocks=[1, 2, 3])
    x = images(2)
    _, counts = run(model, x)
    seen = []
    original = ats.significance_scores

    def spy(cls_attn, v, *args, **kwargs):
        seen.append(cls_attn.dtype)
        out = original(cls_attn, v, *args, **kwargs)
        seen.append(out.dtype)
        return out

    ats.significance_scores = spy
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
            out = model(x)
    finally:
        ats.significance_scores = original
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    assert seen and all(d == torch.float32 for d in seen)
    bf16_counts = model._ats_info["tokens"]
    assert (bf16_counts - counts).abs().max() <= 2  # near-ties may flip, the selection is the fp32 one
    model.to(torch.bfloat16)  # bf16 weights (main.py --bf16-weights)
    with torch.no_grad():
        out = model(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    assert (model._ats_info["tokens"] - counts).abs().max() <= 2


# ---------------------------------------------------------------------------
# torch.compile: data-dependent token counts as unbacked sizes, no graph breaks
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("drop_tokens,training", [
    pytest.param(True, False, id="drop-eval"),
    pytest.param(True, True, id="drop-train", marks=pytest.mark.slow),
    pytest.param(False, False, id="masked-eval", marks=pytest.mark.slow),
    pytest.param(False, True, id="masked-train", marks=pytest.mark.slow),
])
def test_compiles_in_one_graph_and_matches_eager(drop_tokens, training):
    from models.compiling import dynamo_settings
    model = ats.patch(make_vit(depth=4), ats_blocks=[1, 2, 3], num_tokens=None if drop_tokens else 14,
                      drop_tokens=drop_tokens).train(training)
    x = images(3)
    torch._dynamo.reset()
    with torch.set_grad_enabled(training), torch._dynamo.config.patch(**dynamo_settings(model)):
        explanation = torch._dynamo.explain(model)(x)
        assert explanation.graph_break_count == 0, [str(r.reason) for r in explanation.break_reasons]
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        want, want_counts = model(x), model._ats_info["tokens"]
        for batch in (x, images(3, seed=7)):  # other images, other counts: the same graph
            got = compiled(batch)
            if batch is x:
                torch.testing.assert_close(got, want, rtol=0, atol=0)
                assert torch.equal(model._ats_info["tokens"], want_counts)
    assert (want_counts != want_counts[:1]).any()  # the images keep different counts


@pytest.mark.slow
def test_inductor_compiled_matches_eager_without_recompiling():
    from models.compiling import compile_model
    model = ats.patch(make_vit(depth=3), ats_blocks=[1, 2])
    torch._dynamo.reset()
    compiled = compile_model(model, fullgraph=True, dynamic=False)
    with torch.no_grad():
        for seed in (1, 2):
            x = images(3, seed=seed)
            want, counts = run(model, x)
            torch.testing.assert_close(compiled(x), want, rtol=1e-4, atol=1e-5)
            assert torch.equal(model._ats_info["tokens"], counts)


# ---------------------------------------------------------------------------
# Visualisation
# ---------------------------------------------------------------------------

def test_visualisation_of_kept_tokens(tmp_path):
    from PIL import Image

    from tools import ats_visualize
    model = ats.patch(make_vit(), ats_blocks=[1, 3, 5])
    x = images(2)
    masks = ats_visualize.kept_masks(model, x)
    counts = model._ats_info["tokens"]
    assert sorted(masks) == [1, 3, 5]
    for block, mask in masks.items():
        assert mask.shape == (2, 4, 4)
        assert torch.equal(mask.flatten(1).sum(1) + 1, counts[:, block])  # the kept patches, per image
    assert (masks[1] | ~masks[5]).all()  # a patch dropped once stays dropped
    out = tmp_path / "kept.png"
    assert ats_visualize.main(["--model", "deit_small_patch16_224", "--input-size", "64", "--model-kwargs",
                               "{'depth': 4, 'embed_dim': 48, 'num_heads': 3}", "--ats-blocks", "1", "2",
                               "--out", str(out)]) == 0
    strip = Image.open(out)
    assert strip.size == (64 * 3, 64 + ats_visualize.TITLE_HEIGHT)
    assert ats_visualize.main(["--ats-blocks", "9", "--input-size", "64", "--model-kwargs", "{'depth': 2}",
                               "--out", str(out)]) == 2


# ---------------------------------------------------------------------------
# --target-gmacs: the token budget
# ---------------------------------------------------------------------------

def test_token_budget_search_reaches_the_target_and_is_reproducible():
    pytest.importorskip("fvcore")
    from models.factory import create_model
    from models.flops import count_flops

    def build(k):
        return create_model("deit_tiny_patch16_224", options={"ats_num_tokens": k}, num_classes=10, img_size=32,
                            model_kwargs=dict(depth=4, embed_dim=32, num_heads=2, patch_size=8)).eval()

    def gmacs_of(model):
        return count_flops(model, (32, 32))["gmacs"]

    torch.manual_seed(5)
    low, high = gmacs_of(build(8)), gmacs_of(build(17))
    target = (low + high) / 2
    torch.manual_seed(5)
    k, gmacs = ats.search_num_tokens(build, target, gmacs_of)
    assert 8 <= k <= 17 and abs(gmacs - target) <= (high - low) / 2
    assert gmacs_of(build(k)) == gmacs  # the caller's own build and count of K see the search's input
    with pytest.raises(ModelConfigError, match="above the unreduced model"):
        ats.search_num_tokens(build, high * 1.5, gmacs_of)
