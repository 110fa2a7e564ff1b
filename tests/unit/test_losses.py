"""Criteria: DeiT distillation formulas (recipe check 11.7) and the criterion choice."""
import argparse

import pytest
import torch
import torch.nn.functional as F
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

import models  # noqa: F401  (registers the LTM models)
from losses import BinarizedTargetBCE, DistillationLoss, build_criterion


class _Teacher(torch.nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, x):
        return self.logits


def _data(b=4, c=5):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(b, c, generator=g), torch.randn(b, c, generator=g), torch.randn(b, c, generator=g),
            torch.randint(0, c, (b,), generator=g))


@pytest.mark.parametrize("tau", [1.0, 2.5])
def test_soft_distillation_is_per_element_mean_kl_times_t2(tau):
    cls, dist, teacher, y = _data()
    alpha = 0.3
    loss = DistillationLoss(torch.nn.CrossEntropyLoss(), _Teacher(teacher), "soft", alpha, tau)
    got = loss(torch.zeros(4, 3), (cls, dist), y)
    p_teacher = F.softmax(teacher / tau, dim=1)
    kl_elements = p_teacher * (F.log_softmax(teacher / tau, dim=1) - F.log_softmax(dist / tau, dim=1))
    kd = kl_elements.sum() / dist.numel() * tau * tau
    expected = (1 - alpha) * F.cross_entropy(cls, y) + alpha * kd
    assert torch.allclose(got, expected, atol=1e-6)


def test_hard_distillation_is_ce_with_teacher_argmax():
    cls, dist, teacher, y = _data()
    loss = DistillationLoss(torch.nn.CrossEntropyLoss(), _Teacher(teacher), "hard", 0.5, 1.0)
    got = loss(None, (cls, dist), y)
    expected = 0.5 * F.cross_entropy(cls, y) + 0.5 * F.cross_entropy(dist, teacher.argmax(1))
    assert torch.allclose(got, expected, atol=1e-6)


def test_none_ignores_teacher_and_accepts_tuple_and_dict():
    cls, dist, _, y = _data()

    class Exploding(torch.nn.Module):
        def forward(self, x):
            raise AssertionError("teacher must not run")

    loss = DistillationLoss(torch.nn.CrossEntropyLoss(), Exploding(), "none")
    base = F.cross_entropy(cls, y)
    assert torch.allclose(loss(None, cls, y), base)
    assert torch.allclose(loss(None, (cls, dist), y), base)
    assert torch.allclose(loss(None, {"logits": cls, "features": dist}, y), base)


def test_distillation_needs_tuple_outputs():
    cls, _, teacher, y = _data()
    loss = DistillationLoss(torch.nn.CrossEntropyLoss(), _Teacher(teacher), "soft")
    with pytest.raises(ValueError, match="distill"):
        loss(None, cls, y)


def _args(**kw):
    base = dict(smoothing=0.1, bce_loss=False, distillation_type="none", distillation_alpha=0.5,
                distillation_tau=1.0, ib_weight=0.0)
    base.update(kw)
    return argparse.Namespace(**base)


def test_build_criterion_choice():
    model = torch.nn.Linear(2, 2)
    assert isinstance(build_criterion(_args(), model, True, None).base_criterion, SoftTargetCrossEntropy)
    assert isinstance(build_criterion(_args(), model, False, None).base_criterion, LabelSmoothingCrossEntropy)
    assert isinstance(build_criterion(_args(smoothing=0.0), model, None, None).base_criterion, torch.nn.CrossEntropyLoss)
    assert isinstance(build_criterion(_args(bce_loss=True), model, True, None).base_criterion, BinarizedTargetBCE)


def test_build_criterion_adds_no_method_loss():
    """LTM's IB loss is added by the LTM hooks alone (it used to be wrapped twice)."""
    import timm
    model = timm.create_model("ltm_vit_small_patch16_224", depth=1, embed_dim=32, num_heads=2, patch_size=8,
                              img_size=32, num_classes=4)
    crit = build_criterion(_args(ib_weight=0.1), model, False, None)
    assert type(crit) is DistillationLoss


def test_bce_binarises_soft_and_hard_targets():
    logits = torch.randn(3, 4)
    hard = torch.tensor([0, 3, 1])
    soft = F.one_hot(hard, 4).float() * 0.7 + 0.075  # mixed/smoothed targets are all > 0
    bce = BinarizedTargetBCE()
    assert torch.allclose(bce(logits, hard), F.binary_cross_entropy_with_logits(logits, F.one_hot(hard, 4).float()))
    assert torch.allclose(bce(logits, soft), F.binary_cross_entropy_with_logits(logits, torch.ones(3, 4)))


def test_build_teacher_loads_weights_frozen_and_in_eval_mode(tmp_path):
    import timm

    from losses import build_teacher
    source = timm.create_model("resnet18", num_classes=10)
    path = tmp_path / "teacher.pth"
    torch.save({"model": source.state_dict()}, path)
    args = _args(teacher_model="resnet18", teacher_path=str(path))
    teacher = build_teacher(args, 10, torch.device("cpu"))
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert torch.equal(teacher.fc.weight, source.fc.weight)


def test_distilled_student_trains_with_hard_distillation():
    import timm

    from engine import train_one_epoch
    student = timm.create_model("deit_tiny_distilled_patch16_224", num_classes=4, depth=1, embed_dim=32,
                                num_heads=2, patch_size=8, img_size=32)
    student.set_distilled_training(True)
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 4))
    criterion = DistillationLoss(torch.nn.CrossEntropyLoss(), teacher, "hard", 0.5, 1.0)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    before = student.head_dist.weight.detach().clone()
    args = argparse.Namespace(accum_iter=1, amp=False, print_freq=0, batch_size=4)
    stats = train_one_epoch(student, criterion, [(x, y)], torch.optim.SGD(student.parameters(), lr=0.1),
                            torch.device("cpu"), 0, None, args=args)
    assert not torch.equal(student.head_dist.weight, before)  # the distillation head got a gradient
    assert stats["loss"] > 0


def test_ltm_training_run_wraps_the_ib_loss_once():
    """The criterion of an LTM training run holds one IB loss around the distillation wrapper."""
    import main
    from models.ltm_ib_loss import InformationBottleneckLoss

    args = main.parse_args([
        "--model", "ltm_vit_small_patch16_224", "--model-kwargs",
        "{'depth': 1, 'embed_dim': 32, 'num_heads': 2, 'patch_size': 8}", "--input-size", "32",
        "--data-set", "SYNTHETIC", "--synthetic-train-size", "8", "--synthetic-val-size", "4", "--batch-size", "4",
        "--num_workers", "0", "--device", "cpu", "--ib-weight", "0.1"])
    run = main.build_run(args, torch.device("cpu"), 1, 0)
    layers, criterion = [], run.criterion
    while criterion is not None:
        layers.append(type(criterion))
        criterion = getattr(criterion, "base_criterion", None)
    assert layers.count(InformationBottleneckLoss) == 1 and layers[0] is InformationBottleneckLoss
