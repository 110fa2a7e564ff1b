"""DWNet / dynamic DWNet / inhomogeneous dynamic DWNet (models/dwnet.py): the invariants of
docs/methods/dwnet.md, the official state-dict layouts and the recipes."""
import copy
import glob
import json
import os
import re
import sys

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

import models  # noqa: F401  (registers the models)
from models.dwnet import (DWNet, DynamicDWConv, SpatialBlock, checkpoint_filter_fn, dynamic_depthwise_conv,
                          position_dynamic_depthwise_conv)
from models.errors import ModelConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SUFFIX = "_patch4_window7_224"
# name: (parameters, state-dict entries) from docs/methods/dwnet.md
PUBLISHED = {
    "dwnet_tiny": (24_172_744, 353),
    "dwnet_base": (74_347_112, 689),
    "ddwnet_tiny": (51_131_752, 437),
    "ddwnet_base": (161_597_928, 857),
    "iddwnet_tiny": (26_244_280, 437),
    "iddwnet_base": (80_253_608, 857),
}
OFFICIAL_FLOPS = {"dwnet_tiny": 3.7421e9, "dwnet_base": 12.8447e9, "ddwnet_tiny": 3.7705e9, "ddwnet_base": 12.9350e9,
                  "iddwnet_tiny": 4.389e9, "iddwnet_base": 14.372e9}
FVCORE_GMACS = {"dwnet_tiny": 3.743, "ddwnet_tiny": 3.771}


def small_dwnet(conv: str = "static", **kwargs) -> DWNet:
    """Four stages of one block, dims 16..128: the smallest model with every module kind."""
    flags = {"static": {}, "dynamic": {"dynamic": True},
             "inhomogeneous": {"dynamic": True, "inhomogeneous": True, "inhomo_heads": (4, 8, 16, 32)}}[conv]
    args = dict(embed_dim=16, depths=(1, 1, 1, 1), num_classes=10, drop_path_rate=0.0)
    args.update(flags)
    args.update(kwargs)
    return DWNet(**args)


