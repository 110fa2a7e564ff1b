"""benchmark.py: records, interleaved comparison, model selection, OOM back-off, precision."""
import csv
import json
import logging
import subprocess
import sys

import pytest
import torch
from torch import nn

import benchmark
from utils import measure
from utils import bench_records
from benchmark import ModelSpec
from utils.errors import UserError

# timm's own 6-block, 64-wide test ViT; at 32 px it has 5 tokens.
TINY = ["--img-size", "32", "--batch-size", "2", "--warmup", "1", "--iters-per-round", "1"]

REQUIRED_FIELDS = {
    "record_version", "timestamp", "kind", "label", "model", "method_flags", "model_kwargs", "mode",
    "batch_size_requested", "batch_size", "oom_backoff", "backoff_enabled", "img_size", "precision",
    "autocast_dtype", "channels_last", "compile", "compile_mode", "warmup", "rounds", "iters_per_round",
    "device", "device_name", "torch_threads", "torch_interop_threads", "fused_attn", "versions", "platform",
    "params", "gmacs", "gflops", "flops_counter", "flops_unit", "gmacs_fvcore", "gmacs_torchprofile",
    "counters_rel_diff", "counters_disagree", "skipped_ops", "counter_errors", "tokens_per_block",
    "throughput", "latency_ms",
    "per_image_ms", "round_times_s", "peak_mem_mb", "peak_mem_delta_mb", "peak_mem_kind", "argv", "error",
    "peak_gflops", "achieved_gflops", "pct_of_peak", "malloc_settings",
}


def read_jsonl(path):
    with open(path) as handle:
        return [json.loads(line) for line in handle]


@pytest.mark.slow
def test_records_carry_every_field(tmp_path):
    out, table, plot = tmp_path / "r.jsonl", tmp_path / "r.csv", tmp_path / "r.png"
    argv = ["--model", "test_vit", *TINY, "--rounds", "2", "--mode", "both", "--precision", "bf16",
            "--channels-last", "--output", str(out), "--csv", str(table), "--plot", str(plot)]
    assert benchmark.main(argv) == 0
    records = read_jsonl(out)
    assert [r["mode"] for r in records] == ["infer", "train"]
    for record in records:
        assert REQUIRED_FIELDS <= set(record), REQUIRED_FIELDS - set(record)
        assert record["model"] == "test_vit" and record["kind"] == "speed"
        assert record["img_size"] == [32, 32] and record["batch_size"] == 2 == record["batch_size_requested"]
        assert record["precision"] == "bf16" and record["autocast_dtype"] == "bfloat16"
        assert record["channels_last"] is True and record["device"] == "cpu"
        assert record["flops_counter"] == "fvcore" and record["gmacs"] > 0 and record["gmacs_torchprofile"] > 0
        assert record["fused_attn"] in (True, False) and record["torch_threads"] >= 1
        assert {"torch", "timm", "fvcore", "torchprofile", "python"} <= set(record["versions"])
        assert all(record["versions"][k] for k in ("torch", "timm", "fvcore", "torchprofile"))
        assert record["throughput"]["median"] > 0 and record["throughput"]["n"] == 2
        assert len(record["round_times_s"]) == 2 and record["peak_mem_mb"] > 0
        assert record["tokens_per_block"] == [5] * 6
        assert record["error"] is None and record["oom_backoff"] == []
    with open(table) as handle:
        rows = list(csv.DictReader(handle))
    assert [row["mode"] for row in rows] == ["infer", "train"]
    assert float(rows[0]["throughput_median"]) == pytest.approx(records[0]["throughput"]["median"])
    assert plot.stat().st_size > 1000


def test_flops_only_record(tmp_path, capsys):
    out = tmp_path / "f.jsonl"
    assert benchmark.main(["--model", "test_vit", "--img-size", "32", "--flops-only", "--counter", "fvcore",
                           "--output", str(out)]) == 0
    (record,) = read_jsonl(out)
    assert record["kind"] == "flops" and record["mode"] == "flops"
    assert record["gmacs_torchprofile"] is None and record["gmacs"] > 0
    assert "throughput" not in record
    assert "test_vit" in capsys.readouterr().out


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_compare_identical_models_ratio_near_one(tmp_path, restore_threads):
    out = tmp_path / "c.jsonl"
    # one thread: on a shared 2-core machine two threads convoy and make rounds erratic
    argv = ["--compare", "test_vit", "test_vit", *TINY, "--warmup", "3", "--rounds", "10", "--iters-per-round", "10",
            "--threads", "1", "--no-flops", "--output", str(out)]
    assert benchmark.main(argv) == 0
    (record,) = read_jsonl(out)
    assert record["kind"] == "compare" and record["ratio"]["n"] == 10
    assert len(record["a"]["round_times_s"]) == len(record["b"]["round_times_s"]) == 10
    # the machine is shared: generous bounds
    assert 0.7 < record["ratio"]["of_medians"] < 1.4
    assert record["ratio"]["min"] <= record["ratio"]["median"] <= record["ratio"]["max"]


