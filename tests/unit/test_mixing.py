"""Tests for mixing.py: DeiT's mixup switch and RaftMLP's sequential mixup -> CutMix."""
import argparse
import math

import numpy as np
import pytest
import torch
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from mixing import SequentialMixParams, SequentialMixup, build_mixup, mixup_active
from utils.errors import UserError


def make_args(**overrides) -> argparse.Namespace:
    args = dict(mixup=0.8, cutmix=1.0, cutmix_minmax=None, mixup_prob=1.0,
                mixup_switch_prob=0.5, mixup_mode="batch", mix_mode="timm", smoothing=0.1)
    args.update(overrides)
    return argparse.Namespace(**args)


@pytest.mark.parametrize("overrides, active", [
    (dict(), True),
    (dict(mixup=0.0, cutmix=0.0), False),
    (dict(mixup=0.0, cutmix=1.0), True),
    (dict(mixup=0.8, cutmix=0.0), True),
    (dict(mixup=0.0, cutmix=0.0, cutmix_minmax=(0.2, 0.8)), True),
])
def test_mixup_active_follows_deit(overrides, active):
    args = make_args(**overrides)
    assert mixup_active(args) is active
    assert (build_mixup(args, 10) is not None) is active


def test_build_mixup_timm_mode_passes_the_flags():
    mixup = build_mixup(make_args(mixup=0.5, cutmix=0.7, mixup_switch_prob=0.3, smoothing=0.2), 7)
    assert isinstance(mixup, Mixup)
    assert (mixup.mixup_alpha, mixup.cutmix_alpha, mixup.switch_prob) == (0.5, 0.7, 0.3)
    assert (mixup.label_smoothing, mixup.num_classes, mixup.mode) == (0.2, 7, "batch")


def test_build_mixup_sequential_uses_mixup_alpha_for_cutmix_too():
    mixup = build_mixup(make_args(mix_mode="sequential", mixup=0.8, cutmix=1.0), 5)
    assert isinstance(mixup, SequentialMixup)
    assert mixup.alpha == 0.8 and mixup.num_classes == 5 and mixup.label_smoothing == 0.1


def test_build_mixup_rejects_bad_settings():
    with pytest.raises(UserError, match="--mix-mode"):
        build_mixup(make_args(mix_mode="fancy"), 10)
    with pytest.raises(UserError, match="--mixup > 0"):
        build_mixup(make_args(mix_mode="sequential", mixup=0.0, cutmix=1.0), 10)


def _fixed_params(batch_size=6, height=8, width=8):
    lam_c = 0.7
    side = math.floor(height * math.sqrt(1 - lam_c))
    return SequentialMixParams(
        lam_mixup=0.65, mixup_perm=torch.tensor([3, 0, 5, 1, 2, 4])[:batch_size],
        lam_cutmix=lam_c, cutmix_perm=torch.tensor([1, 4, 0, 5, 3, 2])[:batch_size],
        box=(2, 1, side, math.floor(width * math.sqrt(1 - lam_c))))


def test_sequential_targets_reproduce_the_official_four_term_loss():
    num_classes, smoothing = 5, 0.1
    mixer = SequentialMixup(alpha=0.8, label_smoothing=smoothing, num_classes=num_classes)
    params = _fixed_params()
    x = torch.randn(6, 3, 8, 8)
    y = torch.tensor([0, 1, 2, 3, 4, 2])
    _, soft_targets = mixer.mix(x, y, params)
    logits = torch.randn(6, num_classes)

    ls_ce = LabelSmoothingCrossEntropy(smoothing)
    lam_m, lam_c = params.lam_mixup, params.lam_cutmix
    p1, p2 = params.mixup_perm, params.cutmix_perm
    official = (lam_c * (lam_m * ls_ce(logits, y) + (1 - lam_m) * ls_ce(logits, y[p1]))
                + (1 - lam_c) * (lam_m * ls_ce(logits, y[p2])
                                 + (1 - lam_m) * ls_ce(logits, y[p1][p2])))
    ours = SoftTargetCrossEntropy()(logits, soft_targets)
    torch.testing.assert_close(ours, official, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(soft_targets.sum(1), torch.ones(6))


def test_sequential_images_are_mixup_then_uncorrected_cutmix():
    mixer = SequentialMixup(alpha=0.8, num_classes=5)
    params = _fixed_params()
    x = torch.randn(6, 3, 8, 8)
    x_before = x.clone()
    mixed, _ = mixer.mix(x, torch.zeros(6, dtype=torch.long), params)
    assert torch.equal(x, x_before)

    lam_m, p1, p2 = params.lam_mixup, params.mixup_perm, params.cutmix_perm
    mixup_only = lam_m * x + (1 - lam_m) * x[p1]
    top, left, h, w = params.box
    assert (h, w) == (math.floor(8 * math.sqrt(0.3)),) * 2 == (4, 4)
    inside = torch.zeros(8, 8, dtype=torch.bool)
    inside[top:top + h, left:left + w] = True
    torch.testing.assert_close(mixed[..., inside], mixup_only[p2][..., inside])
    torch.testing.assert_close(mixed[..., ~inside], mixup_only[..., ~inside])


def test_sequential_random_draws_are_valid_and_seeded():
    mixer = SequentialMixup(alpha=0.8, num_classes=4)
    x, y = torch.rand(4, 3, 16, 12), torch.tensor([0, 1, 2, 3])
    for seed in range(20):
        np.random.seed(seed)
        params = mixer.sample_params(4, 16, 12, x.device)
        top, left, h, w = params.box
        assert 0 < params.lam_mixup < 1 and 0 < params.lam_cutmix < 1
        assert h == math.floor(16 * math.sqrt(1 - params.lam_cutmix))
        assert w == math.floor(12 * math.sqrt(1 - params.lam_cutmix))
        assert 0 <= top <= 16 - h and 0 <= left <= 12 - w
        assert sorted(params.mixup_perm.tolist()) == [0, 1, 2, 3]
    np.random.seed(1)
    torch.manual_seed(1)
    first = mixer(x, y)
    np.random.seed(1)
    torch.manual_seed(1)
    second = mixer(x, y)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert first[0].shape == x.shape and first[1].shape == (4, 4)


def test_sequential_disabled_gives_smoothed_labels():
    mixer = SequentialMixup(alpha=0.8, label_smoothing=0.1, num_classes=4)
    mixer.mixup_enabled = False
    x = torch.rand(2, 3, 4, 4)
    out, targets = mixer(x, torch.tensor([1, 3]))
    assert torch.equal(out, x)
    torch.testing.assert_close(targets, torch.tensor([[0.025, 0.925, 0.025, 0.025],
                                                      [0.025, 0.025, 0.025, 0.925]]))
