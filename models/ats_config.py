"""The official ATS launch line on main.py: SlowFast-style YAML configs and overrides.

The official code (adaptivetokensampling/ATS, a PySlowFast-derived trainer) is launched as

    python tools/run_net.py --cfg configs/ImageNet/DeiT_S.yaml \\
        DATA.PATH_TO_DATA_DIR /data/imagenet TEST.CHECKPOINT_FILE_PATH deit_small_patch16_224-cd65a155.pth

`translate_argv` turns such an argv into main.py's flags before parsing, so the same line runs
as `python main.py ...`: the `--cfg` file (nested upper-case sections) is read on top of the
official defaults (its `libs/config/defaults.py`), trailing `SECTION.KEY VALUE` pairs override
it (values read as Python literals, as yacs does, and type-checked against the default;
unknown keys are errors), and the result is mapped onto main.py's options (table in
docs/methods/ats.md). Keys the project has no use for are accepted: video-only sections are
ignored, and a mapped section's unmapped key set away from its default is reported as ignored.
`--shard_id`, `--num_shards` and `--init_method` (single machine here) are accepted and dropped.

The YAML reader is a small one for the subset these configs use (nested mappings, scalars,
flow lists, block lists of scalars, comments), so this library needs no YAML package.
"""
from __future__ import annotations

import ast
import copy
import logging
import math
import os
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .errors import ModelConfigError

__all__ = ["DEFAULTS", "read_yaml", "is_slowfast_config", "load_config", "config_to_argv", "translate_argv",
           "IMAGENET_MEAN", "IMAGENET_STD"]

_logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The official defaults (libs/config/defaults.py at 9271257) of the sections this project maps or checks.
DEFAULTS: Dict[str, Any] = {
    "TRAIN": {
        "ENABLE": True, "MIXUP_ALPHA": 0.0, "DATASET": "ImageNet", "BATCH_SIZE": 64, "EVAL_PERIOD": 10,
        "CHECKPOINT_PERIOD": 10, "AUTO_RESUME": True, "CHECKPOINT_FILE_PATH": "", "CHECKPOINT_TYPE": "pytorch",
        "CHECKPOINT_INFLATE": False, "CHECKPOINT_EPOCH_RESET": False, "CHECKPOINT_CLEAR_NAME_PATTERN": (),
        "MIXED_PRECISION": False,
    },
    "TEST": {
        "ENABLE": True, "DATASET": "kinetics", "BATCH_SIZE": 8, "CHECKPOINT_FILE_PATH": "",
        "NUM_ENSEMBLE_VIEWS": 10, "NUM_SPATIAL_CROPS": 3, "CHECKPOINT_TYPE": "pytorch", "SAVE_RESULTS_PATH": "",
    },
    "DATA": {
        "PATH_TO_DATA_DIR": "/media/datasets/ILSVRC/", "PATH_LABEL_SEPARATOR": ",", "PATH_PREFIX": "",
        "NUM_FRAMES": 8, "SAMPLING_RATE": 8, "TRAIN_PCA_EIGVAL": [0.225, 0.224, 0.229],
        "TRAIN_PCA_EIGVEC": [[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]],
        "PATH_TO_PRELOAD_IMDB": "", "MEAN": [0.45, 0.45, 0.45], "INPUT_CHANNEL_NUM": [3, 3],
        "STD": [0.225, 0.225, 0.225], "TRAIN_JITTER_SCALES": [256, 320], "TRAIN_JITTER_SCALES_RELATIVE": [],
        "TRAIN_JITTER_ASPECT_RELATIVE": [], "USE_OFFSET_SAMPLING": False, "TRAIN_JITTER_MOTION_SHIFT": False,
        "TRAIN_CROP_SIZE": 224, "TEST_CROP_SIZE": 256, "TARGET_FPS": 30, "DECODING_BACKEND": "pyav",
        "INV_UNIFORM_SAMPLE": False, "RANDOM_FLIP": True, "MULTI_LABEL": False, "ENSEMBLE_METHOD": "sum",
        "REVERSE_INPUT_CHANNEL": False,
    },
    "DATA_LOADER": {"NUM_WORKERS": 8, "PIN_MEMORY": True, "ENABLE_MULTI_THREAD_DECODE": False},
    "SOLVER": {
        "BASE_LR": 0.1, "LR_POLICY": "cosine", "COSINE_END_LR": 0.0, "GAMMA": 0.1, "STEP_SIZE": 1, "STEPS": [],
        "LRS": [], "MAX_EPOCH": 300, "MOMENTUM": 0.9, "DAMPENING": 0.0, "NESTEROV": True, "WEIGHT_DECAY": 1e-4,
        "WARMUP_FACTOR": 0.1, "WARMUP_EPOCHS": 0.0, "WARMUP_START_LR": 0.01, "OPTIMIZING_METHOD": "sgd",
        "BASE_LR_SCALE_NUM_SHARDS": False, "COSINE_AFTER_WARMUP": False, "ZERO_WD_1D_PARAM": False,
        "CLIP_GRAD_VAL": None, "CLIP_GRAD_L2NORM": None, "FREEZE_BACKBONE": False, "CLIP_GRADIENT": -1.0,
    },
    "MODEL": {
        "ARCH": "ViT", "MODEL_NAME": "ViT", "NUM_CLASSES": 1000, "LOSS_FUNC": "cross_entropy",
        "SINGLE_PATHWAY_ARCH": ["mvit"], "DROPOUT_RATE": 0.5, "DROPCONNECT_RATE": 0.0, "FC_INIT_STD": 0.01,
        "HEAD_ACT": "softmax", "ACT_CHECKPOINT": False,
    },
    "VIT": {
        "IMG_SIZE": 224, "PATCH_SIZE": 16, "IN_CHANNELS": 3, "NUM_CLASSES": 1000, "EMBED_DIM": 384, "DEPTH": 12,
        "NUM_HEADS": 6, "MLP_RATIO": 4.0, "QKV_BIAS": True, "QK_SCALE": None, "REPRESENTATION_SIZE": None,
        "DROP_RATE": 0.0, "ATTN_DROP_RATE": 0.0, "DROP_PATH_RATE": 0.0, "HYBRID_BACKBONE": None, "NORM_LAYER": None,
        "ATS_BLOCKS": [3, 4, 5, 6, 7, 8, 9, 10, 11], "NUM_TOKENS": [197] * 12, "DROP_TOKENS": False,
    },
    "AUG": {
        "ENABLE": False, "NUM_SAMPLE": 1, "COLOR_JITTER": 0.4, "AA_TYPE": "rand-m9-mstd0.5-inc1",
        "INTERPOLATION": "bicubic", "RE_PROB": 0.25, "RE_MODE": "pixel", "RE_COUNT": 1, "RE_SPLIT": False,
    },
    "MIXUP": {"ENABLE": False, "ALPHA": 0.8, "CUTMIX_ALPHA": 1.0, "PROB": 1.0, "SWITCH_PROB": 0.5,
              "LABEL_SMOOTH_VALUE": 0.1},
    "NUM_GPUS": 1, "NUM_SHARDS": 1, "SHARD_ID": 0, "OUTPUT_DIR": "/home/mohsen/farnoush/ATS-ViT/output",
    "RNG_SEED": 1, "LOG_PERIOD": 10, "LOG_MODEL_INFO": True, "DIST_BACKEND": "nccl",
}

# Sections of the official defaults for video models, detection, visualisation and multigrid
# training: accepted with any content and ignored (this project trains and evaluates images).
IGNORED_SECTIONS = ("BN", "MVIT", "DETECTION", "AVA", "MULTIGRID", "TENSORBOARD", "DEMO", "XVIT",
                    "TEMPORAL_HEAD", "BENCHMARK", "RESNET", "SLOWFAST", "NONLOCAL", "X3D")

