"""Redraw the equal-FLOPs plot from benchmark.py's JSON-lines records, without measuring again.

    python -m tools.plot_equal_flops benchmarks/equal_flops.jsonl benchmarks/equal_flops.png
    python -m tools.plot_equal_flops benchmarks/equal_flops.jsonl benchmarks/equal_flops.png --table

The records come from `benchmark.py --compare-baseline deit_small_patch16_224 --models-file
benchmarks/equal_flops.txt --target-gmacs ... --output FILE` (docs/measurements.md). Each
curve is one method (named from the flag that `--target-gmacs` solved: EViT, ToMe, ToFu, LTMP,
LTM, ...), drawn against GMACs. With `--compare-baseline` records the y axis is the speedup
over the baseline measured in the same interleaved rounds (median of the paired rounds, bars
from the slowest to the fastest round), so the unreduced model is the reference line at 1.0
and its own point sits at its GMACs; records of plain timed runs plot images/s (bars: IQR)
with the unreduced model's rate as the reference line. The legend sits outside the axes and
the settings the search chose (keep rate, r lists, thresholds) go to the table that
`--table` prints, not onto the points.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Dict, List, Optional, Sequence, Tuple

from utils.errors import UserError

_logger = logging.getLogger(__name__)

# The flag `--target-gmacs` solves (the family's Reduction dest) -> the method's name.
METHOD_NAMES: Dict[str, str] = {
    "base_keep_rate": "EViT",
    "tome_r": "ToMe",
    "tofu_r": "ToFu",
    "ltmp_threshold": "LTMP",
    "compression_ratio": "LTM",
    "base_rate": "DynamicViT",
    "diffrate_flops": "DiffRate (shipped schedules)",
    "mctf_r": "MCTF",
    "ats_num_tokens": "ATS",
    "pitome_ratio": "PiToMe",
}
# One flag shared by several methods (TokenReduction's --keep_rate): the method is the model's prefix.
MODEL_PREFIX_NAMES: Dict[str, str] = {"topk": "Top-K", "kmedoids": "K-Medoids", "dpcknn": "DPC-KNN",
                                      "sinkhorn": "Sinkhorn", "patchmerger": "PatchMerger"}
# How each solved value reads in the table.
SETTING_NAMES: Dict[str, str] = {
    "base_keep_rate": "keep rate",
    "tome_r": "r",
    "tofu_r": "r",
    "ltmp_threshold": "prune threshold P",
    "compression_ratio": "ratio",
    "base_rate": "rho",
    "diffrate_flops": "schedule (GFLOPs)",
    "mctf_r": "r",
    "ats_num_tokens": "tokens K",
    "pitome_ratio": "ratio",
    "keep_rate": "keep rate",
}
BASELINE_NAMES: Dict[str, str] = {"deit_small_patch16_224": "DeiT-S", "deit_tiny_patch16_224": "DeiT-Ti",
                                  "deit_base_patch16_224": "DeiT-B"}


def read_records(path: str) -> List[dict]:
    """The JSON-lines records of `path` that have GMACs and a speed (failed runs are skipped)."""
    try:
        with open(path) as handle:
            lines = [line for line in handle if line.strip()]
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror}; pass benchmark.py's --output file") from None
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"{path} line {number} is not JSON; pass benchmark.py's --output file") from None
        if record.get("error") or record.get("gmacs") is None or not (record.get("throughput") or {}).get("median"):
            continue
        records.append(record)
    if not records:
        raise UserError(f"{path} has no run with both GMACs and a throughput; nothing to plot")
    return records


def solved_dest(record: dict) -> Optional[str]:
    """The flag `--target-gmacs` chose a value for, or the first method flag set, or None."""
    target = record.get("target_gmacs") or {}
    if target.get("dest"):
        return target["dest"]
    flags = {k: v for k, v in (record.get("method_flags") or {}).items() if v not in (None, False)}
    return next(iter(flags), None)


def method_name(record: dict) -> str:
    """A reader's name for the record's method: 'EViT (fused)', 'ToMe', 'ToFu (MLERP)', or the
    baseline's short name for an unreduced model."""
    dest = solved_dest(record)
    if dest is None:
        return BASELINE_NAMES.get(record["model"], record["model"])
    prefix = MODEL_PREFIX_NAMES.get(record["model"].split("_", 1)[0])
    name = prefix or METHOD_NAMES.get(dest) or _family_name(dest) or record.get("series") or record["label"]
    flags = record.get("method_flags") or {}
    if dest == "base_keep_rate":
        name += " (fused)" if flags.get("fuse_token") else " (pruned)"
    elif dest == "tofu_r" and flags.get("tofu_mlerp"):
        name += " (MLERP)"
    elif dest == "ltmp_threshold" and record["model"].startswith("inference_"):
        name += " (inference)"
    return name


