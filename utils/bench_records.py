"""Benchmark records and their outputs: one JSON record per run, CSV rows, tables and plots."""
from __future__ import annotations

import csv
import datetime
import json
import os
import sys
from typing import Sequence

from utils.errors import UserError

RECORD_VERSION = 1
CSV_FIELDS = (
    "timestamp", "kind", "label", "model", "mode", "batch_size_requested", "batch_size",
    "oom_backoff", "img_size", "precision", "channels_last", "compile", "device", "device_name",
    "torch_threads", "fused_attn", "params", "gmacs", "flops_counter", "gmacs_fvcore",
    "gmacs_torchprofile", "counters_disagree", "throughput_median", "throughput_q1",
    "throughput_q3", "throughput_min", "throughput_max", "latency_ms_median", "peak_mem_mb",
    "peak_mem_kind", "achieved_gflops", "pct_of_peak", "ratio", "error", "compile_speedup",
)


def make_record(kind: str, spec, model_kwargs: dict, settings: dict, env: dict,
                flop_info: dict | None, tokens: list[int] | None, result: dict | None,
                peak: dict | None = None, **extra) -> dict:
    """One JSON-serialisable record: every setting, environment, counter and measurement."""
    flop_info = flop_info or {}
    result = result or {}
    gmacs = flop_info.get("gmacs")
    throughput = (result.get("throughput") or {}).get("median")
    record = {
        "record_version": RECORD_VERSION,
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "kind": kind, "label": spec.label, "model": spec.name, "method_flags": spec.method,
        "model_kwargs": model_kwargs, **settings, **env,
        "params": flop_info.get("params"),
        "gmacs": gmacs, "gflops": flop_info.get("gflops"), "flops_counter": flop_info.get("counter"),
        "flops_unit": "GMACs (one fused multiply-add = 1; gflops = 2 * gmacs)",
        "gmacs_fvcore": flop_info.get("gmacs_fvcore"), "gmacs_torchprofile": flop_info.get("gmacs_torchprofile"),
        "counters_rel_diff": flop_info.get("counters_rel_diff"),
        "counters_disagree": flop_info.get("counters_disagree"),
        "skipped_ops": {k[len("skipped_ops_"):]: v for k, v in flop_info.items() if k.startswith("skipped_ops_")},
        "counter_errors": {k[len("error_"):]: v for k, v in flop_info.items() if k.startswith("error_")},
        "tokens_per_block": tokens,
        "official_flops": flop_info.get("official"),  # the method's own counter (family.official_flops)
        **result,
        "peak_gflops": None, "achieved_gflops": None, "pct_of_peak": None,
        "argv": sys.argv[1:],
        **extra,
    }
    if peak:
        record.update(peak)
        if gmacs is not None and throughput is not None and result.get("mode") == "infer":
            record["achieved_gflops"] = 2 * gmacs * throughput
            record["pct_of_peak"] = 100.0 * record["achieved_gflops"] / peak["peak_gflops"]
    record.setdefault("error", None)
    return record


def append_jsonl(path: str, record: dict) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(record, default=str) + "\n")


def csv_row(record: dict) -> dict:
    row = {field: record.get(field) for field in CSV_FIELDS}
    for stat in ("median", "q1", "q3", "min", "max"):
        row[f"throughput_{stat}"] = (record.get("throughput") or {}).get(stat)
    row["latency_ms_median"] = (record.get("latency_ms") or {}).get("median")
    row["ratio"] = (record.get("ratio") or {}).get("of_medians") if isinstance(record.get("ratio"), dict) else None
    return row