# Keys that become main.py options (section, key); any other key of a mapped section is checked
# for its type and reported when set away from its default.
MAPPED = {
    ("TRAIN", "ENABLE"), ("TRAIN", "DATASET"), ("TRAIN", "BATCH_SIZE"), ("TRAIN", "CHECKPOINT_FILE_PATH"),
    ("TEST", "ENABLE"), ("TEST", "DATASET"), ("TEST", "BATCH_SIZE"), ("TEST", "CHECKPOINT_FILE_PATH"),
    ("DATA", "PATH_TO_DATA_DIR"), ("DATA", "TEST_CROP_SIZE"), ("DATA", "TRAIN_CROP_SIZE"), ("DATA", "MEAN"),
    ("DATA", "STD"), ("DATA_LOADER", "NUM_WORKERS"), ("SOLVER", "BASE_LR"), ("SOLVER", "MAX_EPOCH"),
    ("SOLVER", "WEIGHT_DECAY"), ("SOLVER", "WARMUP_EPOCHS"), ("SOLVER", "COSINE_END_LR"),
    ("SOLVER", "OPTIMIZING_METHOD"), ("SOLVER", "MOMENTUM"), ("SOLVER", "LR_POLICY"), ("MODEL", "NUM_CLASSES"),
    ("VIT", "IMG_SIZE"), ("VIT", "PATCH_SIZE"), ("VIT", "IN_CHANNELS"), ("VIT", "NUM_CLASSES"),
    ("VIT", "EMBED_DIM"), ("VIT", "DEPTH"), ("VIT", "NUM_HEADS"), ("VIT", "MLP_RATIO"), ("VIT", "QKV_BIAS"),
    ("VIT", "QK_SCALE"), ("VIT", "REPRESENTATION_SIZE"), ("VIT", "DROP_RATE"), ("VIT", "ATTN_DROP_RATE"),
    ("VIT", "DROP_PATH_RATE"), ("VIT", "HYBRID_BACKBONE"), ("VIT", "NORM_LAYER"), ("VIT", "ATS_BLOCKS"),
    ("VIT", "NUM_TOKENS"), ("VIT", "DROP_TOKENS"), (None, "RNG_SEED"), (None, "OUTPUT_DIR"),
    (None, "NUM_GPUS"), (None, "NUM_SHARDS"), (None, "SHARD_ID"), (None, "LOG_PERIOD"), (None, "DIST_BACKEND"),
    (None, "LOG_MODEL_INFO"), ("MODEL", "ARCH"), ("MODEL", "MODEL_NAME"),
}

# Unmapped keys whose value is what this project does anyway (one view, one centre crop per image).
EQUIVALENT = {("TEST", "NUM_ENSEMBLE_VIEWS"): 1, ("TEST", "NUM_SPATIAL_CROPS"): 1}

# VIT (EMBED_DIM, NUM_HEADS, DEPTH) -> the timm DeiT the official ViT class builds
SIZES = {(192, 3, 12): "deit_tiny_patch16_224", (384, 6, 12): "deit_small_patch16_224",
         (768, 12, 12): "deit_base_patch16_224"}

# main.py's optimizer names for SOLVER.OPTIMIZING_METHOD
OPTIMIZERS = {"sgd": "sgd", "adam": "adam", "adamw": "adamw"}

_OVERRIDE = re.compile(r"^[A-Z][A-Z0-9_]*(\.[A-Z0-9_]+)*$")
_SLOWFAST_FLAGS = {"--shard_id": 1, "--shard-id": 1, "--num_shards": 1, "--num-shards": 1,
                   "--init_method": 1, "--init-method": 1}


# ---------------------------------------------------------------------------
# A small YAML reader (the subset SlowFast configs use)
# ---------------------------------------------------------------------------

_YAML_TRUE = {"true", "True", "TRUE", "yes", "Yes", "YES", "on", "On", "ON"}
_YAML_FALSE = {"false", "False", "FALSE", "no", "No", "NO", "off", "Off", "OFF"}
_YAML_NULL = {"null", "Null", "NULL", "~", ""}


def _strip_comment(line: str) -> str:
    quote = None
    for index, char in enumerate(line):
        if quote:
            if char == quote:
                quote = None
        elif char in "'\"":
            quote = char
        elif char == "#" and (index == 0 or line[index - 1] in " \t"):
            return line[:index].rstrip()
    return line.rstrip()


def _scalar(text: str, where: str) -> Any:
    """A YAML 1.1 scalar as PyYAML's safe_load reads it (quoted -> str; flow lists via literals)."""
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    if text in _YAML_TRUE:
        return True
    if text in _YAML_FALSE:
        return False
    if text in _YAML_NULL:
        return None
    if text.startswith(("[", "{", "(")):
        converted = re.sub(r"\b(true|false|null)\b", lambda m: {"true": "True", "false": "False",
                                                                 "null": "None"}[m.group(1)], text)
        try:
            return ast.literal_eval(converted)
        except (ValueError, SyntaxError):
            raise ModelConfigError(f"{where}: cannot read the flow value {text!r}; write it as a Python-style "
                                   "list such as [3, 4, 5]") from None
    if re.fullmatch(r"[-+]?\d+", text):
        return int(text)
    if re.fullmatch(r"[-+]?(\d+\.\d*|\.\d+)([eE][-+]?\d+)?", text):  # PyYAML needs a dot for a float
        return float(text)
    return text


