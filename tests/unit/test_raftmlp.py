"""RaftMLP and its MLP-Mixer baseline (models/raftmlp.py): the invariants of
docs/methods/raftmlp.md, the official state-dict layouts and the recipes."""
import glob
import json
import math
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
from models.errors import ModelConfigError
from models.raftmlp import CrossScaleEmbedding, RaftBlock, RaftLayerNorm, RaftMLP

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# name: (parameters, state-dict entries, fvcore GMACs at 224) from docs/methods/raftmlp.md
PUBLISHED = {
    "raftmlp_s": (9_868_768, 228, 2.101),
    "raftmlp_m": (21_413_632, 228, 4.289),
    "raftmlp_l": (36_184_672, 228, 6.571),
    "raftmlp_org_mixer": (59_918_200, 150, 12.649),
}


def single_level(depth, dim, raft=None, kernels=None):
    layer = dict(depth=depth, dim=dim, patch_size=16)
    if raft is not None:
        layer["raft_size"] = raft
    if kernels is not None:
        layer["embedding_kernels"] = kernels
    return [layer]


# The ablation settings of docs/methods/raftmlp.md: kwargs, parameters, state-dict entries.
ABLATIONS = {
    "r-1": (dict(layers=single_level(12, 768, raft=1)), 58_105_432, 222),
    "r-2": (dict(layers=single_level(12, 768, raft=2)), 58_162_888, 222),
    "r-4": (dict(layers=single_level(12, 768, raft=4)), 58_390_696, 222),
    "r-2-cross-mlp-emb": (dict(layers=single_level(12, 768, raft=2, kernels=[16, 32]),
                               embedding_type="emb_cross_mlp"), 60_522_184, 222),
    "hierarchy-m": (dict(layers=[dict(depth=d, dim=c, patch_size=p, raft_size=2) for d, c, p in
                                 zip((2, 2, 6, 2), (96, 192, 384, 768), (4, 2, 2, 2))]), 19_920_640, 228),
    "deep": (dict(layers=single_level(36, 384, raft=2)), 43_532_296, 654),
}


def small_raftmlp(**kwargs):
    """Two levels (grids 8 and 4 at 32 px), cross-scale embedding, raft size 2."""
    args = dict(layers=[dict(depth=1, dim=16, patch_size=4, raft_size=2, embedding_kernels=[4, 8]),
                        dict(depth=1, dim=32, patch_size=2, raft_size=2, embedding_kernels=[2, 4])],
                pretrained_image_size=32, num_classes=10, embedding_type="emb_cross_mlp")
    args.update(kwargs)
    return RaftMLP(**args)


def small_mixer(**kwargs):
    args = dict(layers=[dict(depth=2, dim=24, patch_size=8)], pretrained_image_size=32, num_classes=10,
                token_mixing_type="original_tm", embedding_type="emb_mixer")
    args.update(kwargs)
    return RaftMLP(**args)


def load_layout(shared_dir, name):
    with open(os.path.join(shared_dir, "parity", "keys", name + ".json")) as f:
        return json.load(f)


# ----------------------------------------------------------------------------- counts and layouts

@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_count_and_state_dict_size(name):
    with torch.device("meta"):
        model = timm.create_model(name)
    params, entries, _ = PUBLISHED[name]
    assert sum(p.numel() for p in model.parameters()) == params
    assert len(model.state_dict()) == entries


@pytest.mark.parametrize("setting", sorted(ABLATIONS))
def test_ablation_parameter_counts(setting):
    kwargs, params, entries = ABLATIONS[setting]
    with torch.device("meta"):
        model = RaftMLP(**kwargs)
    assert sum(p.numel() for p in model.parameters()) == params
    assert len(model.state_dict()) == entries


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_state_dict_matches_official_layout(shared_dir, name):
    layout = load_layout(shared_dir, name)
    with torch.device("meta"):
        model = timm.create_model(name)
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == {k: v[0] for k, v in layout.items()}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_filled_official_layout_loads_strictly_and_runs_deterministically(shared_dir, name):
    sys.path.insert(0, os.path.join(shared_dir, "parity"))
    from fill import fill_state_dict
    layout = load_layout(shared_dir, name)
    with torch.device("meta"):
        model = timm.create_model(name)
    model.load_state_dict(fill_state_dict(layout), strict=True, assign=True)
    model.eval()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        first, second = model(x), model(x)
    assert first.shape == (1, 1000) and torch.isfinite(first).all()
    assert torch.equal(first, second)


