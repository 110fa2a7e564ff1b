"""DiffRate's method families (models/diffrate.py): the search hooks, the patch family, the
--target-gmacs choice among the shipped schedules, checkpoint filtering and the visualisation."""
import logging
from types import SimpleNamespace

import pytest
import timm
import torch

import models  # noqa: F401  (registers the models)
from models import diffrate, family
from models.errors import ModelConfigError
from models.factory import create_model

TINY = dict(img_size=64, depth=3, embed_dim=24, num_heads=2, num_classes=10)


def search_options(**overrides):
    values = dict(target_flops=0.001, arch_lr=None, arch_min_lr=None, warmup_compression_rate=False,
                  granularity=None, load_compression_rate=False, multi_reso=False)
    values.update(overrides)
    return SimpleNamespace(**values)


def test_search_hooks_freeze_the_backbone_and_own_the_optimizer_group():
    model = timm.create_model("vit_deit_small_patch16_224", **TINY)
    hooks = diffrate.DiffRateSearchHooks(model, search_options(arch_lr=0.02))
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable == [f"blocks.{i}.{kind}_ddp.selected_probability" for i in range(3) for kind in ("prune", "merge")]
    groups = hooks.param_groups(model, [0.5])
    assert len(groups) == 1 and groups[0]["lr"] == 0.02 and groups[0]["weight_decay"] == 0.0
    assert groups[0]["params"] == model.arch_parameters()
    assert diffrate.DiffRateSearchHooks(model, search_options()).param_groups(model, [0.5])[0]["lr"] == 0.5


def test_search_hooks_schedule_warmup_and_logs(caplog):
    model = timm.create_model("vit_deit_small_patch16_224", prune_kept_num=[17, 12, 9], merge_kept_num=[17, 10, 6],
                              **TINY)
    hooks = diffrate.DiffRateSearchHooks(model, search_options(warmup_compression_rate=True))
    assert model.has_explicit_schedule()
    hooks.on_epoch_start(model, 0)
    assert not model.has_explicit_schedule()  # evaluations during the search use the searched schedule
    assert model._diffrate_cfg.flops_weight == 0.0
    hooks.on_epoch_start(model, 1)
    assert model._diffrate_cfg.flops_weight == diffrate.FLOPS_LOSS_WEIGHT
    model.train()
    out = model(torch.randn(2, 3, 64, 64))
    assert out["aux_loss"] > 0
    state = hooks.log_state(model)
    assert state["diffrate_gflops"] == pytest.approx(float(out["gflops"]))
    assert state["diffrate_tokens"] == pytest.approx((17 + 11 + 11) / 3)  # g = 4: candidates 16 12 8 4 -> 11
    caplog.clear()  # on_epoch_start's record too is captured when an earlier test left the root logger at INFO
    with caplog.at_level(logging.INFO, logger="models.diffrate"):
        hooks.on_step_start(model, 1, 0, 10)
        hooks.on_step_start(model, 1, 7, 10)
    assert [r.getMessage() for r in caplog.records] == ["prune kept number:[17, 11, 11]", "merge kept number:[17, 11, 11]"]
    report = hooks.report(model, None)
    assert report["prune_kept_num"] == [17, 11, 11] and report["tokens_per_block"] == [17, 11, 11]
    assert report["official_gflops"] == round(model.calculate_flop_inference() / 1e9, 3)


def test_patch_family_patches_and_refuses_training():
    values = {"diffrate_flops": None, "diffrate_prune_kept": [17, 12, 9], "diffrate_merge_kept": [17, 10, 6]}
    model = create_model("deit_small_patch16_224", options=values, num_classes=10, img_size=64,
                         model_kwargs=dict(depth=3, embed_dim=24, num_heads=2))
    assert diffrate.is_patched(model) and model.get_kept_num() == ([17, 12, 9], [17, 10, 6])
    hooks = family.training_hooks(model, "deit_small_patch16_224", values)
    with pytest.raises(ModelConfigError, match="evaluation schedule"):
        hooks.wrap_criterion(torch.nn.CrossEntropyLoss(), model)