def read_yaml(path: str) -> Dict[str, Any]:
    """Nested dict of a SlowFast-style YAML file (mappings by indentation, scalars, lists)."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError as err:
        raise ModelConfigError(f"--cfg {path}: {err.strerror}") from None
    root: Dict[str, Any] = {}
    stack: List[Tuple[int, Any]] = [(-1, root)]  # (indent, container)
    pending: Optional[Tuple[int, Dict[str, Any], str]] = None  # a "KEY:" whose value follows
    for number, raw in enumerate(lines, start=1):
        where = f"{path}:{number}"
        line = _strip_comment(raw)
        if not line.strip() or line.strip() in ("---", "..."):
            continue
        if "\t" in line[: len(line) - len(line.lstrip())]:
            raise ModelConfigError(f"{where}: tab indentation; indent with spaces")
        indent = len(line) - len(line.lstrip())
        body = line.strip()
        if body.startswith("- ") or body == "-":
            if pending is not None and indent >= pending[0]:
                _, parent, key = pending
                parent[key] = []
                stack.append((indent - 1, parent[key]))
                pending = None
            while stack and stack[-1][0] >= indent:
                stack.pop()
            container = stack[-1][1]
            if not isinstance(container, list):
                raise ModelConfigError(f"{where}: a list item outside a list")
            container.append(_scalar(body[1:], where))
            continue
        match = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_.-]*)\s*:(\s+(.*))?", body)
        if match is None:
            raise ModelConfigError(f"{where}: expected 'KEY: value', got {body!r}")
        if pending is not None:
            _, parent, key = pending
            if indent > pending[0]:
                parent[key] = {}
                stack.append((pending[0], parent[key]))
            else:
                parent[key] = None
            pending = None
        while stack[-1][0] >= indent:
            stack.pop()
        container = stack[-1][1]
        if not isinstance(container, dict):
            raise ModelConfigError(f"{where}: a mapping key inside a list")
        key, value = match.group(1), match.group(3)
        if key in container:
            raise ModelConfigError(f"{where}: key {key} given twice")
        if value is None or value == "":
            container[key] = None
            pending = (indent, container, key)
        else:
            container[key] = _scalar(value, where)
    return root


def is_slowfast_config(path: str) -> bool:
    """A YAML file whose top-level keys are all upper case (TRAIN, TEST, DATA, VIT, ...)."""
    if not path or not os.path.isfile(path) or not path.endswith((".yaml", ".yml")):
        return False
    try:
        data = read_yaml(path)
    except ModelConfigError:
        return False
    return bool(data) and all(isinstance(k, str) and k.upper() == k and k[:1].isalpha() for k in data)


# ---------------------------------------------------------------------------
# yacs-style merge: literal values, type checks, unknown keys
# ---------------------------------------------------------------------------

def _decode(value: Any) -> Any:
    """yacs' value decoding: strings are read as Python literals when they are one."""
    if isinstance(value, str):
        try:
            return ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return value
    return value


def _coerce(value: Any, default: Any, name: str) -> Any:
    if default is None or type(value) is type(default):
        return value
    if isinstance(default, (list, tuple)) and isinstance(value, (list, tuple)):
        return type(default)(value)
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    raise ModelConfigError(f"{name}: expected a {type(default).__name__} like the official default {default!r}, "
                           f"got {value!r}")


def _merge(target: Dict[str, Any], data: Dict[str, Any], explicit: set, source: str, prefix: str = "") -> None:
    for key, value in data.items():
        name = f"{prefix}{key}"
        if not prefix and key in IGNORED_SECTIONS:
            explicit.add(name)
            continue
        if key not in target:
            raise ModelConfigError(f"{source}: unknown config key {name} (not in the official defaults)")
        if isinstance(target[key], dict):
            if not isinstance(value, dict):
                raise ModelConfigError(f"{source}: {name} is a section; give its keys, e.g. {name}.KEY")
            _merge(target[key], value, explicit, source, f"{name}.")
            continue
        target[key] = _coerce(_decode(value), target[key], f"{source}: {name}")
        explicit.add(name)