@pytest.mark.slow
def test_parity_case_raftmlp_s(shared_dir):
    sys.path.insert(0, os.path.join(shared_dir, "parity"))
    import check
    assert check.run_case(os.path.join(shared_dir, "parity", "cases", "raftmlp_s.pt"), verbose=True)


def test_pytorch_default_init_not_trunc_normal():
    model = small_raftmlp()
    fc = model.classifier
    bound = 1 / math.sqrt(fc.in_features)
    assert fc.weight.abs().max() <= bound and fc.bias.abs().max() <= bound
    assert fc.bias.any()  # timm's init would zero it
    assert float(fc.weight.detach().std()) == pytest.approx(bound / math.sqrt(3), rel=0.2)  # uniform, not 0.02


# ----------------------------------------------------------------------------- resolutions

@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_full_models_output_at_several_resolutions(name):
    model = timm.create_model(name).eval()
    with torch.no_grad():
        for size in (224, 256, 250, 64):
            assert model(torch.randn(1, 3, size, size)).shape == (1, 1000)


def level_grids(model, size):
    grids = []
    hooks = [level.register_forward_hook(lambda m, i, o: grids.append(tuple(o.shape[-2:]))) for level in model.levels]
    with torch.no_grad():
        model(torch.randn(1, 3, size, size))
    for h in hooks:
        h.remove()
    return [g[0] for g in grids]


@pytest.mark.slow
def test_internal_grids_at_other_resolutions():
    model = timm.create_model("raftmlp_s").eval()
    assert level_grids(model, 224) == [56, 28, 14, 7]
    assert level_grids(model, 256) == [64, 32, 16, 8]
    assert level_grids(model, 250) == [63, 32, 16, 8]


def count_interpolations(monkeypatch, model, size):
    calls = []
    original = F.interpolate

    def spy(*args, **kwargs):
        calls.append(kwargs.get("mode"))
        return original(*args, **kwargs)

    monkeypatch.setattr(F, "interpolate", spy)
    with torch.no_grad():
        model(torch.randn(1, 3, size, size))
    monkeypatch.setattr(F, "interpolate", original)
    assert set(calls) <= {"bicubic"}
    return len(calls)


@pytest.mark.slow
def test_interpolation_only_off_the_pretrained_resolution(monkeypatch):
    model = timm.create_model("raftmlp_s").eval()
    blocks = sum(1 for m in model.modules() if isinstance(m, RaftBlock))
    assert blocks == 12
    assert count_interpolations(monkeypatch, model, 224) == 0
    assert count_interpolations(monkeypatch, model, 256) == 2 * blocks
    assert count_interpolations(monkeypatch, model, 250) == 2 * blocks + 2  # levels 0 (250) and 1 (63) resized


def test_mixer_interpolates_twice_per_block_off_resolution(monkeypatch):
    model = small_mixer().eval()
    assert count_interpolations(monkeypatch, model, 32) == 0
    assert count_interpolations(monkeypatch, model, 48) == 4


# ----------------------------------------------------------------------------- raft block semantics

def test_raft_layernorm_with_r1_is_a_plain_layernorm():
    raft, plain = RaftLayerNorm(12, 1), nn.LayerNorm(12)
    with torch.no_grad():
        for p in (raft.weight, raft.bias):
            p.copy_(torch.randn(12))
        plain.load_state_dict(raft.state_dict())
    x = torch.randn(2, 3, 12)
    torch.testing.assert_close(raft(x), plain(x), atol=0, rtol=0)


