"""`--target-gmacs G` with a reduction flag set to `auto`, for every family that has one.

The search helpers of `models/family.py` on known GMACs functions (closest value, the
unreachable targets); every method (EViT keep rate, ToMe r, ToFu r, LTM compression ratio,
LTMP threshold once its family declares a reduction) through `benchmark.main` (the record
names the target and the chosen value) and through `main.cli` (a synthetic training run
logs the value and trains with it); bad input as one line and exit status 2.

Targets are fractions of the unreduced model's GMACs measured here, never absolute numbers:
tiny models have tiny GMACs.
"""
import json
import logging
import math
import shlex

import pytest
import yaml

import benchmark
from utils import bench_records
from models import flops
import main
import models  # noqa: F401  (registers the families)
from models import family as families
from models import ltm
from models.errors import ModelConfigError
from models.factory import create_model

IMG = 64
TINY_VIT = {"depth": 4, "embed_dim": 32, "num_heads": 2, "patch_size": 8}  # 65 tokens at 64 px
TOLERANCE = 0.01  # the 1 %; the tiny models below reach it at the fractions used

# method -> (model, extra flags, the reduction flag, its unreduced value, model kwargs for main.py)
METHODS = {
    "evit": ("deit_tiny_patch16_shrink_base", ["--drop_loc", "(1, 2)", "--fuse_token"], "base_keep_rate", 1.0),
    "tome": ("deit_tiny_patch16_224", [], "tome_r", 0),
    "tofu": ("deit_tiny_patch16_224", ["--tofu-mlerp", "paper"], "tofu_r", 0),
    "ltm": ("ltm_vit_small_patch16_224", [], "compression_ratio", 1.0),
}


def _ltmp_reduction():
    try:
        family = families.get_family("ltmp")
    except KeyError:
        return None
    return family.reduction


if _ltmp_reduction() is not None:  # `--ltmp-threshold auto` on the inference models
    METHODS["ltmp"] = ("inference_ltmp_deit_tiny_patch16_224", [], _ltmp_reduction().dest, 0.0)


def flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def method_options(method: str, value) -> dict:
    name, extra, dest, _ = METHODS[method]
    options = {dest: value}
    if method == "evit":
        options.update(drop_loc=(1, 2), fuse_token=True)
    return options


def tiny_gmacs(method: str, value, model_kwargs=TINY_VIT, num_classes: int = 10) -> float:
    name = METHODS[method][0]
    model = create_model(name, options=method_options(method, value), num_classes=num_classes, img_size=IMG,
                         model_kwargs=model_kwargs)
    return flops.count_flops(model, (IMG, IMG), counter="fvcore")["gmacs"]


def _ltm_grid_ratios(model_kwargs) -> list:
    """One compression ratio per distinct merged grid LTM can build at IMG px (its granularity)."""
    patch = (model_kwargs or {}).get("patch_size", 16)
    side = IMG // patch
    ratios = {}
    for step in range(50, 1001):
        ratios.setdefault(ltm.merged_grid(side, side, step / 1000), step / 1000)
    return sorted(ratios.values())


def assert_as_close_as_granularity_allows(method, gmacs, target, model_kwargs, num_classes) -> None:
    """Within 1 % of the target, or (LTM, whose merged grid moves in whole rows and columns) no
    setting the method can build comes closer."""
    if abs(gmacs - target) <= TOLERANCE * target:
        return
    if method == "ltmp":
        # one prune threshold for every block: a token pruned early leaves every later block, about
        # 1/16 of the model at 17 tokens; its GMACs depend on the input image, so the settings in
        # between cannot be enumerated here as LTM's are (the search's own bracket is 2^-24 wide)
        assert abs(gmacs - target) <= 0.05 * target, f"ltmp: {gmacs} GMACs is {100 * (gmacs / target - 1):+.2f}% off"
        return
    assert method == "ltm", f"{method}: {gmacs} GMACs is {100 * (gmacs / target - 1):+.2f}% off {target}"
    reachable = [tiny_gmacs(method, r, model_kwargs, num_classes) for r in _ltm_grid_ratios(model_kwargs)]
    assert abs(gmacs - target) <= min(abs(g - target) for g in reachable) + 1e-9