def _set_override(cfg: Dict[str, Any], name: str, value: str, explicit: set) -> None:
    parts = name.split(".")
    if parts[0] in IGNORED_SECTIONS:
        explicit.add(name)
        return
    node = cfg
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            raise ModelConfigError(f"unknown config key {name} (not in the official defaults)")
        node = node[part]
    key = parts[-1]
    if key not in node or isinstance(node[key], dict):
        raise ModelConfigError(f"unknown config key {name} (not in the official defaults)")
    node[key] = _coerce(_decode(value), node[key], f"override {name}")
    explicit.add(name)


def load_config(path: Optional[str], overrides: Sequence[Tuple[str, str]] = ()) -> Tuple[Dict[str, Any], set]:
    """(config, explicitly set key names) from the official defaults, `path` and `overrides`."""
    cfg = copy.deepcopy(DEFAULTS)
    explicit: set = set()
    if path:
        _merge(cfg, read_yaml(path), explicit, f"--cfg {path}")
    for name, value in overrides:
        _set_override(cfg, name, value, explicit)
    return cfg, explicit


# ---------------------------------------------------------------------------
# The official configuration as main.py flags
# ---------------------------------------------------------------------------

def _literal(value) -> str:
    return "[" + ",".join(str(v) for v in value) + "]"


def _is_imagenet(name: str) -> bool:
    return str(name).lower().replace("-", "").replace("_", "") == "imagenet"


def _close(a, b) -> bool:
    return len(a) == len(b) and all(math.isclose(float(x), y, abs_tol=1e-6) for x, y in zip(a, b))