def randomize_bn_stats(model: nn.Module) -> nn.Module:
    """Non-trivial running statistics so that eval-mode checks exercise the BNs."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


def load_layout(shared_dir, name):
    with open(os.path.join(shared_dir, "parity", "keys", name + ".json")) as f:
        return json.load(f)


def filled_model(shared_dir, name):
    """The model built on the meta device, then given the parity fill with a strict load."""
    sys.path.insert(0, os.path.join(shared_dir, "parity"))
    from fill import fill_state_dict
    with torch.device("meta"):
        model = timm.create_model(name)
    model.load_state_dict(fill_state_dict(load_layout(shared_dir, name)), strict=True, assign=True)
    return model.eval()


# ----------------------------------------------------------------------------- counts and layouts

@pytest.mark.parametrize("variant", sorted(PUBLISHED))
def test_parameter_count_and_state_dict_size(variant):
    with torch.device("meta"):
        model = timm.create_model(variant + SUFFIX)
    params, entries = PUBLISHED[variant]
    assert sum(p.numel() for p in model.parameters()) == params
    assert len(model.state_dict()) == entries


@pytest.mark.parametrize("variant", sorted(PUBLISHED))
def test_state_dict_matches_official_layout(shared_dir, variant):
    layout = load_layout(shared_dir, variant + SUFFIX)
    with torch.device("meta"):
        model = timm.create_model(variant + SUFFIX)
    have = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert set(have) == set(layout)
    assert all(have[k] == layout[k][0] for k in layout)


@pytest.mark.parametrize("variant", sorted(OFFICIAL_FLOPS))
def test_flops_method_matches_official_numbers(variant):
    with torch.device("meta"):
        model = timm.create_model(variant + SUFFIX)
    assert model.flops() == pytest.approx(OFFICIAL_FLOPS[variant], rel=1e-4 if "iddwnet" not in variant else 2e-4)


@pytest.mark.parametrize("size", ["tiny", "base"])
def test_dynamic_alias_builds_the_same_model(size):
    with torch.device("meta"):
        alias = timm.create_model(f"dynamic_dwnet_{size}{SUFFIX}")
        model = timm.create_model(f"ddwnet_{size}{SUFFIX}")
    assert repr(alias) == repr(model)
    assert {k: v.shape for k, v in alias.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    assert isinstance(model.layers[0].blocks[0].attn2conv.conv, DynamicDWConv)


def test_checkpoint_filter_accepts_wrapped_and_ddp_dicts():
    model = small_dwnet()
    sd = model.state_dict()
    wrapped = {"model": {"module." + k: v for k, v in sd.items()}, "epoch": 3}
    assert checkpoint_filter_fn(wrapped, model).keys() == sd.keys()
    assert checkpoint_filter_fn(dict(sd), model).keys() == sd.keys()


# ----------------------------------------------------------------------------- parity and self-consistency

@pytest.mark.slow
def test_parity_case_dwnet_tiny(shared_dir):
    sys.path.insert(0, os.path.join(shared_dir, "parity"))
    import check
    assert check.run_case(os.path.join(shared_dir, "parity", "cases", "dwnet_tiny.pt"), verbose=True)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["ddwnet_tiny", "iddwnet_tiny", "dwnet_base", "ddwnet_base"])
def test_filled_official_layout_runs_deterministically(shared_dir, variant):
    """Same fill -> same logits, and the strict load leaves nothing at init (no hidden state)."""
    model = filled_model(shared_dir, variant + SUFFIX)
    if variant == "ddwnet_base":
        # Generated kernels scale with their input, so with synthetic weights the activations grow
        # quadratically through the 18 blocks of stage 2 and overflow; damp the generators' last layer.
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "attn2conv.conv.conv2" in name:
                    param.mul_(0.05)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        first, second = model(x), model(x)
    assert first.shape == (2, 1000)
    assert torch.isfinite(first).all()
    assert torch.equal(first, second)


def test_official_dynamic_kernels_match_the_grouped_conv():
    """dynamic_depthwise_conv against the per-sample definition (correlation, padding k // 2)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 9, 11, generator=g)
    kernels, bias = torch.randn(3, 5, 7, 7, generator=g), torch.randn(5, generator=g)
    out = dynamic_depthwise_conv(x, kernels, bias)
    for b in range(3):
        ref = F.conv2d(x[b:b + 1], kernels[b].unsqueeze(1), bias, padding=3, groups=5)
        torch.testing.assert_close(out[b:b + 1], ref, atol=1e-5, rtol=1e-5)


def test_position_dynamic_conv_matches_the_official_kernel_definition():
    """out[b,c,y,x] = sum_{u,v} W[b, c // g, u, v, y, x] * in[b, c, y+u-3, x+v-3] (zero padding)."""
    g = torch.Generator().manual_seed(0)
    batch, chans, groups, k, height, width = 2, 6, 3, 3, 5, 4
    x = torch.randn(batch, chans, height, width, generator=g)
    kernels = torch.randn(batch, groups, k, k, height, width, generator=g)
    padded = F.pad(x, (k // 2,) * 4)
    ref = torch.zeros_like(x)
    per_group = chans // groups
    for c in range(chans):
        for u in range(k):
            for v in range(k):
                ref[:, c] += kernels[:, c // per_group, u, v] * padded[:, c, u:u + height, v:v + width]
    torch.testing.assert_close(position_dynamic_depthwise_conv(x, kernels, k), ref, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- docs/methods/dwnet.md

@pytest.mark.slow
def test_full_tiny_outputs_at_224_and_256():
    model = timm.create_model("dwnet_tiny" + SUFFIX).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 1000)
        assert model(torch.randn(1, 3, 256, 256)).shape == (1, 1000)


@pytest.mark.parametrize("conv", ["static", "dynamic", "inhomogeneous"])
def test_other_resolutions_and_size_error(conv):
    model = small_dwnet(conv).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 96)).shape == (2, 10)
        assert model.forward_features(torch.randn(2, 3, 64, 64)).shape == (2, 2, 2, 128)
    with pytest.raises(ModelConfigError, match="multiple of 32"):
        model(torch.randn(2, 3, 50, 64))


def test_dynamic_model_batch_one_in_training_is_a_clear_error():
    model = small_dwnet("dynamic").train()
    with pytest.raises(ModelConfigError, match="at least 2 images"):
        model(torch.randn(1, 3, 64, 64))
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)


@pytest.mark.parametrize("conv", ["static", "dynamic", "inhomogeneous"])
def test_forward_backward_every_parameter_gets_a_gradient(conv):
    model = small_dwnet(conv, drop_path_rate=0.1).train()
    model(torch.randn(2, 3, 64, 64)).logsumexp(dim=1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing


def test_dynamic_kernels_differ_per_image_and_eval_is_batch_independent():
    model = randomize_bn_stats(small_dwnet("dynamic")).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    conv = model.layers[0].blocks[0].attn2conv.conv
    with torch.no_grad():
        kernels = conv.generate_kernels(torch.randn(2, 16, 16, 16, generator=torch.Generator().manual_seed(6)))
        assert (kernels[0] - kernels[1]).abs().max() > 0
        batched = model(x)
        alone = torch.cat([model(x[:1]), model(x[1:])])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)


def test_static_model_equals_dynamic_conv_with_constant_kernels():
    """A DynamicDWConv whose generator outputs the static kernel (conv2 weight 0, bias = kernel
    flattened channel-major) reproduces the static model: checks the c*49 + u*7 + v layout."""
    static = randomize_bn_stats(small_dwnet("static")).eval()
    dynamic = copy.deepcopy(static)
    for stage in dynamic.layers:
        for block in stage.blocks:
            conv = block.attn2conv.conv
            replacement = DynamicDWConv(conv.in_channels, conv.kernel_size[0])
            with torch.no_grad():
                replacement.conv2.weight.zero_()
                replacement.conv2.bias.copy_(conv.weight.reshape(-1))
                replacement.bias.copy_(conv.bias)
            block.attn2conv.conv = replacement.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(dynamic(x), static(x), atol=1e-5, rtol=1e-5)


class NaiveMerge(nn.Module):
    """Slice-and-concat PatchMerging of the official code, sharing the norm and reduction."""

    def __init__(self, merge):
        super().__init__()
        self.norm, self.reduction = merge.norm, merge.reduction

    def forward(self, x):
        parts = [x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]]
        return self.reduction(self.norm(torch.cat(parts, dim=-1)))