def reference_raft_block(block, x, r):
    """docs/methods/raftmlp.md written with explicit index arithmetic; x (B, G, G, C) at the pretrained grid."""
    batch, grid, _, dim = x.shape
    c_ = dim // r
    k_idx, j_idx = torch.meshgrid(torch.arange(c_), torch.arange(r), indexing="ij")
    raft_order = (j_idx * c_ + k_idx).reshape(-1)  # position k * r + j holds channel j * c' + k

    def ln_raft(t, norm):
        return F.layer_norm(t[..., raft_order], (dim,), norm.weight, norm.bias)[..., torch.argsort(raft_order)]

    def mix(t, branch, vertical):
        n = ln_raft(t, branch.norm[1])
        out = torch.zeros_like(t)
        j = torch.arange(r).repeat_interleave(grid)  # V index j * G + s
        s = torch.arange(grid).repeat(r)
        for k in range(c_):
            for line in range(grid):
                rows, cols = (s, torch.full_like(s, line)) if vertical else (torch.full_like(s, line), s)
                v = n[:, rows, cols, j * c_ + k]
                out[:, rows, cols, j * c_ + k] = branch.fn(v)
        return t + out

    return mix(mix(x, block[1], vertical=True), block[3], vertical=False)


def reference_channel_mixing(block, x):
    channel = block[5]
    return x + channel.fn(F.layer_norm(x, (x.shape[-1],), channel.norm.weight, channel.norm.bias))


def bicubic_nhwc(x, size):
    """The official resampling: natural-order NCHW, bicubic, align_corners=False."""
    nchw = x.permute(0, 3, 1, 2).contiguous()
    return F.interpolate(nchw, size=size, mode="bicubic", align_corners=False).permute(0, 2, 3, 1)


def raft_block_with_random_norms():
    torch.manual_seed(0)
    block = RaftBlock(dim=8, grid=5, raft_size=2, token_expansion=2, channel_expansion=4, dropout=0.0,
                      drop_path=0.0).eval()
    with torch.no_grad():
        for name, p in block.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn(p.shape))  # distinct per-channel affine to expose the (k, j) order
    return block


def test_raft_block_matches_the_index_formulas():
    block = raft_block_with_random_norms()
    x = torch.randn(2, 5, 5, 8)
    with torch.no_grad():
        ref = reference_channel_mixing(block, reference_raft_block(block, x, 2))
        torch.testing.assert_close(block(x), ref, atol=1e-6, rtol=1e-6)


def test_raft_block_off_the_pretrained_grid_mixes_tokens_at_the_pretrained_grid():
    """Token mixing (and its residual) at the pretrained 5 x 5 grid, channel mixing at the input's 7 x 6."""
    block = raft_block_with_random_norms()
    x = torch.randn(2, 7, 6, 8)
    with torch.no_grad():
        mixed = bicubic_nhwc(reference_raft_block(block, bicubic_nhwc(x, (5, 5)), 2), (7, 6))
        torch.testing.assert_close(block(x), reference_channel_mixing(block, mixed), atol=1e-5, rtol=1e-5)


