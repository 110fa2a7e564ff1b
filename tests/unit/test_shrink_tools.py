"""tools/shrink_convert.py and tools/attention_entropy.py (docs/methods/shrink.md, check 5 and 12)."""
import argparse
import math

import pytest
import timm
import torch

import models  # noqa: F401
from models.shrink import attention_keys
from tools import attention_entropy as ae
from tools import shrink_convert

# Real tiny width (the converter builds the registered models) at 32 px to stay fast.
SMALL_INPUT = dict(img_size=32, num_classes=10)
TINY = dict(img_size=32, embed_dim=48, num_heads=3, num_classes=10)


def lambda_checkpoint(tmp_path, prune, done, lam, name="deit_tiny_patch16_224_copy_lambda", official=False,
                      epoch=399, seed=0):
    model = timm.create_model(name, prune_layer=prune, done_layer=done, weight_init="skip", **SMALL_INPUT)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05 + (1.0 if p.dim() == 1 else 0.0))
    model.set_lambda(lam)
    if official:  # lambda_vit: Namespace args with list strings, epoch, no lambda
        checkpoint = {"model": model.state_dict(), "epoch": epoch,
                      "args": argparse.Namespace(prune_layer=str(prune), done_layer=str(done), model=name)}
    else:
        checkpoint = {"model": model.state_dict(), "epoch": epoch,
                      "method_state": {"lambda": lam, "prune_layer": prune, "done_layer": done}}
    path = tmp_path / "lambda.pth"
    torch.save(checkpoint, path)
    return path, model


def run_convert(tmp_path, source, *extra, model="deit_tiny_patch16_224_shrink"):
    out = tmp_path / "shrink.pth"
    code = shrink_convert.main(["--input", str(source), "--output", str(out), "--model", model, *extra])
    return code, out


# ----------------------------------------------------------------------------- converter (check 5)

def test_converter_round_trip(tmp_path, capsys):
    source, lambda_model = lambda_checkpoint(tmp_path, [0, 2, 4], [6], 0.0)
    code, out = run_convert(tmp_path, source)
    assert code == 0
    saved = torch.load(out, weights_only=True)
    state = saved["model"]
    removed = [0, 2, 4, 6]
    assert len(state) == 152 - 6 * len(removed)
    assert set(lambda_model.state_dict()) - set(state) == {k for i in removed for k in attention_keys(i)}
    assert saved["args"]["done_layer"] == removed
    printed = capsys.readouterr().out
    assert "dropped 24 keys" in printed and "blocks.6.attn.qkv.weight" in printed
    shrink = timm.create_model("deit_tiny_patch16_224_shrink", done_layer=removed, **SMALL_INPUT).eval()
    shrink.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(shrink(x), lambda_model.eval()(x), rtol=0, atol=1e-5)


def test_converter_refuses_lambda_above_zero(tmp_path):
    source, _ = lambda_checkpoint(tmp_path, [0, 2], [], 0.3)
    code, out = run_convert(tmp_path, source)
    assert code == 2 and not out.exists()


def test_converter_official_checkpoint(tmp_path, caplog):
    source, _ = lambda_checkpoint(tmp_path, [0, 1, 3], [], 0.0, official=True, epoch=399)
    code, out = run_convert(tmp_path, source)
    assert code == 0 and len(torch.load(out, weights_only=True)["model"]) == 152 - 18
    # checkpoint_280.pth of the official run still has lambda 0.0635
    source, _ = lambda_checkpoint(tmp_path, [0, 1, 3], [], 0.0, official=True, epoch=280)
    assert run_convert(tmp_path, source)[0] == 2


def test_converter_without_recorded_lists(tmp_path, caplog):
    source, model = lambda_checkpoint(tmp_path, [2, 5], [], 0.0)
    torch.save({"model": model.state_dict()}, source)  # bare official release file: no lists, no lambda
    assert run_convert(tmp_path, source)[0] == 2
    code, out = run_convert(tmp_path, source, "--prune_layer", "[2,5]", "--done_layer", "[]")
    assert code == 0 and "records no lambda" in caplog.text
    assert len(torch.load(out, weights_only=True)["model"]) == 140


def test_converter_rejects_conflicting_or_wrong_lists(tmp_path):
    source, _ = lambda_checkpoint(tmp_path, [0, 2], [], 0.0)
    assert run_convert(tmp_path, source, "--prune_layer", "[0,3]")[0] == 2
    # a failed equivalence check writes nothing
    code, out = run_convert(tmp_path, source, "--atol", "-1")
    assert code == 2 and not out.exists()
    # already converted: the attention keys are gone
    code, out = run_convert(tmp_path, source)
    assert code == 0
    assert run_convert(tmp_path, out, "--prune_layer", "[0,2]", "--done_layer", "[]")[0] == 2


@pytest.mark.slow
def test_converter_base_uses_attn_model(tmp_path):
    source, _ = lambda_checkpoint(tmp_path, [0, 1], [9], 0.0, name="deit_base_patch16_224_attn")
    code, out = run_convert(tmp_path, source, model="deit_base_patch16_224_shrink")
    assert code == 0 and len(torch.load(out, weights_only=True)["model"]) == 152 - 18