def test_patch_family_on_a_vit_deit_model_keeps_its_proxies():
    values = {"diffrate_flops": None, "diffrate_prune_kept": [17, 12, 9], "diffrate_merge_kept": [17, 10, 6],
              "granularity": 2}
    model = create_model("vit_deit_small_patch16_224", options=values, num_classes=10, img_size=64,
                         model_kwargs=dict(depth=3, embed_dim=24, num_heads=2), apply_patches=False)
    with torch.no_grad():
        model.blocks[1].merge_ddp.selected_probability.fill_(0.5)
    family.apply_patches(model, "vit_deit_small_patch16_224", values)
    assert model._diffrate_cfg.granularity == 2
    assert torch.all(model.blocks[1].merge_ddp.selected_probability == 0.5)
    assert model.get_kept_num() == ([17, 12, 9], [17, 10, 6])


def test_target_gmacs_picks_the_nearest_shipped_schedule():
    def build(value):
        with torch.device("meta"):
            return create_model("deit_small_patch16_224", options={"diffrate_flops": value})

    def gmacs(model):
        return model.calculate_flop_inference() / 1e9 if diffrate.is_patched(model) else 4.6

    reduction = family.get_family("diffrate_patch").reduction
    assert reduction.dest == "diffrate_flops"
    assert reduction.search(build, 2.6, gmacs) == (2.5, pytest.approx(2.505, abs=1e-3))
    assert reduction.search(build, 2.8, gmacs) == (2.7, pytest.approx(2.709, abs=1e-3))
    assert reduction.search(build, 9.0, gmacs)[0] == 3.1  # nearest, also outside the table's range

    def build_tiny(value):
        return create_model("deit_small_patch16_224", options={"diffrate_flops": value}, img_size=64,
                            model_kwargs=dict(depth=2))
    with pytest.raises(ModelConfigError, match="224-px DeiT-T/S/B"):
        reduction.search(build_tiny, 2.6, gmacs)


def test_plain_deit_weights_load_into_vit_deit_with_fresh_proxies():
    deit = timm.create_model("deit_small_patch16_224", **TINY)
    model = create_model("vit_deit_small_patch16_224", num_classes=10, img_size=64,
                         model_kwargs=dict(depth=3, embed_dim=24, num_heads=2),
                         checkpoint={"model": deit.state_dict()}, load="finetune")
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in deit.state_dict().items())
    assert torch.all(state["blocks.1.prune_ddp.selected_probability"] == 0)
    assert model.get_kept_num() == ([17, 11, 11], [17, 11, 11])


def test_cast_for_inference_keeps_the_proxies_in_float32():
    from utils.precision import cast_for_inference
    model = timm.create_model("vit_deit_small_patch16_224", **TINY).eval()
    expected = model.get_kept_num()
    cast_for_inference(model, torch.bfloat16)
    assert model.blocks[1].prune_ddp.selected_probability.dtype == torch.float32
    assert model.blocks[1].attn.qkv.weight.dtype == torch.bfloat16
    assert model.get_kept_num() == expected
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(1, 3, 64, 64)).float()).all()


def test_visualize_writes_an_image(tmp_path):
    from tools import diffrate_visualize
    out = tmp_path / "tokens.png"
    rc = diffrate_visualize.main(["--model", "deit_small_patch16_224", "--model-kwargs",
                                  "{'depth': 3, 'embed_dim': 24, 'num_heads': 2}", "--input-size", "64",
                                  "--diffrate-prune-kept", "[17,12,9]", "--diffrate-merge-kept", "[17,10,6]",
                                  "--blocks", "1", "2", "3", "--out", str(out)])
    assert rc == 0 and out.exists()
    from PIL import Image
    assert Image.open(out).size == (64 * 4, 64)
    model = timm.create_model("vit_deit_small_patch16_224", prune_kept_num=[17, 12, 9], merge_kept_num=[17, 10, 6],
                              **TINY)
    maps = diffrate_visualize.source_maps(model, torch.randn(2, 3, 64, 64), [1, 2, 3])
    assert [maps[b].shape[1] for b in (1, 2, 3)] == [17, 10, 6]
    assert not model._diffrate_cfg.trace_source  # restored
    assert int(maps[2][0].sum()) == 12  # 11 patches and the class token survive block 2's pruning
    assert diffrate_visualize.main(["--model", "deit_small_patch16_224", "--out", str(out)]) == 2  # not patched
