"""Engine and optimisation wiring: LR trace (recipe check 11.3), no-weight-decay groups (11.4),
gradient accumulation, hooks, dict outputs, the non-finite policy, stopping, evaluation."""
import math

import pytest
import timm
import torch
import torch.nn.functional as F

import main
from models.hooks import MethodHooks
from engine import NonFiniteLossError, RunState, TrainingInterrupted, evaluate, train_one_epoch
from losses import DistillationLoss
from utils.distributed import StopRequest


def _args(**kw):
    args = main.parse_args(["--device", "cpu", "--no-amp", "--print-freq", "0"])
    for k, v in kw.items():
        setattr(args, k, v)
    return args


def test_lr_trace_matches_deit():
    peak = 2e-3
    args = _args(epochs=300)
    model = torch.nn.Linear(2, 2)
    optimizer = main.build_optimizer(args, model, peak)
    scheduler = main.build_scheduler(args, optimizer, updates_per_epoch=10)
    trained_at = []
    for epoch in range(8):
        trained_at.append(optimizer.param_groups[0]["lr"])
        scheduler.step(epoch)  # DeiT steps after each epoch

    def lr(t):
        if t < 5:
            return 1e-6 + t * (peak - 1e-6) / 5
        return 1e-5 + (peak - 1e-5) * (1 + math.cos(math.pi * t / 300)) / 2

    assert trained_at[0] == pytest.approx(1e-6) and trained_at[1] == pytest.approx(1e-6)
    assert trained_at[2] == pytest.approx(1e-6 + (peak - 1e-6) / 5)
    assert trained_at[6] == pytest.approx(lr(5))
    for e in range(1, 8):
        assert trained_at[e] == pytest.approx(lr(e - 1))
    scheduler.step(300)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-5)
    scheduler.step(350)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-5)


def test_iter_schedule_steps_per_update():
    args = _args(epochs=2, warmup_epochs=1, sched_step="iter", warmup_lr=0.0, min_lr=0.0)
    model = torch.nn.Linear(2, 2)
    optimizer = main.build_optimizer(args, model, 1.0)
    scheduler = main.build_scheduler(args, optimizer, updates_per_epoch=4)
    scheduler.step_update(num_updates=2)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5)  # half-way through a 4-update warm-up
    scheduler.step(1)  # epoch steps are no-ops in iteration mode
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5)


def _named_groups(model, optimizer):
    names = {id(p): n for n, p in model.named_parameters()}
    return [(g["weight_decay"], {names[id(p)] for p in g["params"]}) for g in optimizer.param_groups]


def test_no_weight_decay_groups():
    model = timm.create_model("deit_tiny_distilled_patch16_224", num_classes=10, depth=1, embed_dim=32,
                              num_heads=2, patch_size=8, img_size=32)
    optimizer = main.build_optimizer(_args(), model, 1e-3)
    no_decay = set().union(*[names for wd, names in _named_groups(model, optimizer) if wd == 0])
    decay = set().union(*[names for wd, names in _named_groups(model, optimizer) if wd == 0.05])
    assert {"pos_embed", "cls_token", "dist_token", "norm.weight", "norm.bias", "blocks.0.norm1.weight",
            "blocks.0.attn.qkv.bias", "head.bias"} <= no_decay
    assert {"blocks.0.attn.qkv.weight", "head.weight", "patch_embed.proj.weight"} <= decay
    assert not decay & no_decay
    everything = main.build_optimizer(_args(decay_norm_and_bias=True), model, 1e-3)
    assert all(g["weight_decay"] == 0.05 for g in everything.param_groups)


class _RecordingHooks(MethodHooks):
    def __init__(self):
        super().__init__()
        self.steps = []
        self.pre_step_calls = 0

    def on_step_start(self, model, epoch, step, steps_per_epoch):
        self.steps.append((epoch, step, steps_per_epoch))

    def before_optimizer_step(self, model, optimizer):
        assert optimizer.param_groups[0]["lr"] == 0.5  # the optimizer of the run, before its step
        self.pre_step_calls += 1