def test_cross_scale_embedding_equals_unfold_concat_linear():
    emb = CrossScaleEmbedding(3, 16, [4, 8])
    x = torch.randn(2, 3, 32, 24)
    unfolded = [F.unfold(x, k, stride=4, padding=(k - 4) // 2) for k in (4, 8)]
    ref = emb.fc(torch.cat(unfolded, dim=1).transpose(1, 2)).reshape(2, 8, 6, 16)
    torch.testing.assert_close(emb(x), ref, atol=1e-5, rtol=1e-5)


def test_mixer_embedding_flattens_row_col_channel():
    level = small_mixer().levels[0]
    x = torch.randn(2, 3, 32, 32)
    out = level.fn[1](level.fn[0](x))
    patches = x.reshape(2, 3, 4, 8, 4, 8)
    row_col_chan = patches.permute(0, 2, 4, 3, 5, 1).reshape(2, 4, 4, 192)
    chan_row_col = patches.permute(0, 2, 4, 1, 3, 5).reshape(2, 4, 4, 192)
    torch.testing.assert_close(out, level.fn[1](row_col_chan), atol=0, rtol=0)
    assert not torch.allclose(out, level.fn[1](chan_row_col), atol=1e-3)


# ----------------------------------------------------------------------------- training behaviour

def test_eval_deterministic_and_drop_path_independent_per_branch():
    model = small_raftmlp(drop_path_rate=0.5).eval()
    x = torch.randn(64, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
    block = model.levels[0].fn[2]
    drops = [block[i].drop for i in (1, 3, 5)]
    assert len({id(d) for d in drops}) == 3 and all(d.drop_prob == 0.5 for d in drops)
    masks = []
    hooks = [d.register_forward_hook(lambda m, i, o: masks.append(o.flatten(1).abs().sum(1) > 0)) for d in drops]
    model.train()
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    assert len(masks) == 3
    assert all(0 < int(m.sum()) < 64 for m in masks)
    assert not (torch.equal(masks[0], masks[1]) and torch.equal(masks[1], masks[2]))


@pytest.mark.parametrize("builder,size", [(small_raftmlp, 32), (small_raftmlp, 40), (small_mixer, 32),
                                          (lambda: small_raftmlp(shortcut=True), 32)])
def test_forward_backward_every_parameter_gets_a_gradient(builder, size):
    model = builder().train()
    model(torch.randn(2, 3, size, size)).logsumexp(dim=1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing


def test_shortcut_heads_layout_and_gating():
    model = small_raftmlp(shortcut=True).eval()
    keys = set(model.state_dict())
    assert {"heads.0.1.weight", "heads.0.4.weight", "heads.1.1.weight"} <= keys
    assert "heads.1.4.weight" not in keys
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        maps = model.forward_features(x)
        gate = model.heads[0](maps[0])
        last = model.heads[1](maps[1])
        expected = model.classifier(gate[:, :32] * last + gate[:, 32:])
        torch.testing.assert_close(model(x), expected, atol=1e-6, rtol=1e-6)


def test_classifier_api_and_kwarg_aliases():
    model = small_raftmlp(drop_rate=0.25, in_channels=1)
    assert model.levels[0].fn[2][1].fn[2].p == 0.25
    assert model.get_classifier() is model.classifier
    model.reset_classifier(4)
    x = torch.randn(2, 1, 32, 32)
    assert model(x).shape == (2, 4)
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, 32)


def test_bad_arguments_are_value_errors():
    with pytest.raises(ModelConfigError, match="patch_size 1"):
        RaftMLP(layers=[dict(depth=1, dim=8, patch_size=1, raft_size=2)])
    with pytest.raises(ModelConfigError, match="token_mixing_type"):
        RaftMLP(layers=[dict(depth=1, dim=8, patch_size=4, raft_size=2)], token_mixing_type="mixer")
    with pytest.raises(ModelConfigError, match="first embedding kernel"):
        RaftMLP(layers=[dict(depth=1, dim=8, patch_size=4, raft_size=2, embedding_kernels=[8, 4])],
                embedding_type="emb_cross_mlp")
    with pytest.raises(ModelConfigError, match="raft_size"):
        RaftMLP(layers=[dict(depth=1, dim=9, patch_size=4, raft_size=2)])


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_fvcore_counts_the_published_gmacs(name):
    from fvcore.nn import FlopCountAnalysis
    model = timm.create_model(name).eval()
    counter = FlopCountAnalysis(model, torch.randn(1, 3, 224, 224))
    counter.unsupported_ops_warnings(False)
    counter.uncalled_modules_warnings(False)
    assert counter.total() / 1e9 == pytest.approx(PUBLISHED[name][2], rel=0.01)


# ----------------------------------------------------------------------------- recipes

ALLOWED_KEYS = {"model", "epochs", "batch_size", "lr", "min_lr", "warmup_lr", "warmup_epochs", "weight_decay",
                "drop_path", "clip_grad", "smoothing", "mixup", "cutmix", "mixup_switch_prob", "aa", "reprob",
                "remode", "color_jitter", "train_interpolation", "eval_interpolation", "eval_crop_ratio",
                "train_crop", "mix_mode", "model_ema", "unscale_lr", "sched_step", "decay_norm_and_bias",
                "accum_iter", "amp", "input_size", "finetune", "data_set", "seed", "repeated_aug"}
RAFT_CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "raftmlp_*.yaml")))
FINETUNE_SETS = {"cifar10": "CIFAR10", "cifar100": "CIFAR100", "flowers102": "FLOWERS102", "cars": "CARS",
                 "inat18": "INAT18", "inat19": "INAT19"}


