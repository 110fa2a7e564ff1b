"""Checkpoint safety and reliability, and DeiT's --finetune rules (recipe checks 11.8, 11.9)."""
import argparse
import os
import random

import numpy as np
import pytest
import timm
import torch

import main
from utils.checkpoint import (capture_rng_state, extract_state_dict, keep_epoch_copy, load_checkpoint_file,
                              load_model_weights, restore_rng_state, save_checkpoint)
from utils.errors import UserError

TINY = dict(depth=1, embed_dim=32, num_heads=2, patch_size=8, img_size=32)


def tiny_deit(name="deit_tiny_patch16_224", num_classes=10, **kw):
    return timm.create_model(name, num_classes=num_classes, **{**TINY, **kw})


class _Evil:
    """Pickles to a call of os.system: loading it must never run that call."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "payload": _Evil(marker)}, path)
    with pytest.raises(UserError) as info:
        load_checkpoint_file(str(path))
    message = str(info.value)
    assert "refusing to load" in message and "contains Python code" in message and "system" in message
    assert "\n" not in message
    assert not marker.exists()


def test_official_checkpoint_with_namespace_args_loads(tmp_path):
    model = tiny_deit()
    path = tmp_path / "official.pth"
    torch.save({"model": model.state_dict(), "optimizer": {}, "epoch": 299,
                "args": argparse.Namespace(model="deit_tiny_patch16_224", lr=5e-4, drop_loc=(3, 6, 9))}, path)
    ckpt = load_checkpoint_file(str(path))
    assert isinstance(ckpt["args"], argparse.Namespace) and ckpt["args"].drop_loc == (3, 6, 9)
    other = tiny_deit()
    load_model_weights(other, extract_state_dict(ckpt))
    for k, v in model.state_dict().items():
        assert torch.equal(v, other.state_dict()[k])


def test_missing_and_truncated_files_give_one_line(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_checkpoint_file(str(tmp_path / "nope.pth"))
    path = tmp_path / "ok.pth"
    save_checkpoint({"model": {"w": torch.ones(100)}}, str(path))
    truncated = tmp_path / "trunc.pth"
    truncated.write_bytes(path.read_bytes()[:60])
    with pytest.raises(UserError, match="truncated") as info:
        load_checkpoint_file(str(truncated))
    assert "\n" not in str(info.value)
    with pytest.raises(UserError, match="URL"):
        load_checkpoint_file("https://example.com/x.pth")


@pytest.mark.parametrize("content, named", [
    (b"epoch 3, acc 71.2\nsecond line\n", "a text file (it starts with 'epoch 3, acc 71.2')"),
    (b'{"model": {"head.weight": [1, 2]}, "epoch": 3}', "a JSON file"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", "neither a zip archive nor a pickle"),
    (b"", "empty"),
])
def test_a_file_that_is_not_a_checkpoint_names_what_it_is(tmp_path, content, named):
    """A text file once gave a KeyError from the legacy unpickler, a JSON file torch's message
    cut mid-sentence advising weights_only=False (never safe for a file of unknown origin)."""
    path = tmp_path / "model.pth"
    path.write_bytes(content)
    with pytest.raises(UserError) as info:
        load_checkpoint_file(str(path))
    message = str(info.value)
    assert named in message and str(path) in message and "torch.save" in message
    assert "\n" not in message and "weights_only" not in message


def test_a_pickle_torch_refuses_gets_no_weights_only_advice(tmp_path, monkeypatch):
    import pickle
    path = tmp_path / "ok.pth"
    save_checkpoint({"model": {"w": torch.ones(2)}}, str(path))
    torch_text = ("Weights only load failed. In PyTorch 2.6, we changed the default value of the `weights_only` "
                  "argument in `torch.load` from `False` to `True`. Re-running `torch.load` with `weights_only` "
                  "set to `False` will likely succeed, but it can result in arbitrary code execution.\n"
                  "Please file an issue with the following so that we can make `weights_only=True` compatible "
                  "with your use case: WeightsUnpickler error: Unsupported operand 34\n\nCheck the documentation")

    def refuse(*args, **kwargs):
        raise pickle.UnpicklingError(torch_text)

    monkeypatch.setattr(torch, "load", refuse)
    with pytest.raises(UserError, match=r"not a loadable tensor file \(Unsupported operand 34\)") as info:
        load_checkpoint_file(str(path))
    assert "weights_only" not in str(info.value) and "\n" not in str(info.value)


def test_saved_args_reads_dicts_and_namespaces():
    from utils.checkpoint import saved_args
    assert saved_args({"args": {"model": "m", "input_size": 32}}) == {"model": "m", "input_size": 32}
    assert saved_args({"args": argparse.Namespace(model="m")}) == {"model": "m"}
    assert saved_args({"model": {}}) == {} and saved_args([1]) == {}


def test_save_is_atomic_and_failure_keeps_previous(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint.pth")
    save_checkpoint({"epoch": 1, "args": argparse.Namespace(a=1, t=(1, 2))}, path)
    loaded = torch.load(path, weights_only=True)  # plain values only: args became a dict
    assert loaded["epoch"] == 1 and loaded["args"] == {"a": 1, "t": (1, 2)}

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError):
        save_checkpoint({"epoch": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["epoch"] == 1
    assert os.listdir(tmp_path) == ["checkpoint.pth"]  # no temp file left behind


def test_write_checkpoint_logs_instead_of_raising(tmp_path, monkeypatch, caplog):
    path = str(tmp_path / "checkpoint.pth")
    save_checkpoint({"epoch": 1}, path)
    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    assert main.write_checkpoint({"epoch": 2}, path) is False
    assert "could not write checkpoint" in caplog.text and "No space left" in caplog.text
    monkeypatch.undo()
    assert load_checkpoint_file(path)["epoch"] == 1


def test_keep_epoch_copy_prunes_history(tmp_path):
    path = str(tmp_path / "checkpoint.pth")
    for epoch in range(5):
        save_checkpoint({"epoch": epoch}, path)
        keep_epoch_copy(path, epoch, keep=2)
    names = sorted(p for p in os.listdir(tmp_path) if p.startswith("checkpoint-"))
    assert names == ["checkpoint-0003.pth", "checkpoint-0004.pth"]
    assert load_checkpoint_file(str(tmp_path / "checkpoint-0003.pth"))["epoch"] == 3
    assert load_checkpoint_file(path)["epoch"] == 4


def test_extract_state_dict_variants():
    sd = {"a.weight": torch.zeros(2)}
    for wrapped in ({"model": sd}, {"net": sd}, {"state_dict": sd}, sd, {"model": {"module.a.weight": torch.zeros(2)}}):
        assert list(extract_state_dict(wrapped)) == ["a.weight"]
    with pytest.raises(UserError):
        extract_state_dict({"epoch": 3})


def test_strict_mismatch_names_keys_and_suggests_model():
    small = timm.create_model("deit_tiny_patch16_224", num_classes=10)
    distilled = timm.create_model("deit_tiny_distilled_patch16_224", num_classes=10)
    with pytest.raises(UserError) as info:
        load_model_weights(small, distilled.state_dict(), model_name="deit_tiny_patch16_224")
    message = str(info.value)
    assert "unexpected" in message and "dist_token" in message and "pos_embed" in message
    assert "deit_tiny_distilled_patch16_224" in message  # the registered model that fits
    assert "\n" not in message


def test_rng_state_round_trip(tmp_path):
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    state = capture_rng_state()
    path = str(tmp_path / "rng.pth")
    save_checkpoint({"rng": state}, path)
    expected = (torch.rand(3), np.random.rand(3), random.random())
    restore_rng_state(load_checkpoint_file(path)["rng"])
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1]) and expected[2] == got[2]


# --------------------------------------------------------------------------- --finetune (check 11.8)

def _save(tmp_path, state, name="ft.pth", key="model"):
    path = tmp_path / name
    torch.save({key: state} if key else state, path)
    return str(path)


def _finetune(target, state, name="deit_tiny_patch16_224", load="finetune"):
    from models.factory import load_weights
    return load_weights(target, state, load=load, model_name=name)


def test_finetune_drops_only_mismatched_head():
    source = tiny_deit(num_classes=1000)
    target = tiny_deit(num_classes=10)
    before_head = target.head.weight.detach().clone()
    summary = _finetune(target, source.state_dict())
    assert set(summary.missing) == {"head.weight", "head.bias"} and summary.unexpected == []
    assert set(summary.dropped) == {"head.weight", "head.bias"}
    assert torch.equal(target.head.weight, before_head)
    assert torch.equal(target.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
    assert summary.line().startswith(f"{len(source.state_dict()) - 2} loaded, 0 resized, 2 dropped, 2 missing")
    # same number of classes: the head is kept
    target2 = tiny_deit(num_classes=1000)
    summary = _finetune(target2, source.state_dict())
    assert summary.missing == [] and torch.equal(target2.head.weight, source.head.weight)


def test_finetune_of_another_architecture_is_an_error_naming_the_mismatches():
    from models.factory import CheckpointMismatchError
    source = tiny_deit(embed_dim=64, num_heads=2)
    target = tiny_deit()
    before = target.blocks[0].attn.qkv.weight.detach().clone()
    with pytest.raises(CheckpointMismatchError, match="keys with other shapes .*blocks.0") as info:
        _finetune(target, source.state_dict())
    assert "--finetune-partial" in str(info.value) and "\n" not in str(info.value)
    assert torch.equal(target.blocks[0].attn.qkv.weight, before)  # nothing was loaded
    summary = _finetune(target, source.state_dict(), load="partial")
    assert summary.mismatched and set(summary.mismatched) <= set(summary.dropped)


def test_finetune_drops_a_mismatched_raftmlp_classifier():
    import timm
    import models  # noqa: F401  (registers raftmlp_*)
    layers = [dict(depth=1, dim=16, patch_size=8, raft_size=2, embedding_kernels=[8])]
    source = timm.create_model("raftmlp_s", layers=layers, pretrained_image_size=32, num_classes=1000)
    target = timm.create_model("raftmlp_s", layers=layers, pretrained_image_size=32, num_classes=10)
    summary = _finetune(target, source.state_dict(), name="raftmlp_s")
    assert set(summary.missing) == {"classifier.weight", "classifier.bias"} and summary.unexpected == []


def test_pos_embed_identity_at_equal_size_and_bicubic_otherwise():
    source = tiny_deit()
    target = tiny_deit()
    _finetune(target, source.state_dict())
    assert torch.allclose(target.pos_embed, source.pos_embed, atol=1e-6)

    bigger = tiny_deit(img_size=64)  # 8x8 grid instead of 4x4
    summary = _finetune(bigger, source.state_dict())
    assert summary.resized == ["pos_embed"]
    assert bigger.pos_embed.shape == (1, 65, 32)
    assert torch.equal(bigger.pos_embed[:, :1], source.pos_embed[:, :1])  # class token copied
    grid = source.pos_embed[:, 1:].reshape(1, 4, 4, 32).permute(0, 3, 1, 2)
    expected = torch.nn.functional.interpolate(grid, size=(8, 8), mode="bicubic", align_corners=False)
    assert torch.allclose(bigger.pos_embed[:, 1:], expected.permute(0, 2, 3, 1).flatten(1, 2), atol=1e-6)


def test_distilled_checkpoint_into_plain_model():
    source = tiny_deit("deit_tiny_distilled_patch16_224")
    target = tiny_deit()
    summary = _finetune(target, source.state_dict())
    assert {"dist_token", "head_dist.weight", "head_dist.bias"} <= set(summary.dropped)
    assert summary.missing == [] and summary.unexpected == []
    assert torch.equal(target.pos_embed[:, :1], source.pos_embed[:, :1])
    assert torch.allclose(target.pos_embed[:, 1:], source.pos_embed[:, 2:], atol=1e-6)


def test_shrink_filter_drops_attention_of_removed_blocks():
    import timm
    import models  # noqa: F401
    kwargs = dict(depth=2, embed_dim=32, num_heads=2, patch_size=8, img_size=32, num_classes=10)
    source = timm.create_model("deit_tiny_patch16_224_copy_lambda", prune_layer=[0], **kwargs)
    target = timm.create_model("deit_tiny_patch16_224_shrink", done_layer=[0], **kwargs)
    summary = _finetune(target, source.state_dict(), name="deit_tiny_patch16_224_shrink")
    assert summary.missing == [] and summary.unexpected == []
    removed = sorted(k for k in source.state_dict() if k not in target.state_dict())
    assert removed and all(k.startswith("blocks.0.") for k in removed) and sorted(summary.dropped) == removed


def _training_parts(seed):
    from timm.utils import ModelEmaV2

    torch.manual_seed(seed)
    model = tiny_deit()
    args = main.parse_args(["--device", "cpu", "--epochs", "10", "--model", "deit_tiny_patch16_224"])
    optimizer = main.build_optimizer(args, model, 1e-3)
    scheduler = main.build_scheduler(args, optimizer, updates_per_epoch=2)
    ema = ModelEmaV2(model, decay=0.5)
    return args, main.TrainingParts(model, optimizer, scheduler, None, ema)


def test_resume_round_trip_restores_everything(tmp_path):
    """Check 11.9: optimizer, scheduler, EMA, counters and start_epoch = epoch + 1."""
    args, parts = _training_parts(0)
    model = parts.model_without_ddp
    loss = model(torch.randn(2, 3, 32, 32)).sum()
    loss.backward()
    parts.optimizer.step()
    parts.model_ema.update(model)
    parts.lr_scheduler.step(3)
    parts.run_state.optimizer_steps, parts.run_state.max_accuracy = 7, 42.0
    path = str(tmp_path / "checkpoint.pth")
    assert main.save_training_checkpoint(args, parts, path, epoch=3, epoch_step=0, epoch_complete=True)

    args2, fresh = _training_parts(1)
    args2.resume = path
    point = main.resume_if_possible(args2, fresh)
    assert (point.start_epoch, point.start_step, point.max_accuracy) == (4, 0, 42.0)
    for a, b in zip(parts.model_without_ddp.state_dict().values(), fresh.model_without_ddp.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(parts.model_ema.module.state_dict().values(), fresh.model_ema.module.state_dict().values()):
        assert torch.equal(a, b)
    assert fresh.optimizer.state_dict()["state"].keys() == parts.optimizer.state_dict()["state"].keys()
    assert fresh.optimizer.param_groups[0]["lr"] == parts.optimizer.param_groups[0]["lr"]
    assert fresh.lr_scheduler.state_dict() == parts.lr_scheduler.state_dict()
    assert fresh.run_state.optimizer_steps == 7
    assert point.rng_state is not None


def test_resume_mid_epoch_and_eval_only(tmp_path):
    args, parts = _training_parts(0)
    path = str(tmp_path / "checkpoint.pth")
    main.save_training_checkpoint(args, parts, path, epoch=2, epoch_step=5, epoch_complete=False)
    args2, fresh = _training_parts(1)
    args2.resume = path
    point = main.resume_if_possible(args2, fresh)
    assert (point.start_epoch, point.start_step) == (2, 5)
    args3, fresh3 = _training_parts(2)
    args3.resume, args3.eval = path, True
    point = main.resume_if_possible(args3, fresh3)  # --eval: weights only
    assert point.start_epoch == 0 and fresh3.run_state.optimizer_steps == 0


def test_auto_resume_picks_output_dir_checkpoint(tmp_path):
    args, parts = _training_parts(0)
    main.save_training_checkpoint(args, parts, str(tmp_path / "checkpoint.pth"), 0, 0, True)
    args2, fresh = _training_parts(1)
    args2.output_dir, args2.auto_resume = str(tmp_path), True
    assert main.resume_if_possible(args2, fresh).start_epoch == 1
    args3, fresh3 = _training_parts(1)
    args3.output_dir, args3.auto_resume = str(tmp_path / "empty"), True
    assert main.resume_if_possible(args3, fresh3).start_epoch == 0  # nothing there yet: fresh start


def test_auto_resume_falls_back_to_epoch_copy_when_latest_is_corrupt(tmp_path):
    args, parts = _training_parts(0)
    path = str(tmp_path / "checkpoint.pth")
    main.save_training_checkpoint(args, parts, path, 1, 0, True)
    keep_epoch_copy(path, 1, keep=3)
    main.save_training_checkpoint(args, parts, path, 2, 0, True)
    with open(path, "r+b") as f:  # damage the newest file in place
        f.truncate(100)
    args2, fresh = _training_parts(1)
    args2.output_dir, args2.auto_resume = str(tmp_path), True
    point = main.resume_if_possible(args2, fresh)
    assert point.start_epoch == 2 and point.resumed_from.endswith("checkpoint-0001.pth")
    os.unlink(tmp_path / "checkpoint-0001.pth")
    with pytest.raises(UserError, match="truncated"):
        main.resume_if_possible(args2, _training_parts(2)[1])


def test_nonfinite_weights_are_not_written(tmp_path, caplog):
    args, parts = _training_parts(0)
    path = str(tmp_path / "checkpoint.pth")
    assert main.save_training_checkpoint(args, parts, path, 0, 3, False)
    with torch.no_grad():
        parts.model_without_ddp.head.weight[0, 0] = float("nan")
    assert not main.save_training_checkpoint(args, parts, path, 0, 4, False)
    assert "not writing" in caplog.text and "head.weight" in caplog.text
    assert load_checkpoint_file(path)["epoch_step"] == 3


# --------------------------------------------------------------------------- one checkpoint reader

def _ddp_checkpoint(tmp_path, model_name="deit_tiny_patch16_224"):
    """A checkpoint as a DDP-wrapped model saves it: every key prefixed `module.`."""
    model = tiny_deit(model_name)
    path = tmp_path / "ddp.pth"
    torch.save({"model": {f"module.{k}": v for k, v in model.state_dict().items()}, "epoch": 0,
                "args": {"model": model_name}}, path)
    return model, str(path)


def _tiny_args(*extra):
    return main.parse_args(["--model", "deit_tiny_patch16_224", "--model-kwargs",
                            "{'depth': 1, 'embed_dim': 32, 'num_heads': 2, 'patch_size': 8}", "--input-size", "32",
                            "--device", "cpu", "--num_workers", "0", *extra])


def test_ddp_prefixed_checkpoint_loads_with_finetune_as_with_resume(tmp_path):
    """`--resume` stripped the `module.` prefix, `--finetune` stopped with '20 model keys missing'."""
    source, path = _ddp_checkpoint(tmp_path)
    finetuned = main.build_model(_tiny_args("--finetune", path), 10)
    assert finetuned.load_summary.missing == [] and finetuned.load_summary.unexpected == []
    args = _tiny_args("--resume", path, "--eval")
    resumed = main.build_model(args, 10)
    main.resume_if_possible(args, main.TrainingParts(resumed))
    for key, value in source.state_dict().items():
        assert torch.equal(finetuned.state_dict()[key], value) and torch.equal(resumed.state_dict()[key], value)


@pytest.mark.parametrize("wrap", ["model", "state_dict", "net", "model_ema", "state_dict_ema", None])
@pytest.mark.parametrize("prefix", ["", "module.", "_orig_mod.", "module._orig_mod."])
def test_one_reader_for_every_wrapper_and_prefix(wrap, prefix):
    from models.factory import state_dict_of
    weights = {"a.weight": torch.zeros(2), "b.bias": torch.ones(1)}
    inner = {prefix + k: v for k, v in weights.items()}
    checkpoint = {wrap: inner, "epoch": 3, "args": {"model": "m"}} if wrap else inner
    assert state_dict_of(checkpoint).keys() == weights.keys()
    assert extract_state_dict(checkpoint).keys() == weights.keys()  # the trainer's name for the same reader


def test_the_model_weights_win_over_the_ema_weights():
    from models.factory import state_dict_of
    checkpoint = {"model_ema": {"w": torch.zeros(1)}, "model": {"w": torch.ones(1)}}
    assert torch.equal(state_dict_of(checkpoint)["w"], torch.ones(1))
