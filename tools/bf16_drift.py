"""How far bf16 inference moves from fp32, on the checkpoint-parity cases' weights.

For every parity case (`../shared/parity/cases/*.pt`: model, kwargs, setup lines, the
deterministic weights of `fill.py` and the seeded input) and one extra LTM case (the
same deterministic fill for `ltm_vit_small_patch16_224`), the model runs three times on
the case's input: fp32, bf16 autocast (`benchmark.py --precision bf16`) and bf16 weights
(`engine.cast_for_inference`, `--precision bf16-weights`). Printed per bf16 run:

* logits: max |bf16 - fp32|, that over max |fp32| (relative), and whether the top-1
  class agrees for every image;
* token decisions ("changed / total", summed over blocks and images):
  EViT: per pruning block, original patches kept (as their own token) in fp32 but not in
  bf16; ToMe: merges (source -> destination pairs) of the first block not in fp32's
  (same input tokens), and original patches whose final group (the set of patches
  merged with it, from the source map) differs from fp32's; LTM: source tokens whose largest mask entry
  moves to another slot; LTMP (inference): |token count - fp32's| per block. Once a
  block decides differently, later blocks see other tokens, so later differences include
  that knock-on effect.

    python -m tools.bf16_drift                      # every case, table on stdout
    python -m tools.bf16_drift --cases ../shared/parity/cases/tome_small_r13_prop.pt
"""
from __future__ import annotations

import argparse
import copy
import glob
import logging
import os
import sys
from typing import Callable, Dict, List, Optional

import timm
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import models  # noqa: E402,F401  (registers the project's models)
from engine import autocast_in, cast_for_inference  # noqa: E402
from models import ltm, tome  # noqa: E402
from models.token_ops import track_token_positions  # noqa: E402

_logger = logging.getLogger("bf16_drift")
DEFAULT_CASES = os.path.join(ROOT, "..", "shared", "parity", "cases", "*.pt")


def _fill_module(cases_dir: str):
    """`fill.py` of the parity directory (the cases live in its `cases/` folder)."""
    for directory in (cases_dir, os.path.dirname(cases_dir)):
        if os.path.exists(os.path.join(directory, "fill.py")) and directory not in sys.path:
            sys.path.insert(0, directory)
    import fill  # the parity cases' deterministic weights and inputs

    return fill


def load_cases(paths: List[str], fill) -> List[dict]:
    """{name, model, setup, x} per parity case, plus the LTM case."""
    cases = []
    for path in paths:
        case = torch.load(path, map_location="cpu", weights_only=True)
        project = case["project"]
        model = timm.create_model(project["model"], pretrained=False, **project.get("kwargs", {}))
        model.load_state_dict(fill.fill_state_dict(case["keys"]), strict=True)
        model.eval()
        if project.get("setup"):
            exec(project["setup"], {"model": model, "torch": torch})
        cases.append({"name": case["name"], "model": model,
                      "x": fill.make_input(case["input"]["shape"], case["input"]["seed"])})
    model = timm.create_model("ltm_vit_small_patch16_224", pretrained=False, compression_ratio=0.8).eval()
    model.load_state_dict(fill.fill_state_dict(fill.layout(model.state_dict())), strict=True)
    cases.append({"name": "ltm_vit_small_r08 (fill.py weights)", "model": model,
                  "x": fill.make_input([2, 3, 224, 224], 1101)})
    return cases


# ---------------------------------------------------------------- recording decisions