def accepted_keys():
    try:
        import main
    except ImportError:
        return ALLOWED_KEYS
    return set(main.option_dests(main.get_args_parser()))


def test_every_recipe_is_present():
    names = {os.path.basename(p)[:-len(".yaml")] for p in RAFT_CONFIGS}
    assert names == {"raftmlp_s", "raftmlp_m", "raftmlp_l", "raftmlp_org_mixer"} | {
        f"raftmlp_finetune_{d}" for d in FINETUNE_SETS}


@pytest.mark.parametrize("path", RAFT_CONFIGS, ids=os.path.basename)
def test_raftmlp_recipe_parses_and_follows_the_design_choices(path):
    with open(path) as f:
        text = f.read()
    cfg = yaml.safe_load(text)
    assert set(cfg) <= accepted_keys()
    assert cfg["model"] in timm.list_models(cfg["model"])
    gpus, per_gpu = map(int, re.search(r"Hardware assumption: (\d+) GPUs x (\d+) images", text).groups())
    assert per_gpu == cfg["batch_size"]
    assert cfg["unscale_lr"] is True  # absolute official lrs
    assert (cfg["mix_mode"], cfg["aa"], cfg["remode"], cfg["train_crop"]) == (
        "sequential", "rand-n2-m9-mstd101", "const", "resize_random_crop")
    assert cfg["mixup"] == cfg["cutmix"] == 0.8
    assert cfg["train_interpolation"] == cfg["eval_interpolation"] == "bilinear"
    assert cfg["decay_norm_and_bias"] is True and cfg["model_ema"] is False and cfg["amp"] is False
    assert cfg["clip_grad"] is None and cfg["sched_step"] == "iter" and cfg["seed"] == 42
    name = os.path.basename(path)[:-len(".yaml")]
    if name.startswith("raftmlp_finetune_"):
        assert gpus * per_gpu == 256
        assert cfg["data_set"] == FINETUNE_SETS[name[len("raftmlp_finetune_"):]]
        assert cfg["finetune"] == "path/to/raftmlp_s.pth" and cfg["model"] == "raftmlp_s"
        assert (cfg["lr"], cfg["min_lr"], cfg["weight_decay"], cfg["epochs"], cfg["warmup_epochs"]) == (
            1e-4, 1e-5, 1e-4, 50, 10)
        assert cfg["drop_path"] == 0.0 and cfg["reprob"] == 0.0
    else:
        assert gpus * per_gpu == 2048 and cfg["model"] == name
        assert (cfg["lr"], cfg["min_lr"], cfg["weight_decay"], cfg["epochs"], cfg["warmup_epochs"]) == (
            2e-3, 1e-5, 0.05, 305, 5)
        assert cfg["drop_path"] == 0.1 and cfg["reprob"] == 0.25


@pytest.mark.parametrize("path", RAFT_CONFIGS, ids=os.path.basename)
def test_raftmlp_recipe_loads_through_main(path):
    main = pytest.importorskip("main")
    assert main.load_cfg_defaults(path, main.get_args_parser())["model"].startswith("raftmlp")