def test_expand_model_names():
    available = ["deit_small_patch16_224", "deit_tiny_patch16_224", "vit_small_patch16_224"]
    assert benchmark.expand_model_names(["deit_*"], available) == available[:2]
    assert benchmark.expand_model_names(["deit_tiny_patch16_224", "deit_*"], available) == [available[1], available[0]]
    names = benchmark.expand_model_names(["deit_s*"])  # the real registry
    assert "deit_small_patch16_224" in names and all(n.startswith("deit_s") for n in names)
    with pytest.raises(UserError, match="did you mean deit_small_patch16_224"):
        benchmark.expand_model_names(["deit_smal_patch16_224"], available)
    with pytest.raises(UserError, match="no registered model matches"):
        benchmark.expand_model_names(["nothing_*"], available)


def test_parse_spec_flags_override_defaults():
    defaults = {dest: None for dest in benchmark.method_dests()}
    defaults["base_keep_rate"] = 0.5
    (spec,) = benchmark.parse_spec("deit_small_patch16_224 --tome-r 13 --drop_loc '(2, 5)' --fuse_token", defaults)
    assert spec.name == "deit_small_patch16_224"
    assert spec.method["tome_r"] == 13 and spec.method["drop_loc"] == (2, 5) and spec.method["fuse_token"] is True
    assert spec.method["base_keep_rate"] == 0.5  # inherited
    assert set(spec.explicit) == {"tome_r", "drop_loc", "fuse_token"}
    (spec,) = benchmark.parse_spec("deit_small_patch16_224 --base_keep_rate 0.7 --prune_layer [0,2,4]", defaults)
    assert spec.method["base_keep_rate"] == 0.7 and spec.method["prune_layer"] == [0, 2, 4]
    with pytest.raises(UserError, match="unknown flag"):
        benchmark.parse_spec("deit_small_patch16_224 --keep 0.7", defaults)
    with pytest.raises(UserError, match="drop_loc"):
        benchmark.parse_spec("deit_small_patch16_224 --drop_loc abc", defaults)
    with pytest.raises(UserError, match="must start with a model name"):
        benchmark.parse_spec("--tome-r 3", defaults)


def test_method_flags_reach_only_families_that_take_them():
    evit_name, plain = "deit_tiny_patch16_shrink_base", "deit_tiny_patch16_224"
    method = {dest: None for dest in benchmark.method_dests()}
    method.update(base_keep_rate=0.7, fuse_token=True, tome_r=8)
    kwargs, unused = benchmark.split_method_args(ModelSpec(evit_name, method))
    assert kwargs == {"base_keep_rate": 0.7, "fuse_token": True} and unused == []
    kwargs, unused = benchmark.split_method_args(ModelSpec(plain, method))
    assert kwargs == {} and sorted(unused) == ["base_keep_rate", "fuse_token"]  # tome_r patches, never a kwarg

    benchmark.check_method_flags([ModelSpec(evit_name, method), ModelSpec(plain, method)])  # warns only
    with pytest.raises(UserError, match="applies to none"):
        benchmark.check_method_flags([ModelSpec(plain, method)])
    with pytest.raises(UserError, match=f"{plain} does not take --base_keep_rate"):
        benchmark.check_method_flags([ModelSpec(plain, method, explicit=("base_keep_rate",))])


def test_bad_input_exits_2(caplog):
    with caplog.at_level(logging.ERROR):
        assert benchmark.main(["--model", "deit_smal_patch16_224", "--flops-only"]) == 2
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(messages) == 1 and "\n" not in messages[0] and "deit_small_patch16_224" in messages[0]
    assert benchmark.main(["--compare", "test_vit", "test_vit --keep 3"]) == 2


@pytest.mark.slow
def test_cli_bad_model_one_line_status_2():
    proc = subprocess.run([sys.executable, "benchmark.py", "--model", "deit_smal_patch16_224", "--flops-only"],
                          capture_output=True, text=True, cwd=benchmark.__file__.rsplit("/", 1)[0], timeout=300)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "did you mean" in errors[0]