def test_patch_merging_has_the_official_channel_order():
    model = randomize_bn_stats(small_dwnet()).eval()
    naive = copy.deepcopy(model)
    for stage in naive.layers[:-1]:
        stage.downsample = NaiveMerge(stage.downsample)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(naive(x), model(x), atol=0, rtol=0)


def test_eval_is_deterministic_and_training_updates_bn_and_drops_samples():
    model = small_dwnet().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
        model.train()
        before = model.layers[0].blocks[0].bn.running_mean.clone()
        model(x)
    assert not torch.equal(before, model.layers[0].blocks[0].bn.running_mean)

    block = SpatialBlock(16, drop_path=0.5).train()
    kept = block.drop_path(torch.ones(64, 4, 4, 16))
    per_sample = kept.flatten(1)
    assert ((per_sample == 0).all(1) | (per_sample == 2.0).all(1)).all()  # whole samples, scaled by 1/keep
    assert 0 < (per_sample[:, 0] == 0).sum() < 64


def test_grad_checkpointing_gives_the_same_gradients():
    model = small_dwnet("dynamic").train()
    x = torch.randn(2, 3, 64, 64)
    torch.manual_seed(0)
    model(x).sum().backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    torch.manual_seed(0)
    model(x).sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, reference[name], atol=1e-5, rtol=1e-4)


def test_classifier_api():
    model = small_dwnet()
    assert model.get_classifier() is model.head
    assert model.no_weight_decay() == {"absolute_pos_embed"}
    model.reset_classifier(3)
    x = torch.randn(2, 3, 64, 64)
    assert model(x).shape == (2, 3)
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, 128)
    model.reset_classifier(0)
    assert model(x).shape == (2, 128)