# ----------------------------------------------------------------------------- entropy estimators (check 12)

def test_feature_entropy_is_sum_log_std_ddof0():
    stds = torch.tensor([0.5, 1.0, 2.0, 3.5], dtype=torch.float64)
    z = torch.randn(1000, 4, dtype=torch.float64)
    z = (z - z.mean(0)) / z.std(0, correction=0)  # exactly unit population std per channel
    features = (z * stds + 7.0).float()
    assert ae.feature_entropy(features) == pytest.approx(float(torch.log(stds).sum()), abs=1e-5)
    # ddof 0, not 1: two samples {0, 2} have population std 1
    assert ae.feature_entropy(torch.tensor([[0.0], [2.0]])) == pytest.approx(0.0, abs=1e-12)


def test_head_entropy_is_sum_log2_std_ddof1():
    logits = torch.tensor([[0.0, 1.0], [2.0, 5.0]])  # unbiased stds sqrt(2), sqrt(8)
    assert ae.head_entropy(logits) == pytest.approx(math.log2(math.sqrt(2)) + math.log2(math.sqrt(8)), abs=1e-6)


def test_distribution_entropy():
    uniform = torch.full((3, 7), 1 / 7)
    torch.testing.assert_close(ae.distribution_entropy(uniform), torch.full((3,), math.log(7)))
    one_hot = torch.eye(4)
    assert torch.equal(ae.distribution_entropy(one_hot), torch.zeros(4))


def test_attention_probabilities_reproduce_timm_attention():
    model = timm.create_model("deit_tiny_patch16_224_copy_lambda", **TINY).eval()
    attn = model.blocks[0].attn
    x = torch.randn(2, 5, 48)
    probs = ae.attention_probabilities(attn, x)
    assert probs.shape == (2, 3, 5, 5)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 3, 5))
    v = attn.qkv(x).reshape(2, 5, 3, 3, 16).permute(2, 0, 3, 1, 4)[2]
    out = attn.proj((probs @ v).transpose(1, 2).reshape(2, 5, 48))
    with torch.no_grad():
        torch.testing.assert_close(out, attn(x), rtol=1e-5, atol=1e-6)


def test_budget_from_ratio_matches_readme_labels():
    assert [ae.budget_from_ratio(r, 12) for r in (0.25, 0.3, 0.4, 0.5)] == [3, 4, 5, 6]


def test_greedy_selection_evaluates_sets_jointly():
    # Non-additive entropy: block 2 alone is cheap, but 2 together with 1 is expensive.
    costs = {0: 0.5, 1: 0.2, 2: 0.1, 3: 0.9}

    def evaluate(removed):
        penalty = 5.0 if {1, 2} <= set(removed) else 0.0
        return 10.0 - sum(costs[i] for i in removed) - penalty

    selected, rows = ae.greedy_selection(evaluate, [0, 1, 2, 3], 3, 10.0)
    assert selected == [2, 0, 3]
    assert len(rows) == 4 + 3 + 2 and sum(r.chosen for r in rows) == 3
    assert [r.transfer for r in rows if r.step == 1] == pytest.approx([0.5, 0.2, 0.1, 0.9])
    with pytest.raises(ValueError):
        ae.greedy_selection(evaluate, [0, 1], 3, 10.0)


def test_removed_blocks_equal_deployed_model():
    args = ae.get_args_parser().parse_args(["--model", "deit_tiny_patch16_224", "--model-kwargs", repr(TINY)])
    model = ae.build_analysis_model(args)
    ae.set_removed_blocks(model, [1, 3])
    shrink = timm.create_model("deit_tiny_patch16_224_shrink", done_layer=[1, 3], **TINY).eval()
    state = {k: v for k, v in model.state_dict().items() if k not in set(attention_keys(1) + attention_keys(3))}
    shrink.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), shrink(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("data", [["--random-data", "8"], ["--data-set", "SYNTHETIC", "--synthetic-val-size", "8"]])
def test_entropy_cli_dry_run(tmp_path, capsys, data):
    plot = tmp_path / "entropy.png"
    code = ae.main(["--model", "deit_tiny_patch16_224", "--model-kwargs", repr(dict(TINY, depth=4)),
                    "--budget", "2", "--batch-size", "4", "--num_workers", "0", "--plot", str(plot), *data])
    assert code == 0 and plot.stat().st_size > 0
    printed = capsys.readouterr().out
    assert "suggested: --prune_layer [" in printed
    assert printed.count("\n   1  ") + printed.startswith("   1  ") == 4  # step 1 tries all 4 blocks


def test_entropy_cli_bad_budget(tmp_path):
    assert ae.main(["--model", "deit_tiny_patch16_224", "--model-kwargs", repr(dict(TINY, depth=2)),
                    "--budget", "3", "--random-data", "2", "--num_workers", "0"]) == 2
    assert ae.main(["--model", "resnet50", "--random-data", "2"]) == 2