def config_to_argv(cfg: Dict[str, Any], explicit: set) -> List[str]:
    """main.py flags for an official configuration (table in docs/methods/ats.md)."""
    train, test, data, vit, solver = cfg["TRAIN"], cfg["TEST"], cfg["DATA"], cfg["VIT"], cfg["SOLVER"]
    argv: List[str] = []
    if not train["ENABLE"] and not test["ENABLE"]:
        raise ModelConfigError("TRAIN.ENABLE and TEST.ENABLE are both False: nothing to run; set one of them True")
    evaluate = not train["ENABLE"]
    dataset = test["DATASET"] if evaluate else train["DATASET"]
    if not _is_imagenet(dataset):
        which = "TEST" if evaluate else "TRAIN"
        raise ModelConfigError(f"{which}.DATASET {dataset!r}: this project runs the ImageNet image configs of ATS; "
                               f"set {which}.DATASET ImageNet")
    if not data["PATH_TO_DATA_DIR"]:
        raise ModelConfigError("DATA.PATH_TO_DATA_DIR is empty; give it on the command line "
                               "(DATA.PATH_TO_DATA_DIR /path/to/imagenet)")
    argv += ["--data-set", "IMNET", "--data-path", str(data["PATH_TO_DATA_DIR"])]

    key = (vit["EMBED_DIM"], vit["NUM_HEADS"], vit["DEPTH"])
    if key not in SIZES:
        raise ModelConfigError(f"VIT.EMBED_DIM/NUM_HEADS/DEPTH {key}: the official configs are DeiT tiny "
                               "(192, 3, 12), small (384, 6, 12) or base (768, 12, 12)")
    fixed = dict(PATCH_SIZE=16, IN_CHANNELS=3, MLP_RATIO=4.0, QKV_BIAS=True, QK_SCALE=None, REPRESENTATION_SIZE=None,
                 HYBRID_BACKBONE=None, NORM_LAYER=None)
    for name, value in fixed.items():
        if vit[name] != value:
            raise ModelConfigError(f"VIT.{name} {vit[name]!r}: only the DeiT value {value!r} is supported")
    for name in ("VIT", "MODEL"):
        if cfg[name]["NUM_CLASSES"] != 1000:
            raise ModelConfigError(f"{name}.NUM_CLASSES {cfg[name]['NUM_CLASSES']}: ImageNet models have 1000 classes")
    crop = data["TEST_CROP_SIZE"]
    if vit["IMG_SIZE"] != crop:
        raise ModelConfigError(f"VIT.IMG_SIZE {vit['IMG_SIZE']} differs from DATA.TEST_CROP_SIZE {crop}; "
                               "set them equal")
    if not evaluate and data["TRAIN_CROP_SIZE"] != crop:
        raise ModelConfigError(f"DATA.TRAIN_CROP_SIZE {data['TRAIN_CROP_SIZE']} differs from DATA.TEST_CROP_SIZE "
                               f"{crop}; one input size is used here, set them equal")
    if not _close(data["MEAN"], IMAGENET_MEAN) or not _close(data["STD"], IMAGENET_STD):
        raise ModelConfigError(f"DATA.MEAN/STD {data['MEAN']} / {data['STD']}: only the ImageNet values "
                               f"{list(IMAGENET_MEAN)} / {list(IMAGENET_STD)} are supported")
    argv += ["--model", SIZES[key], "--input-size", str(crop), "--eval-crop-ratio", "0.875",
             "--eval-interpolation", "bicubic", "--num_workers", str(cfg["DATA_LOADER"]["NUM_WORKERS"]),
             "--drop", str(vit["DROP_RATE"]), "--drop-path", str(vit["DROP_PATH_RATE"])]
    if vit["ATTN_DROP_RATE"]:
        argv += ["--model-kwargs", repr({"attn_drop_rate": float(vit["ATTN_DROP_RATE"])})]
    argv += ["--ats-blocks", _literal(vit["ATS_BLOCKS"]), "--ats-num-tokens", _literal(vit["NUM_TOKENS"]),
             "--ats-drop-tokens" if vit["DROP_TOKENS"] else "--no-ats-drop-tokens",
             "--seed", str(cfg["RNG_SEED"])]
    if "OUTPUT_DIR" in explicit:
        argv += ["--output_dir", str(cfg["OUTPUT_DIR"])]
    if evaluate:
        if not test["CHECKPOINT_FILE_PATH"]:
            raise ModelConfigError("TEST.CHECKPOINT_FILE_PATH is empty: the evaluation would use random weights; "
                                   "give the checkpoint (TEST.CHECKPOINT_FILE_PATH path/to/deit.pth)")
        # main.py evaluates int(1.5 * --batch-size) images per batch; ATS results do not depend on it
        argv += ["--eval", "--resume", str(test["CHECKPOINT_FILE_PATH"]), "--ats-report",
                 "--batch-size", str(max(1, round(test["BATCH_SIZE"] / 1.5)))]
        return argv
    argv += ["--batch-size", str(train["BATCH_SIZE"])]
    if train["CHECKPOINT_FILE_PATH"]:
        argv += ["--finetune", str(train["CHECKPOINT_FILE_PATH"])]
    if solver["LR_POLICY"] != "cosine":
        raise ModelConfigError(f"SOLVER.LR_POLICY {solver['LR_POLICY']!r}: only 'cosine' is supported")
    method = str(solver["OPTIMIZING_METHOD"]).lower()
    if method not in OPTIMIZERS:
        raise ModelConfigError(f"SOLVER.OPTIMIZING_METHOD {method!r}: use one of {', '.join(OPTIMIZERS)}")
    # the project's DeiT recipe stays in force for what the config does not set (spec section 7)
    solver_flags = {"BASE_LR": "--lr", "MAX_EPOCH": "--epochs", "WEIGHT_DECAY": "--weight-decay",
                    "WARMUP_EPOCHS": "--warmup-epochs", "COSINE_END_LR": "--min-lr", "MOMENTUM": "--momentum"}
    for name, flag in solver_flags.items():
        if f"SOLVER.{name}" in explicit:
            argv += [flag, str(solver[name])]
    if "SOLVER.OPTIMIZING_METHOD" in explicit:
        argv += ["--opt", OPTIMIZERS[method]]
    if "SOLVER.BASE_LR" in explicit:
        argv += ["--unscale-lr"]  # the official BASE_LR is used as given
    return argv


