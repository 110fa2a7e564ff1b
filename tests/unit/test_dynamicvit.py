"""DynamicViT (models/dynamicvit.py): the checks of docs/methods/dynamicvit.md and more.

The eval forward is compared with an independent, slow re-statement of the official code
(explicit attention, the predictor written with functional ops, per-sample argsort and
gather) on every size's head layout at small dims, several rates, locations and batches.
"""
import math
from fractions import Fraction

import pytest
import timm
import torch
import torch.nn.functional as F

import models  # noqa: F401  (registers the models)
from models import dynamicvit
from models.errors import ModelConfigError
from vit_utils import block_lengths, run_lengths

# head layouts of tiny / 256 / small / base at 8 channels per head (the predictors need C % 4 == 0)
SIZES = {"tiny": (24, 3), "256": (32, 4), "small": (48, 6), "base": (96, 12)}


def make(size="small", img_size=64, depth=12, num_classes=10, **kwargs):
    dim, heads = SIZES[size]
    torch.manual_seed(0)
    model = timm.create_model(f"dynamicvit_deit_{size}_patch16_224", img_size=img_size, embed_dim=dim,
                              num_heads=heads, depth=depth, num_classes=num_classes, **kwargs)
    _spread(model.score_predictor)
    return model


def _spread(predictors):
    """Random predictor weights large enough that keep scores are far apart (no near-ties)."""
    with torch.no_grad():
        for name, p in predictors.named_parameters():
            if name.endswith("weight") and p.dim() == 2:
                p.normal_(0, 1.0 / math.sqrt(p.shape[1]) * 2)


def plain_deit(model):
    """A timm DeiT with the backbone weights of `model`."""
    deit = timm.create_model("deit_small_patch16_224", img_size=model.patch_embed.img_size, embed_dim=model.embed_dim,
                             num_heads=model.blocks[0].attn.num_heads, depth=len(model.blocks),
                             num_classes=model.num_classes)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("score_predictor.")}
    deit.load_state_dict(state, strict=True)
    return deit.eval()


# ---------------------------------------------------------------------------
# The official eval forward, re-stated
# ---------------------------------------------------------------------------

