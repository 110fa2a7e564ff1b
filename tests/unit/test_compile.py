"""torch.compile for every method family: no graph breaks at a fixed reduction setting.

`torch._dynamo.explain` traces each family's tiny model (eval and training mode) and
counts graph breaks; none are allowed. The LTMP inference model, whose token counts depend
on the data, traces with the Dynamo setting it declares (`models.compiling`: unbacked sizes
from `capture_scalar_outputs`). Tracing uses no backend compiler, so these tests are fast;
the inductor compile (C++ on CPU, slow) is exercised by the tests marked slow: the
compiled output against eager, `benchmark.py --compile` and one `main.py --compile`
training epoch.
"""
import json
import os

import pytest
import timm
import torch

import models  # noqa: F401  (registers the project's models)
import models.tome
from models import family
from models.compiling import compile_model, dynamo_settings
from models.factory import build_example
from engine import cast_for_inference
from e2e_utils import TINY_RUN, assert_ok, read_log, run_main


LTMP_INFERENCE, LTMP_MASKED = "inference_ltmp_deit_tiny_patch16_224", "ltmp_deit_tiny_patch16_224"


def _deit():
    return timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, num_heads=2, depth=3,
                             num_classes=10)


# name -> (builder, input size, modes): the unreduced baseline and every family's Examples
# (`family.Example.compile`), built as main.py builds them (`factory.build_example`)
CASES = {"deit": (_deit, 32, ("eval", "train"))}
for _family in family.families():
    for _example in _family.examples:
        if _example.compile:
            CASES[_example.name] = (lambda e=_example: build_example(e), _example.input_size, tuple(_example.compile))


def _params(training: bool):
    mode = "train" if training else "eval"
    return [pytest.param(name, training) for name, (_, _, modes) in CASES.items() if mode in modes]


def _build(name):
    return CASES[name][0]()


def _images(name="deit", batch=2):
    size = CASES[name][1]
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


def _graph_breaks(model, x, training: bool):
    torch._dynamo.reset()
    model.train(training)
    with torch.set_grad_enabled(training), torch._dynamo.config.patch(**dynamo_settings(model)):
        explanation = torch._dynamo.explain(model)(x)
    reasons = [str(r.reason).splitlines()[0] for r in explanation.break_reasons]
    return explanation.graph_break_count, reasons


@pytest.mark.parametrize("name,training", _params(False) + _params(True))
def test_no_graph_breaks_and_compiled_matches_eager(name, training):
    """Every family's Example traces in one graph (eval and/or training mode, as it declares), and the
    traced program (Dynamo, eager backend) gives eager's output to the last bit, random draws included."""
    torch.manual_seed(0)
    model = _build(name)
    x = _images(name)
    breaks, reasons = _graph_breaks(model, x, training)
    assert breaks == 0, f"{name} ({'train' if training else 'eval'}): {breaks} graph breaks: {reasons}"
    torch._dynamo.reset()
    with torch.set_grad_enabled(training), torch._dynamo.config.patch(**dynamo_settings(model)):
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        torch.manual_seed(1)
        expected = model(x)
        torch.manual_seed(1)
        got = compiled(x)
    for want, have in zip(_tensors(expected), _tensors(got)):
        torch.testing.assert_close(have, want, rtol=0, atol=0)


def _tensors(output):
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        return [v for v in output.values() if isinstance(v, torch.Tensor)]
    return [v for v in output if isinstance(v, torch.Tensor)]


@pytest.mark.parametrize("name", ["evit_fuse", "tome", "ltm_vit"])
def test_bf16_cast_models_trace_in_one_piece(name):
    """bf16 weights: fullgraph tracing succeeds and the compiled (eager backend) output equals eager's."""
    torch.manual_seed(0)
    model = cast_for_inference(_build(name).eval(), torch.bfloat16)
    x = _images(name)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        expected, got = model(x), compiled(x)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected.float(), rtol=0, atol=0)