class Recorder:
    """Collects the token decisions of one forward, per reducing block in call order."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.kind = self._kind(model)
        self.decisions: List[torch.Tensor] = []

    @staticmethod
    def _kind(model) -> Optional[str]:
        from models.evit import EViT
        if isinstance(model, EViT):
            return "evit"
        if tome.is_patched(model):
            return "tome"
        if ltm.ltm_blocks(model) and getattr(model, "compression_ratio", 1.0) < 1.0:
            return "ltm"
        if hasattr(model, "ltmp_info"):
            return "ltmp"
        return None

    def run(self, x: torch.Tensor) -> torch.Tensor:
        self.decisions = []
        handles = []
        if self.kind == "ltm":
            for _, block in ltm.ltm_blocks(self.model):
                handles.append(block.mask_module.register_forward_hook(
                    lambda module, args, out: self.decisions.append(out.mask.argmax(dim=-1))))
        restore = None
        if self.kind == "tome":
            self.model._tome_cfg.trace_source = True
            original = restore = tome.bipartite_soft_matching

            def recorded(*args, **kwargs):
                match = original(*args, **kwargs)
                if match is not None and not self.decisions:
                    self.decisions.append(torch.cat([match.src_idx, match.dst_idx], dim=-1))
                return match

            tome.bipartite_soft_matching = recorded
        try:
            if self.kind == "evit":
                logits, kept = self.model(x, get_idx=True)
                self.decisions = _evit_kept_patches(self.model, x, kept)
            else:
                logits = self.model(x)
        finally:
            for handle in handles:
                handle.remove()
            if restore is not None:
                tome.bipartite_soft_matching = restore
        if self.kind == "tome":
            self.decisions = self.decisions[:1] + [_tome_groups(self.model._tome_info["source"])]
        elif self.kind == "ltmp":
            self.decisions = [t.clone() for t in self.model.ltmp_info["tokens"]]
        return logits


def _evit_kept_patches(model, x: torch.Tensor, kept: List[torch.Tensor]) -> List[torch.Tensor]:
    """Per pruning block, a `[B, P]` bool map of the original patches still held by their own token."""
    patches = model.patch_embed.num_patches
    positions = torch.arange(patches).expand(x.shape[0], patches)
    current, maps = patches, []
    for idx in kept:
        positions = track_token_positions(positions, idx, current, model.fuse_token)
        maps.append((positions >= 0) & (positions < idx.shape[1]))
        current = idx.shape[1] + int(model.fuse_token)
    return maps


def _tome_groups(source: torch.Tensor) -> torch.Tensor:
    """`[B, T0, T0]` bool co-membership of the original tokens in the final groups of `source` `[B, T, T0]`."""
    group = source.argmax(dim=1)  # [B, T0]
    return group[:, :, None] == group[:, None, :]


def changed_decisions(kind: Optional[str], ref: List[torch.Tensor], other: List[torch.Tensor]) -> Optional[tuple]:
    """(changed, total) decisions of `other` against `ref` (see the module docstring)."""
    if kind is None:
        return None
    if kind == "tome":
        first = ref[0], other[0]
        pairs = [set(map(tuple, row)) for t in first for row in t.tolist()]
        half = len(pairs) // 2
        first_changed = sum(len(a - b) for a, b in zip(pairs[:half], pairs[half:]))
        groups = changed_decisions("groups", ref[1:], other[1:])
        return first_changed, sum(len(a) for a in pairs[:half]), groups
    changed = total = 0
    for a, b in zip(ref, other):
        if kind == "evit":  # kept in fp32, not kept in bf16
            changed += int((a & ~b).sum())
            total += int(a.sum())
        elif kind == "groups":  # tokens whose group (row of the co-membership) differs
            changed += int((a != b).any(dim=-1).sum())
            total += a.shape[0] * a.shape[1]
        elif kind == "ltm":
            changed += int((a != b).sum())
            total += a.numel()
        else:  # ltmp: token counts per image
            changed += int((a - b).abs().sum())
            total += int(a.sum())
    if len(ref) != len(other):  # a block reduced in one run only
        changed += sum(t.numel() for t in (ref[len(other):] or other[len(ref):]))
    return changed, total


# ---------------------------------------------------------------- runs

def _runs(model: torch.nn.Module) -> Dict[str, Callable[[torch.Tensor], tuple]]:
    def fp32(x):
        recorder = Recorder(model)
        return recorder.run(x).float(), recorder

    def autocast(x):
        recorder = Recorder(model)
        with autocast_in(x.device, torch.bfloat16):
            return recorder.run(x).float(), recorder

    def weights(x):
        cast = cast_for_inference(copy.deepcopy(model), torch.bfloat16)
        recorder = Recorder(cast)
        return recorder.run(x).float(), recorder

    return {"fp32": fp32, "bf16 autocast": autocast, "bf16 weights": weights}


@torch.no_grad()
def measure(case: dict) -> List[dict]:
    runs = _runs(case["model"])
    ref, ref_rec = runs["fp32"](case["x"])
    rows = []
    for name in ("bf16 autocast", "bf16 weights"):
        out, rec = runs[name](case["x"])
        diff = (out - ref).abs().max().item()
        rows.append({
            "case": case["name"], "precision": name, "max_abs": diff,
            "rel": diff / max(ref.abs().max().item(), 1e-12),
            "top1_agree": bool((out.argmax(-1) == ref.argmax(-1)).all()),
            "method": ref_rec.kind, "decisions": changed_decisions(ref_rec.kind, ref_rec.decisions, rec.decisions),
        })
    return rows


def _share(counts: tuple) -> str:
    return f"{counts[0]}/{counts[1]} ({100 * counts[0] / max(counts[1], 1):.2f}%)"


def format_rows(rows: List[dict]) -> str:
    what = {"evit": "EViT kept patches", "tome": "ToMe final groups", "ltm": "LTM mask argmax",
            "ltmp": "LTMP token counts", None: "-"}
    header = ("case", "bf16 run", "max |d logit|", "rel", "top-1 same", "decisions changed")
    table = [header]
    for r in rows:
        dec = r["decisions"]
        dec_text = "-" if dec is None else f"{what[r['method']]}: {_share(dec)}"
        if r["method"] == "tome":
            dec_text = f"ToMe block-0 merges: {_share(dec)}; final groups: {_share(dec[2])}"
        table.append((r["case"], r["precision"], f"{r['max_abs']:.3g}", f"{r['rel']:.2%}",
                      "yes" if r["top1_agree"] else "no", dec_text))
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in table]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=None, help=f"parity case files (default: {DEFAULT_CASES})")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if args.threads:
        torch.set_num_threads(args.threads)
    paths = args.cases or sorted(glob.glob(DEFAULT_CASES))
    if not paths:
        _logger.error("no parity cases found at %s; pass --cases FILE ...", DEFAULT_CASES)
        return 2
    fill = _fill_module(os.path.dirname(os.path.abspath(paths[0])))
    rows = []
    for case in load_cases(paths, fill):
        _logger.info("%s", case["name"])
        rows.extend(measure(case))
    print(format_rows(rows), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