def _unmapped_changes(cfg: Dict[str, Any], explicit: set) -> List[str]:
    changed = []
    for name in sorted(explicit):
        parts = name.split(".")
        if parts[0] in IGNORED_SECTIONS:
            continue
        section, key = (None, parts[0]) if len(parts) == 1 else (parts[0], parts[-1])
        if (section, key) in MAPPED:
            continue
        value = cfg[key] if section is None else cfg[section][key]
        if (section, key) in EQUIVALENT and value == EQUIVALENT[(section, key)]:
            continue
        default = DEFAULTS[key] if section is None else DEFAULTS[section][key]
        if value != default:
            changed.append(f"{name}={value!r}")
    return changed


def _is_override_key(token: str, any_section: bool) -> bool:
    """`SECTION.KEY` (of a known section unless `any_section`: after an official --cfg every such
    token is one, and an unknown one is an error), or a top-level key of the config (OUTPUT_DIR)."""
    if not _OVERRIDE.fullmatch(token):
        return False
    head = token.split(".", 1)[0]
    if "." in token:
        return any_section or (head in DEFAULTS and isinstance(DEFAULTS[head], dict)) or head in IGNORED_SECTIONS
    return head in DEFAULTS and not isinstance(DEFAULTS[head], dict)


def _cfg_path(argv: Sequence[str]) -> Optional[str]:
    for index, token in enumerate(argv):
        if token == "--cfg" and index + 1 < len(argv):
            return argv[index + 1]
        if token.startswith("--cfg="):
            return token.split("=", 1)[1]
    return None


def _split_argv(argv: Sequence[str],
                any_section: bool = False) -> Tuple[Optional[str], List[Tuple[str, str]], List[str]]:
    """(--cfg path, SECTION.KEY overrides, the rest of argv)."""
    cfg_path = None
    overrides: List[Tuple[str, str]] = []
    rest: List[str] = []
    index = 0
    while index < len(argv):
        token = argv[index]
        if token == "--cfg" and index + 1 < len(argv):
            cfg_path = argv[index + 1]
            index += 2
            continue
        if token.startswith("--cfg="):
            cfg_path = token.split("=", 1)[1]
            index += 1
            continue
        if _is_override_key(token, any_section) and index + 1 < len(argv):
            overrides.append((token, argv[index + 1]))
            index += 2
            continue
        rest.append(token)
        index += 1
    return cfg_path, overrides, rest


def _drop_slowfast_flags(argv: List[str]) -> List[str]:
    out, index = [], 0
    while index < len(argv):
        name = argv[index].split("=", 1)[0]
        if name in _SLOWFAST_FLAGS:
            index += 1 if "=" in argv[index] else 1 + _SLOWFAST_FLAGS[name]
            continue
        out.append(argv[index])
        index += 1
    return out


def _join_token_lists(argv: List[str]) -> List[str]:
    """`--ats-num-tokens 197 197 ...` (several values) -> `--ats-num-tokens [197,197,...]`."""
    out, index = [], 0
    names = ("--ats-num-tokens", "--ats_num_tokens")
    while index < len(argv):
        token = argv[index]
        out.append(token)
        index += 1
        if token in names:
            values = []
            while index < len(argv) and re.fullmatch(r"[-+]?\d+", argv[index]):
                values.append(argv[index])
                index += 1
            if len(values) == 1:
                out.append(values[0])
            elif values:
                out.append(_literal(values))
    return out


def translate_argv(argv: Sequence[str]) -> List[str]:
    """The official launch line's argv as main.py flags (anything else passes through, with
    several `--ats-num-tokens` values joined into one list)."""
    argv = list(argv)
    path = _cfg_path(argv)
    slowfast = is_slowfast_config(path) if path else False
    cfg_path, overrides, rest = _split_argv(argv, any_section=slowfast)
    if not slowfast and not overrides:
        return _join_token_lists(argv)
    if cfg_path and not slowfast:
        raise ModelConfigError(f"SECTION.KEY overrides ({overrides[0][0]} ...) need an official ATS config "
                               f"(--cfg with TRAIN/TEST/DATA/VIT sections); {cfg_path} is not one")
    cfg, explicit = load_config(cfg_path if slowfast else None, overrides)
    ignored = _unmapped_changes(cfg, explicit)
    if ignored:
        _logger.warning("official config keys without an equivalent here, ignored: %s", ", ".join(ignored))
    return config_to_argv(cfg, explicit) + _join_token_lists(_drop_slowfast_flags(rest))