def test_schedule_change_recompiles_instead_of_breaking():
    """A new fixed setting (EViT keep rate) is a recompile with no breaks, and the output follows it."""
    torch.manual_seed(0)
    model = _build("evit_fuse").eval()
    x = _images("evit_fuse")
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        for rate in (0.7, 0.5):
            model.set_keep_rate(rate)
            torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=0)


@pytest.mark.slow
def test_inductor_compiled_tome_matches_eager():
    torch.manual_seed(0)
    model = models.tome.patch(timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=16, embed_dim=32,
                                                num_heads=2, depth=2, num_classes=10), r=1).eval()
    x = torch.randn(2, 3, 32, 32)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)


def test_declared_dynamo_settings():
    assert dynamo_settings(_build(LTMP_INFERENCE)) == {"capture_scalar_outputs": True}
    assert dynamo_settings(_build("evit_fuse")) == {"allow_unspec_int_on_nn_module": True}
    for name in ("deit", LTMP_MASKED, "tome"):
        assert dynamo_settings(_build(name)) == {}, name


def test_conflicting_dynamo_settings_are_an_error():
    class Wants(torch.nn.Module):
        dynamo_config = {"capture_scalar_outputs": True}

    class Refuses(torch.nn.Module):
        dynamo_config = {"capture_scalar_outputs": False}

    with pytest.raises(models.errors.ModelConfigError, match="capture_scalar_outputs"):
        dynamo_settings(torch.nn.Sequential(Wants(), Refuses()))


def test_evit_keep_rate_warmup_compiles_a_few_graphs_not_one_per_step():
    """Training-mode warm-up (a new keep rate every step): set_keep_rate's integer counts stay
    symbolic under the model's declared setting, so 31 rates give at most 3 graphs (before: one
    per rate up to Dynamo's limit of 8, then eager), and every step matches eager."""
    from models.evit import keep_rate_schedule

    torch.manual_seed(0)
    model = _build("evit_fuse").train()
    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    x = _images("evit_fuse")
    torch._dynamo.reset()
    with torch._dynamo.config.patch(allow_unspec_int_on_nn_module=False):
        compiled = compile_model(model, backend=counting_backend)
        for step in range(31):
            model.set_keep_rate(keep_rate_schedule(0, step, 30, 0.5, 0, 1))
            torch.manual_seed(step)
            got = compiled(x)
            got.sum().backward()
            torch.manual_seed(step)
            torch.testing.assert_close(got, model(x), rtol=0, atol=0)
    assert 2 <= len(graphs) <= 3


def test_ltmp_inference_breaks_without_its_declared_setting():
    """The declaration is what removes the break: without it Dynamo stops at the token count."""
    model = _build(LTMP_INFERENCE).eval()
    torch._dynamo.reset()
    with torch.no_grad(), torch._dynamo.config.patch(capture_scalar_outputs=False):
        explanation = torch._dynamo.explain(model)(_images(LTMP_INFERENCE))
    assert explanation.graph_break_count > 0


def _ltmp_inference_model():
    """Tiny LTMP inference ViT with sharpened attention, so prune thresholds split the samples."""
    torch.manual_seed(0)
    model = _build(LTMP_INFERENCE).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight.mul_(6)
    return model


@pytest.mark.slow
def test_inductor_compiled_ltmp_inference_matches_eager():
    """Per-sample token counts (padding), nothing removed, and everything but the class token
    removed: the compiled model keeps eager's counts and logits."""
    model = _ltmp_inference_model()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    with torch._dynamo.config.patch(capture_scalar_outputs=False):  # compile_model sets what the model needs
        compiled = compile_model(model, fullgraph=True)
        assert torch._dynamo.config.capture_scalar_outputs is True
        seen = set()
        for merge, prune in ((0.5, 0.05), (1.0, 0.0), (1.0, 1.0)):
            model.set_thresholds(merge=merge, prune=prune)
            with torch.no_grad():
                expected = model(x)
                eager_counts = [c.tolist() for c in model.ltmp_info["tokens"]]
                got = compiled(x)
                counts = [c.tolist() for c in model.ltmp_info["tokens"]]
            assert counts == eager_counts, (merge, prune)
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
            seen.add("padded" if any(len(set(c)) > 1 for c in counts) else
                     "full" if counts[-1][0] == 17 else "class token only" if counts[-1][0] == 1 else "other")
    assert seen == {"padded", "full", "class token only"}