def append_csv(path: str, record: dict) -> None:
    new_file = not os.path.exists(path) or os.path.getsize(path) == 0
    with open(path, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
        if new_file:
            writer.writeheader()
        writer.writerow(csv_row(record))


def plot_throughput_vs_gmacs(records: Sequence[dict], path: str) -> int:
    """Scatter of median throughput against GMACs, one labelled point per measured run; FLOPs-only
    records (--flops-only) give GMACs against parameters instead. Returns the number of points.

    UserError, and nothing written, when no record has the values to plot.
    """
    if records and all(r.get("kind") == "flops" for r in records):
        return _plot_gmacs_vs_params(records, path)
    points = [r for r in records if r.get("gmacs") is not None and (r.get("throughput") or {}).get("median")]
    if not points:
        raise UserError(f"--plot {path}: no run has both GMACs and a throughput ({_no_points_reason(records)}); "
                        "nothing plotted")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    for (series, mode), group in _series(points).items():
        group = sorted(group, key=lambda r: r["gmacs"])
        marker = "o" if mode == "infer" else "s"
        medians = [r["throughput"]["median"] for r in group]
        errors = [[m - r["throughput"]["q1"] for m, r in zip(medians, group)],
                  [r["throughput"]["q3"] - m for m, r in zip(medians, group)]]
        ax.errorbar([r["gmacs"] for r in group], medians, yerr=errors, fmt=marker + ("-" if len(group) > 1 else ""),
                    capsize=3, label=f"{series} ({mode})")
        if len(group) == 1:
            ax.annotate(f"{group[0]['label']} ({mode})", (group[0]["gmacs"], medians[0]),
                        textcoords="offset points", xytext=(4, 4), fontsize=7)
        else:  # a line of --target-gmacs points: each labelled with the value the search chose
            for r, median in zip(group, medians):
                chosen = (r.get("target_gmacs") or {}).get("value")
                if chosen is not None:
                    ax.annotate(str(chosen), (r["gmacs"], median), textcoords="offset points", xytext=(4, 4),
                                fontsize=6)
    if any(len(group) > 1 for group in _series(points).values()):
        ax.legend(fontsize=7)
    first = points[0]
    ax.set_title(f"{first.get('device_name')} | {first.get('precision')} | batch {first.get('batch_size')}",
                 fontsize=9)
    ax.set_xlabel(f"GMACs per image ({first['flops_counter']})")
    ax.set_ylabel("throughput (images/s, median; bars: IQR)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return len(points)


def _series(points: Sequence[dict]) -> dict:
    """(series, mode) -> records, in first-seen order; a record without a series is its own."""
    groups: dict = {}
    for r in points:
        groups.setdefault((r.get("series") or r["label"], r.get("mode")), []).append(r)
    return groups


def _no_points_reason(records: Sequence[dict]) -> str:
    if not records:
        return "no run was recorded"
    if all(r.get("error") for r in records):
        return "every run failed"
    if all(r.get("gmacs") is None for r in records):
        return "GMACs were not counted"
    return "no run has a throughput"


def _plot_gmacs_vs_params(records: Sequence[dict], path: str) -> int:
    """--flops-only: GMACs per image against parameters (nothing was timed)."""
    points = [r for r in records if r.get("gmacs") is not None and r.get("params") is not None]
    if not points:
        raise UserError(f"--plot {path}: no model has both GMACs and a parameter count "
                        f"({_no_points_reason(records)}); nothing plotted")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    for r in points:
        ax.plot(r["params"] / 1e6, r["gmacs"], "o")
        ax.annotate(r["label"], (r["params"] / 1e6, r["gmacs"]), textcoords="offset points", xytext=(4, 4),
                    fontsize=7)
    ax.set_title(f"--flops-only at {points[0].get('img_size')} px: no speed measured", fontsize=9)
    ax.set_xlabel("parameters (M)")
    ax.set_ylabel(f"GMACs per image ({points[0].get('flops_counter')})")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return len(points)


def check_plot_path(args) -> None:
    """Refuse a --plot that cannot be drawn or written before anything is measured."""
    if not args.plot:
        return
    if args.no_flops:
        raise UserError("--plot draws against GMACs, which --no-flops skips; drop one of them")
    directory = os.path.dirname(os.path.abspath(args.plot))
    if os.path.isdir(args.plot) or not os.path.isdir(directory) or not os.access(directory, os.W_OK):
        raise UserError(f"--plot {args.plot}: cannot write a file there (is {directory} an existing, writable "
                        "directory?); choose another path")


def _fmt(value, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def _params_m(record: dict) -> str:
    return _fmt(record["params"] / 1e6 if record.get("params") is not None else None, ".2f")


def format_table(records: Sequence[dict]) -> str:
    """A fixed-width console table, one row per record (a FLOPs table when nothing was timed)."""
    if all(r.get("kind") == "flops" for r in records):
        header = ("model", "params M", "GMACs fvcore", "GMACs torchprofile", "diff %", "tokens per block")
        rows = [header] + [(
            r["label"], _params_m(r), _fmt(r.get("gmacs_fvcore"), ".3f"), _fmt(r.get("gmacs_torchprofile"), ".3f"),
            _fmt(100 * r["counters_rel_diff"] if r.get("counters_rel_diff") is not None else None, ".2f"),
            ",".join(map(str, r.get("tokens_per_block") or [])) or "-",
        ) for r in records]
    else:
        compiled = any(r.get("compile_speedup") is not None for r in records)
        header = ("model", "mode", "batch", "prec", "img/s", "IQR", "ms/batch", "peak MB", "GMACs",
                  "tp GMACs", "params M", "%peak") + (("compile x",) if compiled else ())
        rows = [header]
        for r in records:
            tp = r.get("throughput") or {}
            rows.append((
                r["label"], r.get("mode") or "-", _fmt(r.get("batch_size"), "d"), r.get("precision") or "-",
                _fmt(tp.get("median"), ".1f"), _fmt(tp.get("iqr"), ".1f"),
                _fmt((r.get("latency_ms") or {}).get("median"), ".2f"), _fmt(r.get("peak_mem_mb"), ".0f"),
                _fmt(r.get("gmacs"), ".3f"), _fmt(r.get("gmacs_torchprofile"), ".3f"), _params_m(r),
                _fmt(r.get("pct_of_peak"), ".1f"),
            ) + ((_fmt(r.get("compile_speedup"), ".2f"),) if compiled else ()))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    notes = []
    if any(r.get("counters_disagree") for r in records):
        notes.append("fvcore and torchprofile disagree by > 2% for: "
                     + ", ".join(r["label"] for r in records if r.get("counters_disagree")))
    if any(r.get("oom_backoff") for r in records):
        notes.append("batch halved after out-of-memory for: "
                     + ", ".join(f"{r['label']} {r['oom_backoff']}" for r in records if r.get("oom_backoff")))
    if any(r.get("error") for r in records):
        notes.append("errors: " + "; ".join(f"{r['label']}: {r['error']}" for r in records if r.get("error")))
    counter = next((r.get("flops_counter") for r in records if r.get("flops_counter")), None)
    if counter:
        also = "; torchprofile alongside" if any(r.get("gmacs_torchprofile") is not None for r in records) else ""
        notes.append(f"GMACs: multiply-accumulates per image (forward, batch 1), counter {counter}{also}")
    kinds = {r.get("peak_mem_kind") for r in records if r.get("peak_mem_kind")}
    if kinds:
        notes.append(f"peak MB: {', '.join(sorted(kinds))}")
    return "\n".join(lines + notes)


def format_compare(record: dict) -> str:
    ratio = record["ratio"]
    return (f"{record['label_b']}  vs  {record['label_a']}  [{record['mode']}, batch {record['batch_size']}]: "
            f"throughput ratio B/A = {ratio['of_medians']:.3f} (per-round ratios: median {ratio['median']:.3f}, "
            f"IQR {ratio['q1']:.3f}-{ratio['q3']:.3f}, min-max {ratio['min']:.3f}-{ratio['max']:.3f}, "
            f"{ratio['n']} interleaved rounds); A {record['a']['throughput']['median']:.1f} img/s, "
            f"B {record['b']['throughput']['median']:.1f} img/s")