# ---------------------------------------------------------------- the search helpers

def _step(value: float) -> float:
    """A GMACs function with steps of 0.05 in the parameter (as token counts make it)."""
    return 1.0 + math.floor(value * 20) / 20


def test_search_continuous_returns_the_closest_step():
    for target in (1.12, 1.31, 1.5, 1.77, 1.98):
        value, gmacs = families.search_continuous(0.05, 1.0, lambda v: v, target, _step, decimals=3)
        grid = [_step(v / 1000) for v in range(50, 1001)]
        assert gmacs == pytest.approx(_step(value))
        assert abs(gmacs - target) == pytest.approx(min(abs(g - target) for g in grid))


def test_search_continuous_hits_a_smooth_target_within_its_decimals():
    value, gmacs = families.search_continuous(0.05, 1.0, lambda v: v, 0.4321, lambda v: v, decimals=4)
    assert abs(gmacs - 0.4321) <= 1e-4 and gmacs == value


def test_search_sequence_brackets_and_picks_the_closer():
    candidates = list(range(10))  # GMACs increase with the candidate
    for target in (0.2, 3.4, 3.6, 8.9):
        value, gmacs = families.search_sequence(candidates, lambda c: c, target, float)
        assert value == round(target) and gmacs == float(value)


@pytest.mark.parametrize("target, words", [(10.5, "above the unreduced model"), (-1.0, "below what the method")])
def test_unreachable_targets_are_one_line_errors(target, words):
    for search in (lambda: families.search_continuous(0.05, 1.0, lambda v: v, target, lambda v: 10 * v),
                   lambda: families.search_sequence(list(range(11)), lambda c: c, target, float)):
        with pytest.raises(ModelConfigError, match=words) as info:
            search()
        assert "\n" not in str(info.value) and "--target-gmacs" in str(info.value)


