"""Issue 18: the silent surprises and misleading messages that need more than one bad command line
(those are in test_bad_cli.py's table): a finished run resumed again (item 6), a one-class set at
evaluation (item 3), input sizes every family's architecture cannot take (item 4), a fine-tuned
classifier of another class count (item 9) and torch.compile's CUDA warning on a CPU machine (item 9)."""
import dataclasses
import json
import logging
from types import SimpleNamespace

import pytest
import timm
import torch

import main
from models import family
from models.factory import build_example
from utils.errors import UserError

from .helpers import TINY_FLAGS, TINY_MODEL, assert_ok, files_under, read_text, run_main

ONE_EPOCH = TINY_FLAGS + ["--epochs", "1", "--synthetic-train-size", "64"]


def _snapshot(folder) -> dict:
    return {name: (folder / name).read_bytes() for name in files_under(folder)}


@pytest.mark.slow
def test_auto_resume_into_a_finished_run_reports_it_and_changes_nothing(tmp_path):
    out = tmp_path / "out"
    assert_ok(run_main(ONE_EPOCH + ["--output_dir", out]))
    before = _snapshot(out)
    last = [json.loads(line) for line in read_text(out / "log.txt").splitlines()][-1]

    again = run_main(ONE_EPOCH + ["--output_dir", out, "--auto-resume"])
    assert_ok(again)
    assert "the run already finished at epoch 1 of 1" in again.stderr
    assert f"final accuracy {last['test_acc1']:.2f}% top-1, {last['test_acc5']:.2f}% top-5" in again.stderr
    assert "start training" not in again.stderr and "Training time" not in again.stderr
    assert _snapshot(out) == before  # not a byte written, no lock left behind

    longer = run_main(ONE_EPOCH + ["--output_dir", out, "--auto-resume", "--epochs", "2"])
    assert_ok(longer)
    assert "extending the run of" in longer.stderr and "finished at epoch 1 of 1, to --epochs 2" in longer.stderr
    assert [json.loads(line)["epoch"] for line in read_text(out / "log.txt").splitlines()] == [0, 1]


def _one_class_folder(root):
    from PIL import Image
    for split in ("train", "val"):
        (root / split / "cat").mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (40, 40), (60 * i, 0, 0)).save(root / split / "cat" / f"{i}.png")
    return root


def test_evaluating_a_one_class_set_proceeds_with_a_warning(tmp_path, caplog):
    """Training on it is one error line (test_bad_cli.py); an evaluation may still be wanted."""
    folder = _one_class_folder(tmp_path / "data")
    caplog.set_level(logging.INFO)
    assert main.cli(TINY_MODEL + ["--data-path", str(folder), "--data-set", "IMAGEFOLDER", "--eval", "--device", "cpu",
                                  "--num_workers", "0", "--batch-size", "4"]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("1 class(es)" in w and "trivially 100%" in w for w in warnings)
    assert any("Accuracy of the network on the 4 test images" in r.getMessage() for r in caplog.records)


def _first_example_of_each_family():
    return [pytest.param(f.examples[0], id=f.name) for f in family.families() if f.examples]


@pytest.mark.parametrize("example", _first_example_of_each_family())
def test_an_input_size_is_refused_or_every_pixel_counts(example):
    """For every family at one pixel more than its example's size: either the start-up check refuses
    the size (naming --input-size), or the model really uses the last row and column (their
    gradient is not zero). A patch embedding that silently drops them fails this test."""
    size = example.input_size + 1
    try:
        model = build_example(dataclasses.replace(example, input_size=size))
    except ValueError as err:  # a model that refuses the size when built: a clear error is fine too
        assert str(err)
        return
    args = SimpleNamespace(model=example.model, input_size=size)
    try:
        main.check_runs_at_input_size(model, args)
    except UserError as err:
        assert f"--input-size {size}" in str(err) or "cannot run on" in str(err)
        return
    x = torch.randn(1, 3, size, size, requires_grad=True)
    model.eval()
    out = model(x)
    (out if isinstance(out, torch.Tensor) else out[0]).float().sum().backward()
    assert x.grad[..., -1, :].abs().sum() > 0 and x.grad[..., :, -1].abs().sum() > 0, (
        f"{example.model} ignores the last row/column at {size} px but the input-size check let it through")


def test_a_patch_size_that_does_not_divide_names_the_layer_and_the_sizes_that_fit():
    model = timm.create_model("deit_tiny_patch16_224", depth=1, embed_dim=32, num_heads=2, patch_size=8, img_size=33)
    with pytest.raises(UserError) as info:
        main.check_runs_at_input_size(model, SimpleNamespace(model="deit_tiny_patch16_224", input_size=33))
    message = str(info.value)
    assert "--input-size 33" in message and "patch_embed.proj cuts 8x8 patches" in message
    assert "drops the last 1 row(s) and 1 column(s)" in message and "--input-size 32 or 40" in message


def test_finetune_into_another_class_count_says_the_head_shape_differs(tmp_path, caplog):
    """The classifier was reported as 'dropped' and 'missing' (left at initialisation)."""
    source = timm.create_model("deit_tiny_patch16_224", num_classes=10, depth=2, embed_dim=32, num_heads=2,
                               patch_size=8, img_size=32)
    path = tmp_path / "ten_classes.pth"
    torch.save({"model": source.state_dict()}, path)
    args = main.parse_args(TINY_MODEL + ["--finetune", str(path), "--device", "cpu"])
    caplog.set_level(logging.INFO)
    model = main.build_model(args, 5)
    lines = [r.getMessage() for r in caplog.records if "finetune" in r.getMessage()]
    assert f"finetune from {path}: {len(source.state_dict()) - 2} loaded, 0 resized, 0 dropped, 0 missing, " \
           f"2 with another shape (re-initialised)" in lines
    assert "finetune: shape differs, re-initialised: head.weight, head.bias (head.weight: checkpoint [10, 32], " \
           "model [5, 32])" in lines
    assert not any("missing" in line and "head." in line for line in lines)
    assert model.head.weight.shape == (5, 32)


@pytest.mark.slow
def test_compile_on_a_cpu_machine_prints_no_cuda_runtime_warning(tmp_path):
    """torch's C++ backend warned "No CUDA runtime is found, using CUDA_HOME=..." when a CUDA toolkit
    is installed (CUDA_HOME set here to make sure it would be)."""
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = run_main(TINY_MODEL + ["--data-set", "SYNTHETIC", "--synthetic-train-size", "8", "--synthetic-val-size", "8",
                                  "--batch-size", "8", "--num_workers", "0", "--device", "cpu", "--epochs", "1",
                                  "--no-model-ema", "--mixup", "0", "--cutmix", "0", "--aa", "none", "--reprob", "0",
                                  "--compile"], env={"CUDA_HOME": str(tmp_path)})
    assert_ok(proc)
    assert "No CUDA runtime" not in proc.stderr + proc.stdout