def ref_predictor(pred, x, policy):
    ln, lin = pred.in_conv[0], pred.in_conv[1]
    h = F.gelu(F.linear(F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, 1e-5), lin.weight, lin.bias))
    c = h.shape[-1]
    local = h[:, :, :c // 2]
    glob = (h[:, :, c // 2:] * policy).sum(dim=1, keepdim=True) / torch.sum(policy, dim=1, keepdim=True)
    z = torch.cat([local, glob.expand(-1, h.shape[1], -1)], dim=-1)
    o = pred.out_conv
    z = F.gelu(F.linear(z, o[0].weight, o[0].bias))
    z = F.gelu(F.linear(z, o[2].weight, o[2].bias))
    return torch.log_softmax(F.linear(z, o[4].weight, o[4].bias), dim=-1)


def ref_block(blk, x):
    b, n, c = x.shape
    a = blk.attn
    qkv = a.qkv(blk.norm1(x)).reshape(b, n, 3, a.num_heads, c // a.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = ((q @ k.transpose(-2, -1)) * a.scale).softmax(dim=-1)
    x = x + a.proj((attn @ v).transpose(1, 2).reshape(b, n, c))
    return x + blk.mlp(blk.norm2(x))


def ref_eval_forward(model, img, ratios, locs):
    """Official VisionTransformerDiffPruning eval forward; returns logits and kept original ids per location."""
    b = img.shape[0]
    x = model.patch_embed(img)
    x = torch.cat([model.cls_token.expand(b, -1, -1), x], dim=1) + model.pos_embed
    init_n = x.shape[1] - 1
    prev = torch.ones(b, init_n, 1)
    ids = torch.arange(init_n).expand(b, init_n)
    kept_ids = []
    p = 0
    for i, blk in enumerate(model.blocks):
        if i in locs:
            score = ref_predictor(model.score_predictor[p], x[:, 1:], prev)[:, :, 0]
            keep = int(init_n * ratios[p])
            order = torch.argsort(score, dim=1, descending=True)[:, :keep]
            x = torch.stack([torch.cat([x[s, :1], x[s, 1:][order[s]]]) for s in range(b)])
            prev = torch.stack([prev[s][order[s]] for s in range(b)])
            ids = torch.stack([ids[s][order[s]] for s in range(b)])
            kept_ids.append(ids)
            p += 1
        x = ref_block(blk, x)
    return model.head(model.norm(x)[:, 0]), kept_ids


@pytest.mark.parametrize("size", sorted(SIZES))
@pytest.mark.parametrize("rate,locs,batch", [(0.7, (3, 6, 9), 2), (0.5, (3, 6, 9), 3), (0.9, (3, 6, 9), 1),
                                             (0.6, (0, 5), 2), (0.8, (11,), 2)])
def test_eval_matches_official_restatement(size, rate, locs, batch):
    model = make(size, img_size=96, base_rate=rate, pruning_loc=locs).eval()
    x = torch.randn(batch, 3, 96, 96)
    ratios = [rate ** (k + 1) for k in range(len(locs))]
    with torch.no_grad():
        out, ids = model.forward_kept(x)
        ref, ref_ids = ref_eval_forward(model, x, ratios, locs)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert len(ids) == len(ref_ids)
    for got, want in zip(ids, ref_ids):
        assert [sorted(r) for r in got.tolist()] == [sorted(r) for r in want.tolist()]


def test_explicit_token_ratio_overrides_base_rate():
    model = make("small", img_size=96, base_rate=0.9, token_ratio=[0.8, 0.3, 0.5]).eval()
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        out, ids = model.forward_kept(x)
        ref, ref_ids = ref_eval_forward(model, x, [0.8, 0.3, 0.5], (3, 6, 9))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # the third ratio (18 of 36) is above what is left (10): the location keeps everything it has
    assert [i.shape[1] for i in ids] == [28, 10] and model.token_ratio == (0.8, 0.3, 0.5)


# ---------------------------------------------------------------------------
# Checks 1-5 (eval)
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [dict(token_ratio=[1, 1, 1]), dict(base_rate=1.0)])
def test_nothing_pruned_equals_deit(kwargs):
    model = make("small", **kwargs).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain_deit(model)(x), rtol=0, atol=1e-5)


COUNTS = {0.5: (98, 49, 24), 0.6: (117, 70, 42), 0.7: (137, 96, 67), 0.8: (156, 125, 100), 0.9: (176, 158, 142)}


@pytest.mark.parametrize("rate", sorted(COUNTS))
def test_sequence_lengths_at_224(rate):
    model = make("tiny", img_size=224, depth=10, base_rate=rate).eval()
    _, lengths = run_lengths(model, torch.randn(2, 3, 224, 224))
    expected = tuple(k + 1 for k in COUNTS[rate])
    assert lengths[:3] == [197] * 3
    assert (lengths[3], lengths[6], lengths[9]) == expected
    assert lengths[3:6] == [expected[0]] * 3 and lengths[6:9] == [expected[1]] * 3
    assert model.keep_counts() == COUNTS[rate]


def test_keep_counts_are_the_exact_floor():
    """int(196 * rho**k) in double equals the rational floor for every two-decimal rho (round would not)."""
    for hundredths in range(1, 100):
        rho = hundredths / 100
        counts = dynamicvit.keep_counts(dynamicvit.keep_ratios(rho, 3), 196)
        exact = tuple(math.floor(196 * Fraction(hundredths, 100) ** k) for k in (1, 2, 3))
        assert counts == exact, rho
    assert dynamicvit.keep_counts(dynamicvit.keep_ratios(0.9, 3), 196)[1] == 158  # 158.76: round gives 159


def test_kept_set_is_topk_of_keep_score_and_cls_stays_first():
    model = make("small", img_size=96).eval()
    x = torch.randn(3, 3, 96, 96)
    inputs = {}
    model.blocks[3].register_forward_pre_hook(lambda m, args: inputs.setdefault("x", args[0]))
    outs = {}
    model.blocks[3].register_forward_hook(lambda m, args, out: outs.setdefault("x", out))
    with torch.no_grad():
        _, ids = model.forward_kept(x)
        scores = model.score_predictor[0](inputs["x"][:, 1:])[..., 0]
    keep = model.keep_counts(36)[0]
    expected = scores.topk(keep, dim=1).indices
    assert [sorted(r) for r in ids[0].tolist()] == [sorted(r) for r in expected.tolist()]
    # the drop score [..., 1] would select another set
    wrong = scores.topk(keep, dim=1, largest=False).indices
    assert [sorted(r) for r in wrong.tolist()] != [sorted(r) for r in expected.tolist()]
    # kept tokens in descending score order; cls first
    ordered = scores.gather(1, ids[0])
    assert torch.all(ordered[:, :-1] >= ordered[:, 1:])
    assert outs["x"].shape[1] == keep + 1


def test_predictor_masked_mean_and_log_probabilities():
    pred = dynamicvit.PredictorLG(48)
    _spread(pred)
    x = torch.randn(2, 10, 48)
    policy = (torch.rand(2, 10, 1) > 0.4).float()
    policy[:, 0] = 1
    out = pred(x, policy)
    torch.testing.assert_close(out.logsumexp(-1), torch.zeros(2, 10), atol=1e-6, rtol=0)
    changed = x.clone()
    dropped = policy[..., 0] == 0
    changed[dropped] = torch.randn(int(dropped.sum()), 48) * 5
    out2 = pred(changed, policy)
    active = ~dropped
    torch.testing.assert_close(out2[active], out[active], rtol=0, atol=0)
    # the global half is the masked mean: equal to the plain mean over only the active tokens
    one = pred(x[:1, active[0]], None)
    torch.testing.assert_close(one, out[:1, active[0]], rtol=1e-6, atol=1e-6)
    assert pred.in_conv[0].eps == 1e-5


def test_batch_independence():
    model = make("small", img_size=96).eval()
    x = torch.randn(4, 3, 96, 96)
    with torch.no_grad():
        batched = model(x)
        single = torch.cat([model(x[i:i + 1]) for i in range(4)])
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# Checks 6-8 (training forward)
# ---------------------------------------------------------------------------

def test_train_masks_nested_binary_and_lengths_constant():
    model = make("small", img_size=96).train()
    lengths, _ = block_lengths(model)
    torch.manual_seed(3)
    out = model(torch.randn(4, 3, 96, 96))
    assert set(out) == {"logits", "tokens", "decision", "masks"}
    masks = out["masks"]
    assert len(masks) == 3 and all(m.shape == (4, 36) for m in masks)
    for m in masks:
        assert torch.all((m == 0) | (m == 1))
    assert torch.all(masks[1] <= masks[0]) and torch.all(masks[2] <= masks[1])
    assert torch.equal(out["decision"], masks[2][..., None]) and not out["decision"].requires_grad
    assert lengths == [37] * 12
    assert out["tokens"].shape == (4, 36, 48) and out["logits"].shape == (4, 10)


def test_gumbel_draws_match_torch_gumbel_softmax_under_the_same_seed():
    """The only random numbers of a training forward are three gumbel_softmax draws on [B, N, 2]."""
    model = make("small", img_size=64).train()
    x = torch.randn(2, 3, 64, 64)
    captured = []
    original = dynamicvit.gumbel_keep_decision

    def spy(log_probs, decision):
        captured.append((log_probs.detach().clone(), None if decision is None else decision.clone()))
        return original(log_probs, decision)

    dynamicvit.gumbel_keep_decision = spy
    try:
        torch.manual_seed(11)
        masks = model(x)["masks"]
    finally:
        dynamicvit.gumbel_keep_decision = original
    torch.manual_seed(11)
    decision = torch.ones(2, 16, 1)
    for (log_probs, _), mask in zip(captured, masks):
        decision = F.gumbel_softmax(log_probs, hard=True)[:, :, 0:1] * decision
        assert torch.equal(decision.reshape(2, 16), mask)


def test_policy_softmax_weights():
    torch.manual_seed(0)
    n = 7
    logits = torch.randn(2, 3, n, n)
    policy = torch.tensor([1, 1, 0, 1, 0, 0, 1.]).expand(2, n).reshape(2, n, 1).clone()
    a = dynamicvit.policy_softmax(logits, policy)
    e = (logits - logits.amax(-1, keepdim=True)).exp()
    active = policy[0, :, 0].bool()
    eps = dynamicvit.POLICY_EPS
    for q in range(n):
        allowed = active.clone()
        allowed[q] = True
        s = e[..., q, allowed].sum(-1)
        for key in range(n):
            if allowed[key]:
                want = (e[..., q, key] + eps / n) / (s + eps)
            else:
                want = (eps / n) / (s + eps)  # the uniform leak to a masked key
            torch.testing.assert_close(a[..., q, key], want, rtol=1e-6, atol=1e-12)
    ones = dynamicvit.policy_softmax(logits, None)
    torch.testing.assert_close(ones, logits.softmax(-1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dynamicvit.policy_softmax(logits, torch.ones(2, n, 1)), ones, rtol=0, atol=0)


def test_train_forward_keeping_everything_equals_deit(monkeypatch):
    model = make("small", img_size=64).train()
    monkeypatch.setattr(dynamicvit, "gumbel_keep_decision",
                        lambda log_probs, decision: torch.ones_like(log_probs[..., :1]))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = model(x)
        torch.testing.assert_close(out["logits"], plain_deit(model)(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("size", ["tiny", "base"])
def test_train_forward_forced_to_eval_sets_equals_eval(size, monkeypatch):
    model = make(size, img_size=96).eval()
    x = torch.randn(3, 3, 96, 96)
    with torch.no_grad():
        logits, ids = model.forward_kept(x)
    forced = []
    for kept in ids:
        mask = torch.zeros(3, 36, 1)
        mask.scatter_(1, kept[..., None], 1.0)
        forced.append(mask)

    def forced_decision(log_probs, decision):
        return forced.pop(0)

    monkeypatch.setattr(dynamicvit, "gumbel_keep_decision", forced_decision)
    model.train()
    with torch.no_grad():
        out = model(x)
    torch.testing.assert_close(out["logits"], logits, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------
# State dict, errors, intermediates, precision
# ---------------------------------------------------------------------------

def test_state_dict_layout_and_deit_checkpoint_load():
    model = timm.create_model("dynamicvit_deit_small_patch16_224", embed_dim=48, num_heads=6, num_classes=10)
    keys = list(model.state_dict())
    assert len(keys) == 182
    predictor = [k for k in keys if k.startswith("score_predictor.")]
    assert len(predictor) == 30
    assert "score_predictor.2.out_conv.4.weight" in keys and "score_predictor.0.in_conv.0.bias" in keys
    assert model.state_dict()["score_predictor.1.out_conv.2.weight"].shape == (12, 24)
    deit = timm.create_model("deit_small_patch16_224", embed_dim=48, num_heads=6, num_classes=10)
    result = model.load_state_dict(deit.state_dict(), strict=False)
    assert sorted(result.missing_keys) == sorted(predictor) and result.unexpected_keys == []


@pytest.mark.parametrize("kwargs,match", [
    (dict(base_rate=0.0), "base_rate must be in"), (dict(base_rate=1.5), "base_rate must be in"),
    (dict(pruning_loc=(3, 12)), "outside blocks"), (dict(pruning_loc=(6, 3)), "strictly increasing"),
    (dict(pruning_loc=()), "empty"), (dict(token_ratio=[0.5, 0.4]), "one keep fraction per location"),
    (dict(token_ratio=[0.5, 0.4, 0.0]), "token_ratio entry must be"),
    (dict(base_rate=0.05), "keeps 0 of 16 patches"),
])
def test_bad_kwargs_are_config_errors(kwargs, match):
    with pytest.raises(ModelConfigError, match=match):
        make("small", **kwargs)


def test_forward_intermediates():
    model = make("small", img_size=64).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x, output_fmt="NLC")
        torch.testing.assert_close(model.forward_head(final), model(x))
        assert [t.shape[1] for t in inter] == [16] * 3 + [11] * 3 + [7] * 3 + [5] * 3
        with pytest.raises(ValueError, match="output_fmt='NLC'"):
            model.forward_intermediates(x)
    unpruned = make("small", img_size=64, base_rate=1.0).eval()
    with torch.no_grad():
        assert unpruned.forward_intermediates(x, intermediates_only=True)[0].shape == (2, 48, 4, 4)


def test_gradient_checkpointing_is_refused():
    model = make("small", img_size=64).train()
    model.set_grad_checkpointing(True)
    with pytest.raises(ValueError, match="gradient checkpointing"):
        model(torch.randn(1, 3, 64, 64))


def test_predictor_scores_in_fp32_under_bf16():
    model = make("small", img_size=64).eval()
    x = torch.randn(2, 16, 48)
    pred = model.score_predictor[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = pred(x)
    assert under.dtype == torch.float32
    assert torch.equal(under, pred(x))
    from engine import cast_for_inference
    cast_for_inference(model, torch.bfloat16)
    assert model.score_predictor[0].in_conv[1].weight.dtype == torch.float32
    assert model.blocks[0].attn.qkv.weight.dtype == torch.bfloat16
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_train_forward_under_bf16_autocast():
    model = make("small", img_size=64).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 3, 64, 64))
    assert all(m.dtype == torch.float32 for m in out["masks"])
    assert torch.isfinite(out["logits"].float()).all()


# ---------------------------------------------------------------------------
# Checks 9-10: teacher and losses
# ---------------------------------------------------------------------------

class _Base(torch.nn.Module):
    """The trainer's criterion signature: criterion(samples, outputs, targets)."""

    def forward(self, samples, outputs, targets):
        return torch.sum(-targets * F.log_softmax(outputs, dim=-1), dim=-1).mean()


class _FixedTeacher(torch.nn.Module):
    def __init__(self, logits, tokens):
        super().__init__()
        self.out = (logits, tokens)

    def forward(self, x):
        return self.out


def official_loss(outputs, labels, teacher_out, keep_ratio, ratio_weight, distill_weight):
    """losses.py DistillDiffPruningLoss_dynamic (mse_token=True, clf weight 1), re-stated."""
    pred, token_pred, mask, scores = outputs["logits"], outputs["tokens"], outputs["decision"], outputs["masks"]
    pred_loss = 0.0
    for i, score in enumerate(scores):
        pred_loss = pred_loss + ((score.mean(1) - keep_ratio[i]) ** 2).mean()
    cls_loss = torch.sum(-labels * F.log_softmax(pred, dim=-1), dim=-1).mean()
    cls_t, token_t = teacher_out
    cls_kl = F.kl_div(F.log_softmax(pred, dim=-1), F.log_softmax(cls_t, dim=-1), reduction="batchmean", log_target=True)
    b, n, c = token_pred.shape
    bool_mask = mask.reshape(b * n) > 0.5
    token_pred, token_t = token_pred.reshape(b * n, c), token_t.reshape(b * n, c)
    if mask.sum() < 0.1:
        token_loss = token_pred.new(1,).fill_(0.0)
    else:
        token_loss = torch.pow(token_pred[bool_mask] - token_t[bool_mask], 2).mean()
    return cls_loss + ratio_weight * pred_loss / 3 + distill_weight * cls_kl + distill_weight * token_loss


def random_outputs(b=4, n=16, c=8, classes=5, keep_none=False):
    masks = [(torch.rand(b, n) < 0.8).float()]
    for _ in range(2):
        masks.append(masks[-1] * (torch.rand(b, n) < 0.7).float())
    if keep_none:
        masks[2].zero_()
    return {"logits": torch.randn(b, classes), "tokens": torch.randn(b, n, c), "decision": masks[2][..., None],
            "masks": masks}


@pytest.mark.parametrize("keep_none", [False, True])
@pytest.mark.parametrize("ratio_weight,distill_weight", [(2.0, 0.5), (5.0, 0.5), (2.0, 0.3)])
def test_loss_formula(keep_none, ratio_weight, distill_weight):
    torch.manual_seed(1)
    outputs = random_outputs(keep_none=keep_none)
    labels = torch.softmax(torch.randn(4, 5), -1)
    teacher_out = (torch.randn(4, 5), torch.randn(4, 16, 8))
    ratios = dynamicvit.keep_ratios(0.7, 3)
    loss_fn = dynamicvit.DynamicViTLoss(_Base(), _FixedTeacher(*teacher_out), ratios, ratio_weight=ratio_weight,
                                        distill_weight=distill_weight)
    got = loss_fn(torch.zeros(4, 3, 8, 8), outputs, labels)
    want = official_loss(outputs, labels, teacher_out, ratios, ratio_weight, distill_weight)
    torch.testing.assert_close(got, want.reshape(()), rtol=1e-6, atol=1e-7)
    assert set(loss_fn.last_parts) == {"cls_loss", "ratio_loss", "cls_kl", "token_kl", "keep_0", "keep_1", "keep_2"}
    if keep_none:
        assert loss_fn.last_parts["token_kl"].item() == 0.0


def test_loss_without_teacher_is_diff_pruning_loss():
    torch.manual_seed(2)
    outputs = random_outputs()
    labels = torch.softmax(torch.randn(4, 5), -1)
    ratios = dynamicvit.keep_ratios(0.7, 3)
    got = dynamicvit.DynamicViTLoss(_Base(), None, ratios, ratio_weight=2.0)(None, outputs, labels)
    ratio = sum(((m.mean(1) - r) ** 2).mean() for m, r in zip(outputs["masks"], ratios))
    want = _Base()(None, outputs["logits"], labels) + 2.0 * ratio / 3
    torch.testing.assert_close(got, want)
    # eval-mode outputs (plain logits) get the base criterion only
    assert torch.equal(dynamicvit.DynamicViTLoss(_Base(), None, ratios)(None, outputs["logits"], labels),
                       _Base()(None, outputs["logits"], labels))


def test_ratio_term_alone_reaches_the_predictors():
    model = make("small", img_size=64).train()
    loss_fn = dynamicvit.DynamicViTLoss(_Base(), None, model.token_ratio, clf_weight=0.0)
    torch.manual_seed(0)
    loss = loss_fn(None, model(torch.randn(4, 3, 64, 64)), torch.full((4, 10), 0.1))
    loss.backward()
    for p in model.score_predictor.parameters():
        assert p.grad is not None
    assert all(model.score_predictor[k].out_conv[4].weight.grad.abs().sum() > 0 for k in range(3))
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0  # the masks also reach earlier blocks


def test_teacher_is_the_students_deit():
    student = make("small", img_size=64)
    deit = plain_deit(student)
    teacher = dynamicvit.DeiTTeacher.like(student, deit.state_dict())
    teacher.train()
    assert not teacher.vit.training and not any(p.requires_grad for p in teacher.parameters())
    x = torch.randn(2, 3, 64, 64)
    logits, tokens = teacher(x)
    with torch.no_grad():
        features = deit.forward_features(x)
        assert torch.equal(logits, deit.forward_head(features)) and torch.equal(tokens, features[:, 1:])
    # the full objective with this teacher backpropagates into predictors and backbone
    student.train()
    loss_fn = dynamicvit.DynamicViTLoss(_Base(), teacher, student.token_ratio)
    loss_fn(x, student(x), torch.full((2, 10), 0.1)).backward()
    assert student.score_predictor[2].in_conv[1].weight.grad.abs().sum() > 0
    assert set(loss_fn.last_parts) >= {"cls_kl", "token_kl"}
    with pytest.raises(ModelConfigError, match="does not fit"):
        dynamicvit.DeiTTeacher.like(make("tiny", img_size=64), deit.state_dict())


def test_load_checkpoint_state_official_layout(tmp_path):
    import argparse
    model = make("small", img_size=64)
    path = tmp_path / "ckpt.pth"
    torch.save({"model": model.state_dict(), "epoch": 29, "args": argparse.Namespace(model="deit-s")}, path)
    state = dynamicvit.load_checkpoint_state(str(path))
    assert state.keys() == model.state_dict().keys()
    torch.save({"module." + k: v for k, v in model.state_dict().items()}, tmp_path / "bare.pth")
    assert dynamicvit.load_checkpoint_state(str(tmp_path / "bare.pth")).keys() == state.keys()
    with pytest.raises(ModelConfigError, match="no checkpoint file at .*missing.pth"):
        dynamicvit.load_checkpoint_state(str(tmp_path / "missing.pth"))


# ---------------------------------------------------------------------------
# Visualisation
# ---------------------------------------------------------------------------

def test_visualize_kept_patches(tmp_path):
    from PIL import Image

    from tools import dynamicvit_visualize
    model = make("small", img_size=64, base_rate=0.5).eval()
    masks = dynamicvit_visualize.kept_masks(model, torch.randn(2, 3, 64, 64))
    assert [int(m[0].sum()) for m in masks] == list(model.keep_counts())
    assert torch.all(masks[1] <= masks[0]) and torch.all(masks[2] <= masks[1])
    out = tmp_path / "kept.png"
    rc = dynamicvit_visualize.main(["--model", "dynamicvit_deit_small_patch16_224", "--input-size", "64",
                                    "--model-kwargs", "{'embed_dim': 48, 'num_heads': 6, 'base_rate': 0.5}",
                                    "--out", str(out)])
    assert rc == 0
    assert Image.open(out).size == (64 * 4, 64)
    assert dynamicvit_visualize.main(["--model", "deit_small_patch16_224", "--out", str(out)]) == 2


# ---------------------------------------------------------------------------
# The official recipe's optimizer groups and backbone freeze (hooks)
# ---------------------------------------------------------------------------

def _options(**kwargs):
    from types import SimpleNamespace
    values = dict(ratio_weight=2.0, distillw=0.0, lr_scale=0.01, backbone_freeze_epochs=1, dynamicvit_teacher=None,
                  weight_decay=0.05, base_rate=None, pruning_loc=None, epochs=2, lr=1e-3, input_size=64, seed=0)
    values.update(kwargs)
    return SimpleNamespace(**values)


def _step(model, optimizer, loss_fn, hooks):
    """One training step as engine.train_one_epoch orders it: forward, backward, the hooks' pre-step call, step."""
    torch.manual_seed(0)
    loss_fn(torch.randn(2, 3, 64, 64), model(torch.randn(2, 3, 64, 64)), torch.full((2, 10), 0.1)).backward()
    hooks.before_optimizer_step(model, optimizer)
    optimizer.step()
    optimizer.zero_grad()


def test_official_groups_and_backbone_freeze_survive_a_resume():
    model = make("small", img_size=64).train()
    hooks = dynamicvit.DynamicViTHooks(model, _options())
    loss_fn = hooks.wrap_criterion(_Base(), model)
    groups = hooks.param_groups(model, [1e-3])
    assert [(g["dynamicvit"], g["weight_decay"], g["lr_scale"]) for g in groups] == [
        ("predictor", 0.05, 1.0), ("predictor", 0.0, 1.0), ("backbone", 0.05, 0.0), ("backbone", 0.0, 0.0)]
    in_optimizer = {id(p) for g in groups for p in g["params"]}
    assert id(model.cls_token) not in in_optimizer and not model.cls_token.requires_grad
    assert id(model.pos_embed) not in in_optimizer and not model.pos_embed.requires_grad
    assert id(model.head.weight) in {id(p) for p in groups[2]["params"]}  # the head is "backbone"
    assert id(model.blocks[0].norm1.weight) in {id(p) for p in groups[3]["params"]}  # 1-D: no decay
    optimizer = torch.optim.AdamW(groups, lr=1e-3)
    qkv = model.blocks[0].attn.qkv.weight
    before, pred_before = qkv.detach().clone(), model.score_predictor[0].in_conv[1].weight.detach().clone()
    hooks.on_epoch_start(model, 0)
    _step(model, optimizer, loss_fn, hooks)
    assert torch.equal(qkv, before)  # lr 0: no update, no weight decay ...
    assert optimizer.state[qkv]["exp_avg"].abs().sum() > 0  # ... but Adam's moments accumulate, as official
    assert not torch.equal(model.score_predictor[0].in_conv[1].weight, pred_before)
    assert set(loss_fn.last_parts) == {"cls_loss", "ratio_loss", "keep_0", "keep_1", "keep_2"}
    assert set(hooks.log_state(model)) == {"keep_b3", "keep_b6", "keep_b9", "ratio_loss"}

    # a resumed run: the optimizer's groups are new dicts from the checkpoint, the freeze still applies
    saved = optimizer.state_dict()
    hooks2 = dynamicvit.DynamicViTHooks(model, _options())
    optimizer2 = torch.optim.AdamW(hooks2.param_groups(model, [1e-3]), lr=1e-3)
    optimizer2.load_state_dict(saved)
    hooks2.on_epoch_start(model, 0)
    _step(model, optimizer2, loss_fn, hooks2)
    assert torch.equal(qkv, before)
    hooks2.on_epoch_start(model, 1)
    _step(model, optimizer2, loss_fn, hooks2)
    assert not torch.equal(qkv, before)
    backbone = [g for g in optimizer2.param_groups if g["dynamicvit"] == "backbone"]
    assert all(g["lr"] == pytest.approx(1e-3 * 0.01) and g["lr_scale"] == 0.01 for g in backbone)


def test_checkpoint_filter_keeps_predictor_init_for_a_deit_checkpoint():
    from models.factory import load_weights
    model = make("small", img_size=64)
    deit = plain_deit(model)
    with torch.no_grad():
        for p in deit.parameters():
            p.add_(0.5)
    init = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("score_predictor.")}
    load_weights(model, deit.state_dict(), load="finetune", model_name="dynamicvit_deit_small_patch16_224")
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in init.items())
    assert torch.equal(state["blocks.3.mlp.fc1.weight"], deit.state_dict()["blocks.3.mlp.fc1.weight"])
    assert torch.equal(state["head.weight"], deit.state_dict()["head.weight"])


# ---------------------------------------------------------------------------
# FLOPs and --target-gmacs
# ---------------------------------------------------------------------------

def test_gmacs_follow_the_kept_tokens():
    """fvcore's count equals a closed form over the per-block token counts (predictors included)."""
    from models import flops as flops_module
    model = make("small", img_size=64, base_rate=0.7).eval()
    got = flops_module.count_flops(model, (64, 64), counter="fvcore")["gmacs"]
    c, n0, hidden = 48, 16, 192

    def block(n):
        return n * (3 * c * c + c * c + 2 * c * hidden) + 2 * n * n * c + 2 * 5 * n * c  # linears, attention, 2 LNs

    def predictor(n):
        return n * (c * c + c * c // 2 + c // 2 * c // 4 + c // 4 * 2) + 5 * n * c  # linears + its LayerNorm

    lengths = [n0 + 1] * 3 + [12] * 3 + [8] * 3 + [6] * 3
    want = sum(block(n) for n in lengths) + sum(predictor(n) for n in (16, 11, 7))
    want += 3 * 16 * 16 * 16 * c + 5 * 6 * c + c * 10  # patch embedding, final norm (6 tokens), head
    assert got == pytest.approx(want / 1e9, rel=1e-9)


def test_target_gmacs_solves_for_base_rate(tmp_path):
    import json

    import benchmark
    out = tmp_path / "r.jsonl"
    kwargs = "{'depth': 4, 'embed_dim': 32, 'num_heads': 2, 'patch_size': 8, 'pruning_loc': (1, 2, 3)}"
    common = ["--model", "dynamicvit_deit_tiny_patch16_224", "--model-kwargs", kwargs, "--img-size", "64",
              "--flops-only", "--counter", "fvcore"]
    assert benchmark.main(common + ["--base_rate", "1.0", "--output", str(tmp_path / "full.jsonl")]) == 0
    full = json.loads((tmp_path / "full.jsonl").read_text().splitlines()[0])["gmacs"]
    target = round(0.7 * full, 6)
    assert benchmark.main(common + ["--base_rate", "auto", "--target-gmacs", str(target), "--output", str(out)]) == 0
    record = json.loads(out.read_text().splitlines()[0])
    rate = record["method_flags"]["base_rate"]
    assert record["target_gmacs"]["dest"] == "base_rate" and 0 < rate < 1
    assert abs(record["gmacs"] - target) / target < 0.03  # one more kept token per location is a ~2% step here