class OOMAbove(nn.Module):
    """Raises torch.OutOfMemoryError for batches larger than `limit`."""

    in_chans = 3
    num_classes = 4

    def __init__(self, limit):
        super().__init__()
        self.limit = limit
        self.head = nn.Linear(3, 4)
        self.batches_seen = []

    def forward(self, x):
        self.batches_seen.append(x.shape[0])
        if x.shape[0] > self.limit:
            raise torch.OutOfMemoryError(f"fake: batch {x.shape[0]} > {self.limit}")
        return self.head(x.mean((2, 3)))


def test_backoff_halves_until_it_fits():
    model = OOMAbove(limit=5)
    timed = lambda b: measure.measure_inference(model, b, 8, "cpu", warmup=1, rounds=1, iters_per_round=1)  # noqa: E731
    result, used, failed = measure.run_with_backoff(timed, 32)
    assert used == 4 and failed == [32, 16, 8] and result["batch_size"] == 4
    assert set(model.batches_seen) == {32, 16, 8, 4}

    with pytest.raises(torch.OutOfMemoryError):
        measure.run_with_backoff(timed, 32, enabled=False)
    with pytest.raises(torch.OutOfMemoryError):
        measure.run_with_backoff(lambda b: measure.measure_inference(
            OOMAbove(limit=0), b, 8, "cpu", warmup=1, rounds=1, iters_per_round=1), 4)

    calls = []

    def broken(batch):
        calls.append(batch)
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        measure.run_with_backoff(broken, 32)
    assert calls == [32]  # other errors are not retried


def test_backoff_is_recorded(monkeypatch, tmp_path):
    monkeypatch.setattr(benchmark, "build_model", lambda spec, num_classes, img_size: (OOMAbove(limit=3), {}))
    out = tmp_path / "o.jsonl"
    args = benchmark.build_parser().parse_args(["--img-size", "8", "--batch-size", "16", "--warmup", "1",
                                                "--rounds", "1", "--iters-per-round", "1", "--no-flops",
                                                "--output", str(out)])
    spec = ModelSpec("fake_oom", {dest: None for dest in benchmark.method_dests()})
    env = measure.environment_info("cpu")
    (record,) = benchmark.run_sweep(args, [spec], torch.device("cpu"), env, None)
    assert record["batch_size_requested"] == 16 and record["batch_size"] == 2 and record["oom_backoff"] == [16, 8, 4]
    assert read_jsonl(out)[0]["oom_backoff"] == [16, 8, 4]
    assert "[16, 8, 4]" in bench_records.format_table([record])


def tiny_net():
    return nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.Flatten(), nn.Linear(8 * 2 * 2, 5))


def test_bf16_autocast_is_active_on_cpu():
    model = tiny_net()
    dtypes = []
    model[2].register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    result = measure.measure_inference(model, 2, 8, "cpu", precision="bf16", warmup=1, rounds=1, iters_per_round=1)
    assert result["autocast_dtype"] == "bfloat16" and set(dtypes) == {torch.bfloat16}
    dtypes.clear()
    measure.measure_inference(model, 2, 8, "cpu", precision="fp32", warmup=1, rounds=1, iters_per_round=1)
    assert set(dtypes) == {torch.float32}
    assert measure.autocast_dtype("amp", torch.device("cpu")) == torch.bfloat16
    assert measure.autocast_dtype("amp", torch.device("cuda")) == torch.float16


def test_train_step_updates_weights():
    model = tiny_net()
    before = model[2].weight.detach().clone()
    result = measure.measure_train_step(model, 4, 8, "cpu", warmup=1, rounds=2, iters_per_round=1)
    assert result["mode"] == "train" and result["throughput"]["n"] == 2
    assert not torch.equal(before, model[2].weight.detach())
    assert model.training


def test_training_loss_handles_tuple_and_dict_outputs():
    logits, target = torch.randn(3, 5), torch.tensor([0, 1, 2])
    single = measure.training_loss(logits, target)
    assert measure.training_loss((logits, logits), target) == pytest.approx(2 * single.item())
    aux = torch.tensor(0.5)
    assert measure.training_loss({"logits": logits, "aux_loss": aux}, target) == pytest.approx(single.item() + 0.5)


