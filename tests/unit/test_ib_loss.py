"""LTM's information-bottleneck loss (docs/methods/ltm.md, "Information-bottleneck loss")."""
import logging
import math
from argparse import Namespace

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy
from torch import nn

from models import ltm_ib_loss as ib_loss
import models  # noqa: F401
from models.ltm_ib_loss import (
    InformationBottleneckLoss, build_ib_criterion, cluster_scores, ib_per_sample, kmeans, mutual_information,
    variational_table)
from losses import DistillationLoss

NUM_CLASSES = 3


class FeatureModel(nn.Module):
    """Stand-in model whose pooled features are its (flattened) inputs."""
    num_classes = 2

    def forward_features(self, x):
        return x

    def forward_head(self, x, pre_logits=False):
        return x.flatten(1)


def ce_chain():
    return DistillationLoss(nn.CrossEntropyLoss(), None, "none")


def tiny_ltm():
    return timm.create_model("ltm_vit_small_patch16_224", num_classes=NUM_CLASSES, embed_dim=32, depth=2,
                             num_heads=2, img_size=32, patch_size=8, global_pool="avg")


def tiny_loader(n_batches=3, batch=4, size=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, size, size, generator=generator),
             torch.randint(NUM_CLASSES, (batch,), generator=generator)) for _ in range(n_batches)]


def args_for(**overrides):
    values = dict(ib_weight=0.1, ib_warmup_ratio=0.3, ib_input_clusters="none", epochs=10, seed=0)
    values.update(overrides)
    return Namespace(**values)


def test_two_cluster_two_class_example_matches_the_formula():
    # features e1 (class 0) and e2 (class 1); k-means finds centroids e1, e2 (in some order)
    criterion = InformationBottleneckLoss(ce_chain(), num_classes=2, num_clusters=2, kmeans_iters=5, kmeans_redo=1)
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 1])
    criterion.on_epoch_start(FeatureModel(), [(features, labels)], epoch=0, device=torch.device("cpu"))
    # by hand: phi(e1) = (p, 1-p), phi(e2) = (1-p, p), p = e^2 / (e^2 + 1), so Q = phi rows as
    # columns and IB_i = -(p log p + (1-p) log(1-p)) for both samples
    p = math.exp(2) / (math.exp(2) + 1)
    expected = -(p * math.log(p) + (1 - p) * math.log(1 - p))
    value = criterion.ib_value(features, features, labels)
    assert value.item() == pytest.approx(expected, rel=1e-5)


def test_ib_per_sample_formula():
    phi_f = torch.tensor([[0.7, 0.3], [0.2, 0.8]])
    log_q = torch.tensor([[0.9, 0.4], [0.1, 0.6]]).log()
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    phi_x = torch.tensor([[0.5, 0.5], [1.0, 0.0]])
    out = ib_per_sample(phi_f, log_q, targets, phi_x)
    first = 0.5 * math.log(0.5) * 2 - (0.7 * math.log(0.9) + 0.3 * math.log(0.1))
    second = 1.0 * math.log(1.0) - (0.2 * math.log(0.4) + 0.8 * math.log(0.6))
    torch.testing.assert_close(out, torch.tensor([first, second]))


def test_q_columns_sum_to_one():
    criterion = InformationBottleneckLoss(ce_chain(), num_classes=NUM_CLASSES, num_clusters=4,
                                          kmeans_iters=5, kmeans_redo=1)
    model = tiny_ltm()
    criterion.on_epoch_start(model, tiny_loader(), epoch=0, device=torch.device("cpu"))
    q = criterion.log_q.exp()
    assert q.shape == (4, NUM_CLASSES)
    torch.testing.assert_close(q.sum(0), torch.ones(NUM_CLASSES), atol=1e-5, rtol=0)


def test_variational_table_leaves_unseen_classes_at_zero():
    numerator = torch.tensor([[1.0, 0.0], [3.0, 0.0]])
    q = variational_table(numerator, numerator.sum(0))
    torch.testing.assert_close(q, torch.tensor([[0.25, 0.0], [0.75, 0.0]]))


def test_input_term_has_no_gradient_wrt_model_parameters():
    model = tiny_ltm().train()
    model.set_return_features(True)
    criterion = InformationBottleneckLoss(ce_chain(), num_classes=NUM_CLASSES, num_clusters=3,
                                          input_clusters="kmeans", kmeans_iters=3, kmeans_redo=1,
                                          input_kmeans_iters=3, input_kmeans_redo=1)
    loader = tiny_loader()
    criterion.on_epoch_start(model, loader, epoch=0, device=torch.device("cpu"))
    assert criterion.input_centroids is not None
    samples, targets = loader[0]

    def grads(use_input):
        model.zero_grad()
        saved = criterion.input_centroids
        criterion.input_centroids = saved if use_input else None
        features = model(samples)["features"]
        criterion.ib_value(samples, features, targets).backward()
        criterion.input_centroids = saved
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    with_input, without_input = grads(True), grads(False)
    assert len(with_input) == len(without_input) > 0
    for a, b in zip(with_input, without_input):
        torch.testing.assert_close(a, b)


