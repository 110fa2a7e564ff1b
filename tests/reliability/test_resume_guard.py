"""Issue 18, item 2: `--resume` of a checkpoint saved for another model (same shapes) or other method
options stops with one line naming both, unless --resume-other-model says it is intended;
--eval only warns, and --finetune stays the way to start from other weights."""
import logging

import pytest
import torch

import main
from utils.errors import UserError
from utils.resume import TrainingParts, resume_if_possible

TINY = "{'depth': 2, 'embed_dim': 32, 'num_heads': 2, 'patch_size': 8}"


def _args(model, *extra):
    return main.parse_args(["--model", model, "--model-kwargs", TINY, "--input-size", "32", "--device", "cpu",
                            "--num_workers", "0", "--epochs", "3", *extra])


def _checkpoint(tmp_path, model, *extra):
    """A checkpoint as main.py writes it after epoch 0 of a run of `model` with `extra` flags."""
    args = _args(model, *extra)
    net = main.build_model(args, 10)
    parts = TrainingParts(net, main.build_optimizer(args, net, 1e-3))
    path = str(tmp_path / f"{model}.pth")
    assert main.save_training_checkpoint(args, parts, path, epoch=0, epoch_step=0, epoch_complete=True)
    return path


def _resume(model, path, *extra):
    args = _args(model, "--resume", path, *extra)
    net = main.build_model(args, 10)
    parts = TrainingParts(net, main.build_optimizer(args, net, 1e-3))
    return resume_if_possible(args, parts), net


@pytest.mark.parametrize("other, flags", [("vit_tiny_patch16_224", ()),
                                          ("deit_tiny_patch16_shrink_base", ("--drop_loc", "(1,)"))])
def test_resume_as_another_model_names_both(tmp_path, other, flags):
    path = _checkpoint(tmp_path, "deit_tiny_patch16_224")
    with pytest.raises(UserError) as info:
        _resume(other, path, *flags)
    message = str(info.value)
    assert f"--resume {path}" in message and f"--model deit_tiny_patch16_224 vs {other}" in message
    assert f"--finetune {path}" in message and "--resume-other-model" in message and "\n" not in message


def test_resume_with_another_keep_rate_names_the_option(tmp_path):
    path = _checkpoint(tmp_path, "deit_tiny_patch16_shrink_base", "--base_keep_rate", "0.7", "--drop_loc", "(1,)")
    with pytest.raises(UserError, match=r"--base-keep-rate 0\.7 vs 0\.5"):
        _resume("deit_tiny_patch16_shrink_base", path, "--base_keep_rate", "0.5", "--drop_loc", "(1,)")
    point, _ = _resume("deit_tiny_patch16_shrink_base", path, "--base_keep_rate", "0.7", "--drop_loc", "(1,)")
    assert point.start_epoch == 1  # the same options resume as before


def test_resume_other_model_flag_says_it_is_intended(tmp_path, caplog):
    path = _checkpoint(tmp_path, "deit_tiny_patch16_224")
    caplog.set_level(logging.WARNING)
    point, net = _resume("vit_tiny_patch16_224", path, "--resume-other-model")
    assert point.start_epoch == 1 and point.resumed_from == path
    assert any("--resume-other-model" in r.getMessage() and "deit_tiny_patch16_224" in r.getMessage()
               for r in caplog.records if r.levelno == logging.WARNING)
    saved = torch.load(path, weights_only=True)["model"]
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in saved.items())


def test_eval_of_another_models_weights_warns_and_finetune_starts_from_them(tmp_path, caplog):
    path = _checkpoint(tmp_path, "deit_tiny_patch16_224")
    caplog.set_level(logging.WARNING)
    point, _ = _resume("vit_tiny_patch16_224", path, "--eval")
    assert point.resumed_from == path and point.start_epoch == 0
    assert any("saved for another model" in r.getMessage() for r in caplog.records)
    tuned = main.build_model(_args("vit_tiny_patch16_224", "--finetune", path), 10)
    assert tuned.load_summary.missing == [] and tuned.load_summary.unexpected == []