def _linear_setup(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    data = torch.randn(8, 4)
    targets = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    return model, data, targets


def _criterion():
    return DistillationLoss(torch.nn.CrossEntropyLoss(), None, "none")


def test_gradient_accumulation_equals_big_batch():
    model_a, x, y = _linear_setup()
    model_b = torch.nn.Linear(4, 3)
    model_b.load_state_dict(model_a.state_dict())
    opt_a = torch.optim.SGD(model_a.parameters(), lr=0.5)
    opt_b = torch.optim.SGD(model_b.parameters(), lr=0.5)
    device = torch.device("cpu")
    hooks = _RecordingHooks()
    train_one_epoch(model_a, _criterion(), [(x, y)], opt_a, device, 0, None, args=_args(accum_iter=1))
    stats = train_one_epoch(model_b, _criterion(), [(x[:4], y[:4]), (x[4:], y[4:])], opt_b, device, 0, None,
                            hooks=hooks, args=_args(accum_iter=2))
    assert torch.allclose(model_a.weight, model_b.weight, atol=1e-6)
    assert hooks.steps == [(0, 0, 1)]  # one optimizer step: one hook call
    assert hooks.pre_step_calls == 1  # once per optimizer step, not per accumulated batch
    assert list(stats) == ["lr", "loss"]


class _DictModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x):
        logits = self.fc(x)
        return {"logits": logits, "aux_loss": logits.pow(2).mean(), "features": x}


def test_dict_outputs_add_aux_loss_and_log_it():
    _, x, y = _linear_setup()
    model = _DictModel()
    seen = {}

    class Crit(torch.nn.Module):
        def forward(self, samples, outputs, targets):
            seen.update(outputs)
            return F.cross_entropy(outputs["logits"], targets)

    with torch.no_grad():
        expected = F.cross_entropy(model.fc(x), y) + model.fc(x).pow(2).mean()
    stats = train_one_epoch(model, Crit(), [(x, y)], torch.optim.SGD(model.parameters(), lr=0.0),
                            torch.device("cpu"), 0, None, args=_args())
    assert "features" in seen and "aux_loss" not in seen
    assert stats["loss"] == pytest.approx(expected.item(), rel=1e-5)
    assert "aux_loss" in stats


class _NanModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x) * float("nan")


def test_nonfinite_loss_stops_with_epoch_and_step():
    _, x, y = _linear_setup()
    model = _NanModel()
    with pytest.raises(NonFiniteLossError, match=r"epoch 3, step 0"):
        train_one_epoch(model, _criterion(), [(x, y)], torch.optim.SGD(model.parameters(), lr=0.1),
                        torch.device("cpu"), 3, None, args=_args())


def test_nonfinite_loss_skipped_within_budget():
    _, x, y = _linear_setup()
    model = _NanModel()
    before = model.fc.weight.detach().clone()
    state = RunState()
    train_one_epoch(model, _criterion(), [(x, y), (x, y)], torch.optim.SGD(model.parameters(), lr=0.1),
                    torch.device("cpu"), 0, None, args=_args(skip_nonfinite=2), run_state=state)
    assert state.nonfinite_skipped == 2
    assert torch.equal(model.fc.weight, before)
    with pytest.raises(NonFiniteLossError):
        train_one_epoch(model, _criterion(), [(x, y)], torch.optim.SGD(model.parameters(), lr=0.1),
                        torch.device("cpu"), 1, None, args=_args(skip_nonfinite=2), run_state=state)


def test_stop_request_saves_then_interrupts():
    model, x, y = _linear_setup()
    stop = StopRequest()
    saved = []
    loader = [(x[:2], y[:2])] * 4
    state = RunState()
    with pytest.raises(TrainingInterrupted) as info:
        train_one_epoch(model, _criterion(), loader, torch.optim.SGD(model.parameters(), lr=0.1),
                        torch.device("cpu"), 0, None, args=_args(preempt_at_step=2), run_state=state,
                        stop_request=stop, save_mid_epoch=saved.append)
    assert saved == [2] and info.value.next_step == 2 and state.optimizer_steps == 2