def test_weight_applies_from_floor_of_ratio_times_epochs():
    model = tiny_ltm()
    criterion = build_ib_criterion(ce_chain(), model, args_for(epochs=10, ib_warmup_ratio=0.3))
    assert criterion.warmup_epoch == 3
    assert [criterion.weight_for_epoch(e) for e in (0, 2, 3, 9)] == [0.0, 0.0, 0.1, 0.1]
    criterion.num_clusters = 2
    criterion.kmeans_iters, criterion.kmeans_redo = 3, 1
    loader = tiny_loader()
    samples, targets = loader[0]
    for epoch, expected_weight in ((2, 0.0), (3, 0.1)):
        criterion.on_epoch_start(model, loader, epoch, torch.device("cpu"))
        model.train()
        with torch.no_grad():
            outputs = model(samples)
            base = ce_chain()(samples, outputs["logits"], targets)
            ib = criterion.ib_value(samples, outputs["features"], targets)
            total = criterion(samples, outputs, targets)
        assert criterion.current_weight == expected_weight
        torch.testing.assert_close(total, base + expected_weight * ib)
        assert ib > 0


def test_soft_target_form_equals_hard_form_for_one_hot_targets():
    model = tiny_ltm()
    criterion = build_ib_criterion(ce_chain(), model, args_for())
    criterion.num_clusters, criterion.kmeans_iters, criterion.kmeans_redo = 3, 3, 1
    loader = tiny_loader()
    criterion.on_epoch_start(model, loader, 5, torch.device("cpu"))
    samples, targets = loader[0]
    model.train()
    with torch.no_grad():
        features = model(samples)["features"]
    hard = criterion.ib_value(samples, features, targets)
    soft = criterion.ib_value(samples, features, F.one_hot(targets, NUM_CLASSES).float())
    torch.testing.assert_close(hard, soft)


def test_training_step_with_mixup_targets_and_soft_base_criterion():
    model = tiny_ltm()
    chain = DistillationLoss(SoftTargetCrossEntropy(), None, "none")
    criterion = build_ib_criterion(chain, model, args_for(epochs=1, ib_warmup_ratio=0.0))
    criterion.num_clusters, criterion.kmeans_iters, criterion.kmeans_redo = 3, 3, 1
    loader = tiny_loader()
    model.train()
    criterion.on_epoch_start(model, loader, 0, torch.device("cpu"))
    assert model.training  # restored after the eval-mode clustering pass
    samples, targets = loader[0]
    soft = 0.7 * F.one_hot(targets, NUM_CLASSES).float() + 0.3 / NUM_CLASSES
    loss = criterion(samples, model(samples), soft)
    loss.backward()
    assert torch.isfinite(loss)
    assert math.isfinite(criterion.extra_metrics()["ib_loss"])
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad and "mask_module" not in n)


def test_cluster_count_is_capped_by_the_number_of_samples(caplog):
    model = tiny_ltm()
    criterion = build_ib_criterion(ce_chain(), model, args_for())
    criterion.num_clusters = 1000
    criterion.kmeans_iters, criterion.kmeans_redo = 2, 1
    with caplog.at_level(logging.INFO, logger="models.ltm_ib_loss"):
        criterion.on_epoch_start(model, tiny_loader(n_batches=2), 0, torch.device("cpu"))
    assert criterion.feature_centroids.shape[0] == 8
    assert "using K=8" in caplog.text


def test_build_requires_a_model_with_ib_support():
    with pytest.raises(ValueError, match="IB loss"):
        build_ib_criterion(ce_chain(), timm.create_model("vit_tiny_patch16_224", img_size=32, depth=1), args_for())


def test_build_turns_on_training_features():
    model = tiny_ltm()
    build_ib_criterion(ce_chain(), model, args_for())
    assert model.return_features


def test_kmeans_recovers_separated_clusters():
    generator = torch.Generator().manual_seed(0)
    centers = torch.tensor([[5.0, 0.0], [-5.0, 0.0], [0.0, 5.0]])
    points = torch.cat([c + 0.1 * torch.randn(50, 2, generator=generator) for c in centers])
    found = kmeans(points, 3, iters=10, redo=2)
    distances = torch.cdist(centers, found)
    assert (distances.min(dim=1).values < 0.1).all()


def test_cluster_scores_are_softmax_of_negative_squared_distance():
    vectors = torch.randn(5, 4)
    centroids = F.normalize(torch.randn(3, 4), dim=-1)
    expected = (-torch.cdist(F.normalize(vectors, dim=-1), centroids).pow(2)).softmax(-1)
    torch.testing.assert_close(cluster_scores(vectors, centroids), expected)


def test_mutual_information():
    assert mutual_information(torch.ones(3, 4)) == pytest.approx(0.0, abs=1e-9)
    assert mutual_information(torch.eye(2)) == pytest.approx(math.log(2), rel=1e-6)


def test_gather_rows_without_distributed_is_identity():
    rows = torch.randn(4, 2)
    assert torch.equal(ib_loss._gather_rows(rows), rows)


def _distributed_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        generator = torch.Generator().manual_seed(rank)
        features = torch.randn(12, 4, generator=generator)
        labels = torch.randint(2, (12,), generator=generator)
        criterion = InformationBottleneckLoss(ce_chain(), num_classes=2, num_clusters=3, kmeans_iters=4,
                                              kmeans_redo=1, seed=rank * 0)
        criterion.on_epoch_start(FeatureModel(), [(features[:6], labels[:6]), (features[6:], labels[6:])],
                                 epoch=0, device=torch.device("cpu"))
        torch.save({"centroids": criterion.feature_centroids, "log_q": criterion.log_q,
                    "labels": labels}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_distributed_clustering_agrees_across_ranks(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_distributed_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert torch.equal(results[0]["centroids"], results[1]["centroids"])
    assert torch.equal(results[0]["log_q"], results[1]["log_q"])
    torch.testing.assert_close(results[0]["log_q"].exp().sum(0), torch.ones(2), atol=1e-5, rtol=0)