def test_bad_constructor_arguments_are_one_line_value_errors():
    with pytest.raises(ModelConfigError, match="inhomo_heads"):
        DWNet(embed_dim=16, depths=(1, 1, 1, 1), dynamic=True, inhomogeneous=True)
    with pytest.raises(ModelConfigError, match="divisible"):
        DWNet(embed_dim=16, depths=(1, 1, 1, 1), dynamic=True, inhomogeneous=True, inhomo_heads=(3, 6, 12, 24))
    with pytest.raises(TypeError):
        DWNet(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8))


def test_training_init_follows_the_official_scheme():
    model = small_dwnet("dynamic")
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert all(not m.bias.any() for m in linears if m.bias is not None)
    assert float(model.head.weight.detach().std()) == pytest.approx(0.02, rel=0.2)
    assert not model.layers[0].blocks[0].attn2conv.conv.bias.any()


@pytest.mark.slow
@pytest.mark.parametrize("variant", sorted(FVCORE_GMACS))
def test_fvcore_counts_the_published_gmacs(variant):
    from fvcore.nn import FlopCountAnalysis
    model = timm.create_model(variant + SUFFIX).eval()
    counter = FlopCountAnalysis(model, torch.randn(1, 3, 224, 224))
    counter.unsupported_ops_warnings(False)
    counter.uncalled_modules_warnings(False)
    assert counter.total() / 1e9 == pytest.approx(FVCORE_GMACS[variant], rel=0.01)


# ----------------------------------------------------------------------------- recipes

ALLOWED_KEYS = {"model", "epochs", "batch_size", "lr", "min_lr", "warmup_lr", "warmup_epochs", "weight_decay",
                "drop_path", "clip_grad", "smoothing", "mixup", "cutmix", "mixup_switch_prob", "aa", "reprob",
                "remode", "color_jitter", "train_interpolation", "eval_interpolation", "eval_crop_ratio",
                "train_crop", "mix_mode", "model_ema", "unscale_lr", "sched_step", "decay_norm_and_bias",
                "accum_iter", "amp", "input_size", "finetune", "data_set", "seed", "repeated_aug"}
DWNET_CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*dwnet_*.yaml")))


def accepted_keys():
    try:
        import main
    except ImportError:
        return ALLOWED_KEYS
    return set(main.option_dests(main.get_args_parser()))


def test_every_dwnet_model_has_a_recipe():
    names = {os.path.basename(p)[:-len(".yaml")] for p in DWNET_CONFIGS}
    assert names == {v + SUFFIX for v in PUBLISHED}


@pytest.mark.parametrize("path", DWNET_CONFIGS, ids=os.path.basename)
def test_dwnet_recipe_parses_and_uses_known_keys(path):
    with open(path) as f:
        text = f.read()
    cfg = yaml.safe_load(text)
    assert text.startswith("# ") and "Hardware assumption" in text
    assert set(cfg) <= accepted_keys()
    assert cfg["model"] in timm.list_models(cfg["model"])
    assert cfg["model"] == os.path.basename(path)[:-len(".yaml")]
    gpus, per_gpu = map(int, re.search(r"Hardware assumption: (\d+) GPUs x (\d+) images", text).groups())
    assert per_gpu == cfg["batch_size"]
    total = gpus * per_gpu * cfg["accum_iter"]
    assert total == 1024
    assert cfg["lr"] * total / 512 == pytest.approx(1e-3)  # main.py's linear scaling of Swin's base lr
    assert not cfg.get("unscale_lr", False)
    assert (cfg["sched_step"], cfg["warmup_epochs"], cfg["epochs"], cfg["clip_grad"]) == ("iter", 20, 300, 5.0)
    assert cfg["drop_path"] == (0.5 if "base" in path else 0.2)
    assert cfg["model_ema"] is False and cfg["mix_mode"] == "timm"
    assert all(isinstance(cfg[k], float) for k in ("lr", "min_lr", "warmup_lr", "weight_decay"))


@pytest.mark.parametrize("path", DWNET_CONFIGS, ids=os.path.basename)
def test_dwnet_recipe_loads_through_main(path):
    main = pytest.importorskip("main")
    defaults = main.load_cfg_defaults(path, main.get_args_parser())
    assert defaults["model"].startswith(("dwnet", "ddwnet", "iddwnet"))