def test_save_every_iters_calls_saver():
    model, x, y = _linear_setup()
    saved = []
    train_one_epoch(model, _criterion(), [(x[:2], y[:2])] * 5, torch.optim.SGD(model.parameters(), lr=0.1),
                    torch.device("cpu"), 0, None, args=_args(save_every_iters=2), save_mid_epoch=saved.append)
    assert saved == [2, 4]  # never after the last step: the epoch checkpoint follows


def test_evaluate_counts_exactly():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 7)
    x, y = torch.randn(10, 4), torch.randint(0, 7, (10,))
    loader = [(x[:4], y[:4]), (x[4:], y[4:])]
    stats = evaluate(loader, model, torch.device("cpu"), _args())
    with torch.no_grad():
        logits = model(x)
    top5 = logits.topk(5, dim=1).indices
    assert stats["acc1"] == pytest.approx(100.0 * (logits.argmax(1) == y).float().mean().item())
    assert stats["acc5"] == pytest.approx(100.0 * (top5 == y[:, None]).any(1).float().mean().item())
    # DeiT's printed loss averages the per-batch means; loss_per_image is the exact mean.
    batch_means = [F.cross_entropy(logits[:4], y[:4]).item(), F.cross_entropy(logits[4:], y[4:]).item()]
    assert stats["loss"] == pytest.approx(sum(batch_means) / 2, rel=1e-5)
    assert stats["loss_per_image"] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)
    assert list(stats) == ["loss", "acc1", "acc5", "loss_per_image"]


def test_iter_mode_engine_steps_scheduler_per_update():
    model, x, y = _linear_setup()
    args = _args(epochs=2, warmup_epochs=1, sched_step="iter", warmup_lr=0.0, min_lr=0.0)
    optimizer = main.build_optimizer(args, model, 1.0)
    scheduler = main.build_scheduler(args, optimizer, updates_per_epoch=4)
    calls = []
    original = scheduler.step_update
    scheduler.step_update = lambda num_updates, **kw: (calls.append(num_updates), original(num_updates, **kw))
    train_one_epoch(model, _criterion(), [(x[:2], y[:2])] * 4, optimizer, torch.device("cpu"), 1, None,
                    args=args, lr_scheduler=scheduler)
    assert calls == [5, 6, 7, 8]  # epoch 1 of 4 updates each: global update counts
    # t = 8 = t_initial: the cosine has reached min_lr
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-9)


class _Batch(tuple):
    def __new__(cls, x, y, skipped):
        obj = super().__new__(cls, (x, y))
        obj.skipped = skipped
        return obj


def test_skipped_files_reported_once_per_epoch(caplog):
    model, x, y = _linear_setup()
    loader = [_Batch(x[:4], y[:4], ["a.jpg"]), _Batch(x[4:], y[4:], ["b.jpg", "c.jpg"])]
    train_one_epoch(model, _criterion(), loader, torch.optim.SGD(model.parameters(), lr=0.1),
                    torch.device("cpu"), 4, None, args=_args())
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1
    assert "epoch 4" in warnings[0] and "3 training files" in warnings[0] and "a.jpg, b.jpg, c.jpg" in warnings[0]


def test_signal_sets_stop_request():
    import os
    import signal
    stop = StopRequest()
    previous = signal.getsignal(signal.SIGUSR1)
    try:
        stop.install()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.is_set() and stop.signal_name == "SIGUSR1"
    finally:
        signal.signal(signal.SIGUSR1, previous)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def test_worker_error_reduced_to_its_own_line():
    from utils.errors import UserError
    err = UserError("Caught UserError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
                    "  File \"x.py\", line 1, in f\nutils.errors.UserError: unreadable image a.jpg; drop --strict-data")
    assert main.one_line(err) == "unreadable image a.jpg; drop --strict-data"
    assert main.one_line(UserError("plain")) == "plain"