def test_summarize():
    stats = measure.summarize([5.0, 1.0, 4.0, 2.0, 3.0])
    assert (stats["median"], stats["q1"], stats["q3"], stats["iqr"], stats["min"], stats["max"]) == (3, 2, 4, 2, 1, 5)
    assert measure.summarize([7.0])["iqr"] == 0


def test_peak_and_achieved_gflops():
    peak = measure.measure_peak_gflops("cpu", size=128, repeats=2)
    assert peak["peak_gflops"] > 0 and peak["peak_matmul_size"] == 128
    spec = ModelSpec("m", {})
    record = bench_records.make_record("speed", spec, {}, {}, {}, {"gmacs": 2.0, "counter": "fvcore"}, None,
                                   {"mode": "infer", "throughput": {"median": 100.0}}, {"peak_gflops": 800.0})
    assert record["achieved_gflops"] == pytest.approx(400.0)  # 2 * 2 GMACs * 100 img/s
    assert record["pct_of_peak"] == pytest.approx(50.0)


METHOD_ARGV = [
    ["--base_keep_rate", "0.7"], ["--drop_loc", "(3, 6, 9)"], ["--fuse_token"], ["--prune_layer", "[0,2,4,6]"],
    ["--done_layer", "[0,2,4]"], ["--compression-ratio", "0.8"], ["--tome-r", "13"], ["--tome-start-idx", "1"],
    ["--no-tome-prop-attn"],
]


@pytest.mark.parametrize("argv", METHOD_ARGV, ids=[a[0] for a in METHOD_ARGV])
def test_method_flags_parse_like_main(argv):
    """The benchmark's method-flag group must read every flag exactly as main.py does."""
    main = pytest.importorskip("main")
    ours, _ = benchmark.add_method_args(benchmark.argparse.ArgumentParser()).parse_known_args(argv)
    theirs, _ = main.get_args_parser().parse_known_args(argv)
    dest = next(d for d in benchmark.method_dests() if getattr(ours, d) is not None)
    assert getattr(ours, dest) == getattr(theirs, dest)
    assert type(getattr(ours, dest)) is type(getattr(theirs, dest))


@pytest.mark.slow
def test_compare_baseline_reports_each_model_against_it(tmp_path, capsys):
    out = tmp_path / "b.jsonl"
    argv = ["--compare-baseline", "test_vit", "--model", "test_vit", "test_vit2", *TINY, "--rounds", "2",
            "--no-flops", "--output", str(out)]
    assert benchmark.main(argv) == 0
    records = read_jsonl(out)
    assert [(r["label_a"], r["label_b"]) for r in records] == [("test_vit", "test_vit"), ("test_vit", "test_vit2")]
    assert all(r["ratio"]["of_medians"] > 0 for r in records)
    assert capsys.readouterr().out.count("throughput ratio B/A") == 2


def test_models_file_specs(tmp_path):
    path = tmp_path / "models.txt"
    path.write_text("# sweep\ndeit_small_patch16_224\ndeit_tiny_patch16_224 --tome-r 8  # merged\n\ndeit_t*\n")
    defaults = {dest: None for dest in benchmark.method_dests()}
    specs = benchmark.read_models_file(str(path), defaults)
    assert [s.name for s in specs][:2] == ["deit_small_patch16_224", "deit_tiny_patch16_224"]
    assert specs[1].method["tome_r"] == 8 and specs[0].method["tome_r"] is None
    assert all(s.name.startswith("deit_t") for s in specs[2:]) and len(specs) > 2
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(UserError, match="names no model"):
        benchmark.read_models_file(str(tmp_path / "empty.txt"), defaults)


def test_bad_flags_exit_2_with_one_line(caplog):
    for argv in (["--model", "test_vit", "--precision", "fp8"], ["--model", "test_vit", "--drop_loc", "x"],
                 ["--model", "test_vit", "--no-such-flag"]):
        caplog.clear()
        with caplog.at_level(logging.ERROR):
            assert benchmark.main(argv) == 2
        messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(messages) == 1 and "\n" not in messages[0]