def _family_name(dest: str) -> Optional[str]:
    """A method not in METHOD_NAMES: the short title of the registered family that declares `dest`."""
    try:
        from models import family
    except ImportError:
        return None
    for fam in family.families():
        if any(flag.dest == dest for flag in fam.flags):
            return fam.title.split(":")[0].strip()
    return None


def setting(record: dict) -> str:
    """The value the search chose, as the table shows it ('keep rate 0.804', 'r = [8,8,7]')."""
    dest = solved_dest(record)
    if dest is None:
        return "-"
    value = (record.get("target_gmacs") or {}).get("value", (record.get("method_flags") or {}).get(dest))
    if isinstance(value, list):
        text = "[" + ",".join(str(v) for v in value) + "]"
    elif isinstance(value, float):
        text = f"{value:.3g}"
    else:
        text = str(value)
    name = SETTING_NAMES.get(dest, dest)
    return f"{name} = {text}" if name in ("r", "prune threshold P") else f"{name} {text}"


def is_baseline(record: dict) -> bool:
    """The unreduced model: a --compare-baseline run against itself, or a run with no method flag."""
    if record.get("kind") == "compare":
        return record.get("label_a") == record.get("label_b")
    return solved_dest(record) is None


def curves(records: Sequence[dict]) -> Dict[str, List[dict]]:
    """Method name -> its records sorted by GMACs (the baseline is left out), in first-seen order."""
    groups: Dict[str, List[dict]] = {}
    for record in records:
        if not is_baseline(record):
            groups.setdefault(method_name(record), []).append(record)
    return {name: sorted(group, key=lambda r: r["gmacs"]) for name, group in groups.items()}


def _y(record: dict, paired: bool) -> Tuple[float, float, float]:
    """(value, lower error, upper error) for the plot."""
    if paired:
        ratio = record["ratio"]
        return ratio["median"], ratio["median"] - ratio["min"], ratio["max"] - ratio["median"]
    speed = record["throughput"]
    return speed["median"], speed["median"] - speed["q1"], speed["q3"] - speed["median"]