def _tome_like_gmacs(tokens: int, depth: int):
    """GMACs of a schedule: each block costs its input tokens (attention) plus its output
    tokens (MLP), with ToMe's clamp r <- min(r, T // 2)."""
    def gmacs_of(r):
        schedule = [r] * depth if isinstance(r, int) else list(r)
        t, total = tokens, 0.0
        for rj in schedule:
            out = t - min(rj, t // 2)
            total += 1e-3 * (t + 2 * out)
            t = out
        return total
    return gmacs_of


def _schedule_space(tokens: int, depth: int) -> list:
    """The schedules the search chooses from: constant r, the first k blocks at r + 1, and the first
    k blocks at r + 1 plus one more at a later block."""
    space = list(range(tokens // 2 + 1))
    for r in range(tokens // 2):
        for k in range(depth):
            for extra in range(k, depth):
                space.append([r + 1 if j < k or j == extra else r for j in range(depth)])
    return space


@pytest.mark.parametrize("tokens, depth", [(65, 4), (17, 12), (197, 12)])
def test_merge_schedule_is_the_closest_in_its_space(tokens, depth):
    gmacs_of = _tome_like_gmacs(tokens, depth)
    space = _schedule_space(tokens, depth)
    lowest, highest = gmacs_of(tokens // 2), gmacs_of(0)
    builds = []
    for fraction in (0.3, 0.45, 0.6, 0.75, 0.9, 0.97):
        target = lowest + fraction * (highest - lowest)
        value, gmacs = families.search_merge_schedule(lambda r: builds.append(r) or r, target, gmacs_of, depth,
                                                      tokens // 2)
        assert gmacs == pytest.approx(gmacs_of(value))
        assert abs(gmacs - target) == pytest.approx(min(abs(gmacs_of(v) - target) for v in space))
        assert isinstance(value, int) or (len(value) == depth and len(set(value)) == 2)
    assert len(builds) <= 6 * (2 * math.ceil(math.log2(tokens)) + 2 * math.ceil(math.log2(depth)) + 6)


def test_merge_schedule_moves_the_last_extra_merge_later():
    # 17 tokens, 12 blocks: one token merged in block 0 is ~8 % of the MACs; the first-k lists
    # alone miss a 1 % target, a later block's merge reaches it
    tokens, depth = 17, 12
    gmacs_of = _tome_like_gmacs(tokens, depth)
    first_k = [[1] * k + [0] * (depth - k) for k in range(depth + 1)]
    for fraction in (0.8, 0.85, 0.9, 0.95):
        target = fraction * gmacs_of(0)
        value, gmacs = families.search_merge_schedule(lambda r: r, target, gmacs_of, depth, tokens // 2)
        assert abs(gmacs - target) <= min(abs(gmacs_of(v) - target) for v in first_k)
        assert abs(gmacs - target) <= 0.01 * target


# ---------------------------------------------------------------- benchmark.py

def _benchmark_record(method: str, fraction: float, tmp_path):
    name, extra, dest, unreduced = METHODS[method]
    base = flops.count_flops(benchmark.build_model(
        benchmark.parse_spec(shlex.join([name, *extra, flag(dest), str(unreduced)]))[0], 1000, IMG)[0],
        (IMG, IMG), counter="fvcore")["gmacs"]
    target = fraction * base
    out = tmp_path / f"{method}.jsonl"
    code = benchmark.main(["--model", name, *extra, flag(dest), "auto", "--target-gmacs", f"{target:.6g}",
                           "--img-size", str(IMG), "--flops-only", "--counter", "fvcore", "--output", str(out)])
    assert code == 0
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    return record, dest, float(f"{target:.6g}"), base


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHODS))
def test_benchmark_record_names_target_and_chosen_value(method, tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        record, dest, target, base = _benchmark_record(method, 0.75, tmp_path)
    value = record["method_flags"][dest]
    assert value != families.AUTO and value is not None
    assert record["target_gmacs"]["target"] == pytest.approx(target)
    assert record["target_gmacs"]["value"] == value and record["target_gmacs"]["dest"] == dest
    assert_as_close_as_granularity_allows(method, record["gmacs"], target, None, 1000)
    assert record["gmacs"] < base
    assert any(f"{flag(dest)} {value}" in r.getMessage() for r in caplog.records)  # the choice is logged
    # the record's model is the one the chosen value builds (LTMP's GMACs depend on the random
    # weights and input image of the run, so a rebuild here counts another model)
    if method != "ltmp":
        spec = benchmark.ModelSpec(METHODS[method][0], dict(record["method_flags"]))
        again = flops.count_flops(benchmark.build_model(spec, 1000, IMG)[0], (IMG, IMG), counter="fvcore")["gmacs"]
        assert again == pytest.approx(record["gmacs"], rel=1e-9)


@pytest.mark.parametrize("fraction, words", [(1.2, "above the unreduced model"), (0.05, "below what the method")])
@pytest.mark.parametrize("method", ["tome", "evit"])
def test_benchmark_unreachable_target_exits_2(method, fraction, words, caplog):
    name, extra, dest, unreduced = METHODS[method]
    base = tiny_gmacs(method, unreduced, model_kwargs=None, num_classes=1000)
    with caplog.at_level(logging.ERROR):
        code = benchmark.main(["--model", name, *extra, flag(dest), "auto", "--target-gmacs", str(fraction * base),
                               "--img-size", str(IMG), "--flops-only", "--counter", "fvcore"])
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert code == 2 and len(errors) == 1 and words in errors[0] and "\n" not in errors[0]


def test_benchmark_auto_without_target_exits_2(caplog):
    with caplog.at_level(logging.ERROR):
        code = benchmark.main(["--model", "deit_tiny_patch16_224", "--tome-r", "auto", "--img-size", str(IMG),
                               "--flops-only"])
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert code == 2 and len(errors) == 1 and "needs --target-gmacs" in errors[0]


@pytest.mark.parametrize("patch", ["--tome-r", "--tofu-r"])
def test_benchmark_merging_on_an_unsupported_family_exits_2(patch, caplog):
    with caplog.at_level(logging.ERROR):
        code = benchmark.main(["--model", "resnet18", patch, "auto", "--target-gmacs", "1.0", "--img-size", "64",
                               "--flops-only", *(["--tofu-mlerp", "paper"] if patch == "--tofu-r" else [])])
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert code == 2 and len(errors) == 1 and "\n" not in errors[0]
    assert "resnet18" in errors[0] and "do not support ResNet" in errors[0] and "supported families" in errors[0]


# ---------------------------------------------------------------- main.py

TRAIN = ["--data-set", "SYNTHETIC", "--synthetic-train-size", "8", "--synthetic-val-size", "4", "--device", "cpu",
         "--batch-size", "4", "--num_workers", "0", "--epochs", "1", "--print-freq", "0", "--mixup", "0",
         "--cutmix", "0", "--aa", "none", "--reprob", "0", "--no-model-ema", "--warmup-epochs", "0",
         "--input-size", str(IMG), "--model-kwargs", repr(TINY_VIT)]


def _main_argv(method: str, target, output_dir) -> list:
    name, extra, dest, _ = METHODS[method]
    argv = ["--model", name, *extra, flag(dest), "auto", *TRAIN, "--output_dir", str(output_dir)]
    if method == "ltmp":
        argv += ["--ltmp-flops-images", "0"]
    return argv + (["--target-gmacs", f"{target:.6g}"] if target is not None else [])


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHODS))
def test_main_trains_with_the_chosen_value(method, tmp_path, caplog):
    _, _, dest, unreduced = METHODS[method]
    base = tiny_gmacs(method, unreduced)
    target = float(f"{0.75 * base:.6g}")
    with caplog.at_level(logging.INFO):
        assert main.cli(_main_argv(method, target, tmp_path)) == 0
    chosen = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"--target-gmacs {target:g}:")]
    assert len(chosen) == 1, [r.getMessage() for r in caplog.records][-20:]
    lines = [json.loads(line) for line in (tmp_path / "log.txt").read_text().splitlines()]
    epochs = [line for line in lines if "epoch" in line]  # a family's end-of-training report comes after
    result = epochs[-1]["target_gmacs"]
    assert result["dest"] == dest and f"{flag(dest)} {result['value']} gives" in chosen[0]
    assert_as_close_as_granularity_allows(method, result["gmacs"], target, TINY_VIT, 10)
    assert epochs[-1]["epoch"] == 0 and math.isfinite(epochs[-1]["train_loss"])
    # trained with it: args.yaml (the run's resolved options) holds the value, and the model it
    # describes has the recorded GMACs
    saved = yaml.safe_load((tmp_path / "args.yaml").read_text())
    assert saved[dest] == result["value"]
    if method != "ltmp":  # LTMP's GMACs depend on the run's random weights and input image
        assert tiny_gmacs(method, saved[dest]) == pytest.approx(result["gmacs"], rel=1e-9)
    state = epochs[-1].get("method") or {}
    if method == "tome":
        value = result["value"]
        assert state["tome_r"] == pytest.approx(value if isinstance(value, int) else sum(value) / len(value))


def _main_error(argv, caplog) -> tuple:
    with caplog.at_level(logging.ERROR):
        code = main.cli(argv)
    return code, [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("fraction, words", [(1.2, "above the unreduced model"), (0.05, "below what the method")])
@pytest.mark.parametrize("method", ["tome", "ltm"])
def test_main_unreachable_target_exits_2(method, fraction, words, tmp_path, caplog):
    base = tiny_gmacs(method, METHODS[method][3])
    code, errors = _main_error(_main_argv(method, fraction * base, tmp_path), caplog)
    assert code == 2 and len(errors) == 1 and words in errors[0] and "\n" not in errors[0]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_main_auto_without_target_exits_2(method, tmp_path, caplog):
    code, errors = _main_error(_main_argv(method, None, tmp_path), caplog)
    dest = METHODS[method][2]
    assert code == 2 and errors == [f"{flag(dest)} auto needs --target-gmacs G"]


@pytest.mark.parametrize("patch", ["--tome-r", "--tofu-r"])
def test_main_merging_on_an_unsupported_family_exits_2(patch, tmp_path, caplog):
    argv = ["--model", "resnet18", patch, "auto", "--target-gmacs", "0.1", *TRAIN[:-2], "--output_dir", str(tmp_path)]
    code, errors = _main_error(argv, caplog)
    assert code == 2 and len(errors) == 1 and "\n" not in errors[0]
    assert "do not support ResNet" in errors[0] and "supported families" in errors[0]
    caplog.clear()
    code, errors = _main_error(argv[:3] + ["2"] + argv[6:], caplog)  # a fixed r: the same line
    assert code == 2 and len(errors) == 1 and "do not support ResNet" in errors[0]


def test_main_target_without_auto_exits_2(tmp_path, caplog):
    code, errors = _main_error(["--model", "deit_tiny_patch16_224", "--target-gmacs", "1.0", *TRAIN,
                                "--output_dir", str(tmp_path)], caplog)
    assert code == 2 and len(errors) == 1 and "needs one reduction flag set to auto" in errors[0]


@pytest.mark.parametrize("kwargs", [{"merge_threshold": 1.5}, {"prune_threshold": -0.2}])
def test_ltmp_thresholds_outside_their_range_exit_2(kwargs, tmp_path, caplog):
    argv = ["--model", "inference_ltmp_deit_tiny_patch16_224", *TRAIN[:-2],
            "--model-kwargs", repr(dict(TINY_VIT, **kwargs)), "--output_dir", str(tmp_path)]
    code, errors = _main_error(argv, caplog)
    assert code == 2 and len(errors) == 1 and "[0, 1]" in errors[0] and "\n" not in errors[0]


@pytest.mark.skipif(_ltmp_reduction() is None, reason="the LTMP family declares no reduction flag yet")
@pytest.mark.parametrize("value", ["1.5", "-0.2"])
def test_ltmp_threshold_flag_outside_its_range_exits_2(value, tmp_path, caplog):
    dest = flag(_ltmp_reduction().dest)
    code, errors = _main_error(["--model", METHODS["ltmp"][0], dest, value, *TRAIN,
                                "--output_dir", str(tmp_path)], caplog)
    assert code == 2 and len(errors) == 1 and "\n" not in errors[0]
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        code = benchmark.main(["--model", METHODS["ltmp"][0], dest, value, "--flops-only", "--img-size", str(IMG)])
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert code == 2 and len(errors) == 1 and "\n" not in errors[0]


# ---------------------------------------------------------------- benchmark.py sweeps over targets

def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_several_targets_give_one_record_each_on_one_series(tmp_path):
    base = flops.count_flops(create_model("deit_tiny_patch16_224", img_size=32), (32, 32), counter="fvcore")["gmacs"]
    targets = [f"{0.9 * base:.6g}", f"{0.8 * base:.6g}"]
    out = tmp_path / "sweep.jsonl"
    assert benchmark.main(["--model", "deit_tiny_patch16_224", "--tome-r", "auto", "--target-gmacs", *targets,
                           "--img-size", "32", "--flops-only", "--counter", "fvcore", "--output", str(out)]) == 0
    records = _records(out)
    assert [r["target_gmacs"]["target"] for r in records] == [float(t) for t in targets]
    assert {r["series"] for r in records} == {"deit_tiny_patch16_224 tome_r=auto"}
    assert records[0]["gmacs"] > records[1]["gmacs"]
    assert all(r["method_flags"]["tome_r"] == r["target_gmacs"]["value"] for r in records)


@pytest.mark.slow
def test_models_file_lines_carry_their_own_size_and_target(tmp_path):
    base = flops.count_flops(create_model("deit_tiny_patch16_224", img_size=32), (32, 32), counter="fvcore")["gmacs"]
    spec_file = tmp_path / "specs.txt"
    spec_file.write_text(f"deit_tiny_patch16_224 --img-size 32\n"
                         f"deit_tiny_patch16_224 --tome-r auto --target-gmacs {0.85 * base:.6g} --img-size 32\n"
                         f"deit_tiny_patch16_224 --img-size 48\n")
    out = tmp_path / "specs.jsonl"
    assert benchmark.main(["--models-file", str(spec_file), "--flops-only", "--counter", "fvcore",
                           "--output", str(out)]) == 0
    plain32, merged, plain48 = _records(out)
    assert plain32["img_size"] == [32, 32] and plain48["img_size"] == [48, 48] and plain32["gmacs"] == pytest.approx(base)
    assert plain32["target_gmacs"] is None and merged["target_gmacs"]["target"] == pytest.approx(0.85 * base, rel=1e-5)
    assert merged["img_size"] == [32, 32] and merged["gmacs"] < base


@pytest.mark.parametrize("line, words", [
    ("deit_tiny_patch16_224 --target-gmacs 0.01", "needs a reduction flag set to auto"),
    ("deit_tiny_patch16_224 --tome-r auto --target-gmacs -1", "must be > 0"),
    ("deit_tiny_patch16_224 --img-size", "needs a value"),
    ("deit_tiny_patch16_224 --img-size big", "is not a int"),
])
def test_bad_spec_settings_exit_2(line, words, tmp_path, caplog):
    spec_file = tmp_path / "specs.txt"
    spec_file.write_text(line + "\n")
    with caplog.at_level(logging.ERROR):
        code = benchmark.main(["--models-file", str(spec_file), "--flops-only"])
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert code == 2 and len(errors) == 1 and words in errors[0]


def test_target_without_an_auto_spec_exits_2(caplog):
    with caplog.at_level(logging.ERROR):
        code = benchmark.main(["--model", "deit_tiny_patch16_224", "--target-gmacs", "1.0", "--flops-only"])
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert code == 2 and len(errors) == 1 and "needs a model spec with a reduction flag set to auto" in errors[0]


def _speed_record(series, label, gmacs, median, value=None):
    return {"kind": "speed", "mode": "infer", "label": label, "series": series, "gmacs": gmacs,
            "throughput": {"median": median, "q1": 0.9 * median, "q3": 1.1 * median},
            "target_gmacs": {"value": value} if value is not None else None, "flops_counter": "fvcore",
            "device_name": "cpu", "precision": "fp32", "batch_size": 32}


def test_plot_draws_one_line_per_series(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.axes import Axes

    drawn = []
    original = Axes.errorbar
    monkeypatch.setattr(Axes, "errorbar", lambda self, x, y, *a, **k: drawn.append((tuple(x), k.get("label")))
                        or original(self, x, y, *a, **k))
    records = [_speed_record("deit tome_r=auto", f"deit tome_r={r}", g, t, r)
               for r, g, t in ((8, 3.5, 20.0), (16, 2.6, 28.0), (12, 3.0, 24.0))]
    records.append(_speed_record("deit", "deit", 4.6, 16.0))
    path = tmp_path / "plot.png"
    assert bench_records.plot_throughput_vs_gmacs(records, str(path)) == 4
    assert path.stat().st_size > 0
    assert set(drawn) == {((2.6, 3.0, 3.5), "deit tome_r=auto (infer)"), ((4.6,), "deit (infer)")}
    assert len(drawn) == 2


@pytest.mark.slow
def test_compare_baseline_runs_every_target_and_plots_one_line(tmp_path):
    base = flops.count_flops(create_model("deit_tiny_patch16_224", img_size=32), (32, 32), counter="fvcore")["gmacs"]
    spec_file = tmp_path / "specs.txt"
    spec_file.write_text("deit_tiny_patch16_224 --tome-r auto\n")
    out, plot = tmp_path / "compare.jsonl", tmp_path / "compare.png"
    assert benchmark.main(["--compare-baseline", "deit_tiny_patch16_224", "--models-file", str(spec_file),
                           "--target-gmacs", f"{0.9 * base:.6g}", f"{0.8 * base:.6g}", "--img-size", "32", "-b", "1",
                           "--warmup", "0", "--rounds", "1", "--iters-per-round", "1", "--counter", "fvcore",
                           "--output", str(out), "--plot", str(plot)]) == 0
    records = _records(out)
    assert [r["kind"] for r in records] == ["compare", "compare"]
    assert [r["target_gmacs"]["target"] for r in records] == [float(f"{0.9 * base:.6g}"), float(f"{0.8 * base:.6g}")]
    assert {r["series"] for r in records} == {"deit_tiny_patch16_224 tome_r=auto"}
    assert all(r["a"]["label"] == "deit_tiny_patch16_224" and r["ratio"]["of_medians"] > 0 for r in records)
    assert all(r["method_flags"]["tome_r"] == r["target_gmacs"]["value"] != "auto" for r in records)
    assert all(r["label_b"] == r["b"]["label"] == r["label"] and "auto" not in r["label"] for r in records)
    assert plot.stat().st_size > 0