def test_flops_only_plot_has_a_point_per_model(tmp_path, caplog):
    """The README line `--flops-only --plot speed.png` once wrote an empty plot and exited 0."""
    plot = tmp_path / "speed.png"
    with caplog.at_level(logging.INFO):
        assert benchmark.main(["--model", "test_vit", "test_vit2", "--img-size", "32", "--flops-only",
                               "--counter", "fvcore", "--plot", str(plot)]) == 0
    assert f"wrote {plot} (2 points)" in caplog.text
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_plot_without_points_is_never_written(tmp_path):
    plot = tmp_path / "p.png"
    speed_without_gmacs = {"kind": "speed", "label": "m", "gmacs": None, "throughput": {"median": 10.0}}
    for records, reason in (([], "no run was recorded"), ([speed_without_gmacs], "GMACs were not counted"),
                            ([{"kind": "speed", "label": "m", "error": "OOM"}], "every run failed")):
        with pytest.raises(UserError, match=reason):
            bench_records.plot_throughput_vs_gmacs(records, str(plot))
    with pytest.raises(UserError, match="nothing plotted"):
        bench_records.plot_throughput_vs_gmacs([{"kind": "flops", "label": "m", "gmacs": None, "params": 5}], str(plot))
    assert not plot.exists()


@pytest.mark.parametrize("argv, words", [
    (["--no-flops", "--plot", "{tmp}/p.png"], ["--plot", "--no-flops"]),
    (["--plot", "/missing/dir/p.png"], ["--plot /missing/dir/p.png", "/missing/dir"]),
])
def test_impossible_plot_is_refused_before_measuring(argv, words, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(benchmark, "run_sweep", lambda *a, **k: pytest.fail("measured before refusing --plot"))
    with caplog.at_level(logging.ERROR):
        code = benchmark.main(["--model", "test_vit", *[a.replace("{tmp}", str(tmp_path)) for a in argv]])
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert code == 2 and len(messages) == 1 and "\n" not in messages[0]
    assert all(word in messages[0] for word in words), messages[0]
    assert not (tmp_path / "p.png").exists()


TINY_KWARGS = "{'depth': 2, 'embed_dim': 32, 'num_heads': 2}"


def test_model_kwargs_for_the_run_and_per_models_file_line(tmp_path):
    models_file = tmp_path / "models.txt"
    models_file.write_text("deit_tiny_patch16_224 --tome-r 2\n"
                           "deit_tiny_patch16_224 --model-kwargs \"{'depth': 3, 'embed_dim': 32, 'num_heads': 2}\"\n")
    out = tmp_path / "r.jsonl"
    code = benchmark.main(["--models-file", str(models_file), "--model-kwargs", TINY_KWARGS, "--img-size", "64",
                           "--flops-only", "--counter", "fvcore", "--output", str(out)])
    assert code == 0
    first, second = [json.loads(line) for line in out.read_text().splitlines()]
    assert first["model_kwargs"]["depth"] == 2 and first["model_kwargs"]["tome_r"] == 2  # the run's kwargs
    assert second["model_kwargs"]["depth"] == 3  # the line's own kwargs win
    assert "depth=3" in second["label"] and second["params"] > first["params"]
    assert first["tokens_per_block"] == [15, 13] and second["tokens_per_block"] == [17, 17, 17]  # 64 px / 16 + cls


@pytest.mark.parametrize("argv, words", [
    (["--model-kwargs", "[1]"], "is not a dict"),
    (["--model-kwargs", "{'depthx': 2}"], "unexpected keyword argument 'depthx'"),
])
def test_bad_model_kwargs_is_one_line(argv, words, caplog):
    with caplog.at_level(logging.ERROR):
        code = benchmark.main(["--model", "deit_tiny_patch16_224", "--img-size", "64", "--flops-only", *argv])
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert code != 0 and len(errors) == 1 and words in errors[0] and "\n" not in errors[0]


def test_records_carry_the_methods_own_flop_count(tmp_path):
    """A family's `official_flops` (PiToMe's analytic formula) is recorded beside fvcore's count."""
    from models import pitome
    import timm
    out = tmp_path / "r.jsonl"
    assert benchmark.main(["--model", "deit_tiny_patch16_224", "--pitome-ratio", "0.9", "--img-size", "64",
                           "--flops-only", "--counter", "fvcore", "--output", str(out)]) == 0
    record = json.loads(out.read_text())
    model = pitome.patch(timm.create_model("deit_tiny_patch16_224", img_size=64), ratio=0.9)
    assert record["official_flops"] == {"pitome_official_gflops": pytest.approx(pitome.official_gflops(model, (64, 64)))}
    plain = tmp_path / "plain.jsonl"
    assert benchmark.main(["--model", "deit_tiny_patch16_224", "--img-size", "64", "--flops-only", "--counter",
                           "fvcore", "--output", str(plain)]) == 0
    assert json.loads(plain.read_text())["official_flops"] is None