@pytest.mark.slow
def test_benchmark_compile_reports_the_speedup(tmp_path):
    import benchmark

    out = tmp_path / "r.jsonl"
    argv = ["--model", "test_vit", "--img-size", "32", "--batch-size", "2", "--warmup", "2", "--rounds", "2",
            "--iters-per-round", "1", "--compile", "--no-flops", "--output", str(out)]
    assert benchmark.main(argv) == 0
    record = json.loads(out.read_text().splitlines()[0])
    assert record["compile"] is True and record["error"] is None
    assert record["compile_speedup"] > 0 and record["eager_throughput"]["median"] > 0
    assert record["compile_speedup"] == pytest.approx(
        record["throughput"]["median"] / record["eager_throughput"]["median"])


@pytest.mark.slow
def test_main_trains_one_epoch_compiled(tmp_path):
    """One synthetic epoch of a tiny EViT (fixed keep rate) with --compile, then its evaluation."""
    args = [a for a in TINY_RUN]
    args[args.index("deit_tiny_patch16_224")] = "deit_tiny_patch16_shrink_base"
    args[args.index("--model-kwargs") + 1] = "{'depth': 2, 'embed_dim': 32, 'num_heads': 2, 'patch_size': 8}"
    args[args.index("--synthetic-train-size") + 1] = "64"
    args[args.index("--synthetic-val-size") + 1] = "32"
    proc = run_main(args + ["--drop_loc", "(1,)", "--base_keep_rate", "0.5", "--shrink_start_epoch", "0",
                            "--epochs", "1", "--compile", "--output_dir", str(tmp_path)], timeout=900)
    assert_ok(proc)
    log = read_log(tmp_path)
    assert len(log) == 1 and log[0]["epoch"] == 0
    assert log[0]["train_keep_rate"] == 0.5  # the block pruned in every compiled training step
    assert torch.isfinite(torch.tensor(log[0]["train_loss"])) and 0.0 <= log[0]["test_acc1"] <= 100.0
    assert os.path.exists(tmp_path / "checkpoint.pth")


@pytest.mark.slow
def test_main_compiled_keep_rate_warmup_stays_compiled(tmp_path):
    """An EViT warm-up epoch (a new keep rate every step) with --compile: the keep counts stay
    symbolic, so Dynamo recompiles once, not at every step up to its limit (then eager)."""
    args = [a for a in TINY_RUN]
    args[args.index("deit_tiny_patch16_224")] = "deit_tiny_patch16_shrink_base"
    args[args.index("--model-kwargs") + 1] = "{'depth': 2, 'embed_dim': 32, 'num_heads': 2, 'patch_size': 8}"
    args[args.index("--input-size") + 1] = "64"  # 64 patches: a new token count at every one of the 12 steps
    args[args.index("--synthetic-train-size") + 1] = "96"
    args[args.index("--synthetic-val-size") + 1] = "16"
    args[args.index("--batch-size") + 1] = "8"
    proc = run_main(args + ["--drop_loc", "(1,)", "--base_keep_rate", "0.5", "--shrink_start_epoch", "0",
                            "--shrink_epochs", "1", "--epochs", "1", "--compile", "--output_dir", str(tmp_path)],
                    env_extra={"TORCH_LOGS": "recompiles"}, timeout=900)
    assert_ok(proc)
    recompiles = proc.stderr.count("Recompiling function")
    assert recompiles <= 2, proc.stderr[-3000:]  # measured 1; without the declared setting, one per step
    log = read_log(tmp_path)
    assert 0.5 < log[0]["train_keep_rate"] < 1.0  # the last warm-up step's rate