def plot(records: Sequence[dict], path: str) -> List[str]:
    """Draw the equal-FLOPs plot into `path` (PNG); returns the curves' names, the reference last."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paired = all(r.get("kind") == "compare" and r.get("ratio") for r in records)
    baselines = [r for r in records if is_baseline(r)]
    groups = curves(records)
    if not groups:
        raise UserError("the records hold no token-method run (only the baseline); nothing to plot")
    reference = baselines[0] if baselines else None
    ref_name = (BASELINE_NAMES.get(reference["model"], reference["model"]) if reference
                else BASELINE_NAMES.get(records[0].get("label_a", ""), records[0].get("label_a", "baseline")))

    fig, ax = plt.subplots(figsize=(8.5, 5))
    colours = plt.get_cmap("tab20").colors
    markers = "osD^vP*Xh<>p"  # with 20 colours, no two of up to 60 curves look alike
    labels = []
    for index, (name, group) in enumerate(groups.items()):
        values = [_y(r, paired) for r in group]
        ax.errorbar([r["gmacs"] for r in group], [v[0] for v in values],
                    yerr=[[v[1] for v in values], [v[2] for v in values]],
                    fmt=markers[index % len(markers)] + "-", color=colours[index % len(colours)], capsize=3,
                    label=name)
        labels.append(name)

    if paired:
        ref_y = 1.0
        ref_gmacs = reference["gmacs"] if reference else records[0]["a"]["gmacs"]
    else:
        ref_y = reference["throughput"]["median"] if reference else None
        ref_gmacs = reference["gmacs"] if reference else None
    if ref_y is not None:
        ax.axhline(ref_y, color="0.35", linestyle="--", linewidth=1,
                   label=f"{ref_name} (reference, {ref_gmacs:.2f} GMACs)")
        ax.plot([ref_gmacs], [ref_y], marker="*", markersize=14, color="0.2", linestyle="none")
        ax.annotate(ref_name, (ref_gmacs, ref_y), textcoords="offset points", xytext=(0, 9), ha="center",
                    fontsize=9)
        labels.append(f"{ref_name} (reference)")
    targets = sorted({r["target_gmacs"]["target"] for r in records if (r.get("target_gmacs") or {}).get("target")})
    for target in targets:
        ax.axvline(target, color="0.85", linewidth=0.8, zorder=0)

    first = records[0]
    rounds = first.get("rounds")
    if paired:
        ax.set_ylabel(f"speedup over {ref_name} (median of paired rounds;\nbars: slowest to fastest round)")
    else:
        ax.set_ylabel("throughput (images/s, median; bars: IQR)")
    ax.set_xlabel(f"GMACs per image ({first.get('flops_counter', 'fvcore')}); grey lines: target GMACs")
    threads = f", {first['torch_threads']} threads" if first.get("torch_threads") else ""
    rounds_text = f", {rounds} rounds" if rounds else ""
    ax.set_title(f"{ref_name} token methods at equal GMACs\n{first.get('device_name', first.get('device'))}, "
                 f"{first.get('precision')}, batch {first.get('batch_size')}{threads}{rounds_text}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.set_xlim(left=min(r["gmacs"] for r in records) - 0.2, right=max(r["gmacs"] for r in records) + 0.25)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=9, frameon=False)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return labels


def table(records: Sequence[dict]) -> str:
    """The Markdown table of docs/measurements.md: every run with its solved setting and speed."""
    paired = all(r.get("kind") == "compare" and r.get("ratio") for r in records)
    head = ["method", "target GMACs", "setting chosen", "GMACs", "img/s"]
    if paired:
        head += [f"{BASELINE_NAMES.get(records[0]['label_a'], records[0]['label_a'])} img/s, same rounds",
                 "speedup: median of paired rounds (min-max)"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ordered = [r for r in records if is_baseline(r)]
    ordered += [r for group in curves(records).values() for r in sorted(group, key=lambda r: -r["gmacs"])]
    for r in ordered:
        target = (r.get("target_gmacs") or {}).get("target")
        name = method_name(r) + (" (against itself)" if is_baseline(r) and paired else "")
        cells = [name, f"{target:.1f}" if target else f"{r['gmacs']:.1f} (none)", setting(r), f"{r['gmacs']:.3f}",
                 f"{r['throughput']['median']:.1f}"]
        if paired:
            ratio = r["ratio"]
            cells += [f"{r['a']['throughput']['median']:.1f}",
                      f"{ratio['median']:.2f}x ({ratio['min']:.2f}-{ratio['max']:.2f})"]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("records", help="benchmark.py --output JSON-lines file")
    parser.add_argument("out", help="PNG file to write")
    parser.add_argument("--table", action="store_true", help="also print the Markdown table of the runs")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = get_args_parser().parse_args(argv)
    try:
        records = read_records(args.records)
        labels = plot(records, args.out)
    except UserError as err:
        _logger.error("error: %s", err)
        return 2
    _logger.info("wrote %s: %s", args.out, ", ".join(labels))
    if args.table:
        sys.stdout.write(table(records) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
