"""Run configurations: TOML files ↔ dataclasses, ``--set key=value`` overrides, and the shipped experiments.

A run is described by one TOML file with the tables ``[data]``, ``[model]``, ``[optim]`` (and ``[optim.gn]``,
``[optim.adam]``, ``[optim.sgd]``), ``[train]`` and ``[diagnostics]``, plus top-level ``name``,
``description`` and ``seed``. Every key has a default (see the dataclasses below), so a file lists only what it
changes. Unknown keys and values of the wrong type are errors that name the key, e.g.
``optim.lr: expected a number, got 'abc'``. :func:`dumps` writes the fully resolved configuration back as TOML.

Shipped experiments live in ``exactgn/experiments/<setting>/<optimiser>.toml`` and are named
``<setting>/<optimiser>`` (e.g. ``mnist-fullbatch/gn``); :func:`find_config` accepts either a path or a name.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "GNConfig",
    "AdamConfig",
    "SGDConfig",
    "OptimConfig",
    "TrainConfig",
    "DiagnosticsConfig",
    "RunConfig",
    "EXPERIMENTS_DIR",
    "load_config",
    "loads_config",
    "from_dict",
    "to_dict",
    "apply_overrides",
    "parse_override",
    "dumps",
    "toml_value",
    "write_config",
    "find_config",
    "list_experiments",
    "list_settings",
    "validate",
]

EXPERIMENTS_DIR = Path(__file__).resolve().parent / "experiments"

OPTIMISERS = ("gn", "adam", "sgd")


class ConfigError(ValueError):
    """A configuration is invalid; the message names the key."""


# ---------------------------------------------------------------------------- schema
@dataclass
class DataConfig:
    """``[data]``: which images, how many, and augmentation."""

    dataset: str = "mnist-small"  # mnist | cifar10 | mnist-small (bundled, no download)
    root: str = ""  # data root; "" = --data-root or $EXACTGN_DATA
    download: bool = False  # fetch missing files with torchvision
    train_size: int = 0  # training images to keep; 0 = all
    subset: str = "first"  # first (reference) | balanced (seeded class-balanced draw)
    subset_seed: int = 0
    test_size: int = 0  # first N test images; 0 = all
    # Validation images held out of the *training* file (never the test file), logged as val_loss and
    # val_accuracy: a uniform seeded draw from the images outside the training subset (train_size = 0: from
    # all, and training gets the rest). 0 = no validation set. Rule: exactgn.data.split_indices.
    val_size: int = 0
    val_seed: int = 0
    augment: bool = False  # random-resized-crop of every training batch
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    crop_ratio: list[float] = field(default_factory=lambda: [0.75, 1.33])


@dataclass
class ModelConfig:
    """``[model]``: the RevMLP (``d`` and ``k`` come from the dataset)."""

    blocks: int = 2  # L coupling blocks
    hidden: int = 1024  # bottleneck width h
    bottleneck: bool = True  # false: the variant without bottleneck (W is d/2 × d/2)
    bias: bool = True
    init_std: float = 1e-3
    dtype: str = "float32"  # float32 | float64
    # Start from the weights of an earlier run instead of a fresh draw: a checkpoint file
    # (RUN/checkpoints/last.pt or epoch_NNNN.pt) or a run folder (its checkpoints/last.pt); "" = fresh init.
    # The optimiser starts fresh; seed still drives the data order. See exactgn.train.load_init_weights.
    init_from: str = ""


@dataclass
class GNConfig:
    """``[optim.gn]``: settings of the Gauss–Newton direction (see :class:`exactgn.GaussNewton`)."""

    inverse: str = "right"  # right (J♭, the reference method, includes 1/L) | pinv (J⁺, minimum norm)
    hessian: str = "identity"  # identity (reference) | exact (cross-entropy only)
    rtol: float = 0.0
    atol: float = 0.0
    damping: float = 0.0
    noise: float = 0.0
    least_squares: bool = False  # accept batches too large for an exact step
    solve_dtype: str = "model"  # model | float32 | float64


@dataclass
class AdamConfig:
    """``[optim.adam]``: ``torch.optim.Adam``'s settings."""

    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8


@dataclass
class SGDConfig:
    """``[optim.sgd]``: ``torch.optim.SGD``'s settings."""

    momentum: float = 0.0
    nesterov: bool = False


@dataclass
class OptimConfig:
    """``[optim]``: which optimiser and its learning rate; the per-optimiser tables hold the rest."""

    name: str = "gn"  # gn | adam | sgd
    lr: float = 0.1
    weight_decay: float = 0.0
    gn: GNConfig = field(default_factory=GNConfig)
    adam: AdamConfig = field(default_factory=AdamConfig)
    sgd: SGDConfig = field(default_factory=SGDConfig)


@dataclass
class TrainConfig:
    """``[train]``: the loop."""

    epochs: int = 100
    batch_size: int = 1000  # 0 = full batch (the whole training set every step)
    shuffle: bool = True  # reshuffle the training set every epoch (seeded)
    drop_last: bool = False
    loss: str = "cross_entropy"  # cross_entropy | mse
    loss_after: bool = True  # log the loss on the same batch after each step (one extra forward pass)
    eval_batch_size: int = 2000
    checkpoint_every: int = 10  # epochs between checkpoints; 0 = only at the end (and on Ctrl-C)
    keep_checkpoints: bool = False  # also keep checkpoints/epoch_NNNN.pt at those times
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    threads: int = 0  # torch.set_num_threads; 0 = torch's default


@dataclass
class DiagnosticsConfig:
    """``[diagnostics]``: NTK/CKA/weight diagnostics (see ``exactgn.diagnostics``)."""

    enabled: bool = False
    every: int = 1  # epochs between records
    probe_size: int = 256  # images in the fixed probe batch


@dataclass
class RunConfig:
    """One training run."""

    name: str = "run"
    description: str = ""
    seed: int = 0  # model initialisation and data order
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)


# Closed choices, checked by :func:`validate`.
CHOICES: dict[str, tuple[str, ...]] = {
    "data.dataset": ("mnist", "cifar10", "mnist-small"),
    "data.subset": ("first", "balanced"),
    "model.dtype": ("float32", "float64"),
    "optim.name": OPTIMISERS,
    "optim.gn.inverse": ("right", "pinv"),
    "optim.gn.hessian": ("identity", "exact"),
    "optim.gn.solve_dtype": ("model", "float32", "float64"),
    "train.loss": ("cross_entropy", "mse"),
}


# ---------------------------------------------------------------------------- dict ↔ dataclass
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _describe(value: Any) -> str:
    if isinstance(value, dict):
        return "a table"
    return repr(value)


def _coerce(key: str, hint: Any, value: Any) -> Any:
    """Check ``value`` against the field type ``hint``; ints are accepted for floats."""
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {_describe(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {_describe(value)}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {_describe(value)}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {_describe(value)}")
        return value
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {_describe(value)}")
        return [_coerce(f"{key}[{i}]", item, v) for i, v in enumerate(value)]
    raise TypeError(f"unsupported config field type {hint!r} for {key}")  # a bug in the schema


def _unknown(key: str, known: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], known, n=1, cutoff=0.5)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    table = key.rsplit(".", 1)[0] if "." in key else ""
    where = f"[{table}]" if table else "the top level"
    return ConfigError(f"{key}: unknown key{hint}; the keys of {where} are: {', '.join(known)}")


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in hints:
            raise _unknown(full, names)
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"{full}: expected a table [{full}], got {_describe(value)}")
            kwargs[key] = _build(hint, value, f"{full}.")
        else:
            if isinstance(value, dict):
                raise ConfigError(f"{full}: expected a value, got a table")
            kwargs[key] = _coerce(full, hint, value)
    return cls(**kwargs)


def from_dict(data: dict[str, Any]) -> RunConfig:
    """A :class:`RunConfig` from nested dicts (as ``tomllib`` gives them), checked and validated."""
    cfg = _build(RunConfig, data, "")
    validate(cfg)
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    """Nested plain dicts, every key present."""
    return dataclasses.asdict(cfg)


# ---------------------------------------------------------------------------- validation
def _get(cfg: RunConfig, key: str) -> Any:
    obj: Any = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def validate(cfg: RunConfig) -> RunConfig:
    """Check choices and ranges; raises :class:`ConfigError` naming the key."""
    for key, choices in CHOICES.items():
        value = _get(cfg, key)
        if value not in choices:
            raise ConfigError(f"{key}: must be one of {', '.join(repr(c) for c in choices)}; got {value!r}")

    def at_least(key: str, minimum: float) -> None:
        value = _get(cfg, key)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key}: must be finite, got {value!r}")
        if value < minimum:
            raise ConfigError(f"{key}: must be >= {minimum}, got {value!r}")

    for key in ("data.train_size", "data.test_size", "data.val_size", "data.val_seed", "train.epochs",
                "train.batch_size", "train.checkpoint_every",
                "train.threads", "optim.lr", "optim.weight_decay", "optim.gn.rtol", "optim.gn.atol",
                "optim.gn.damping", "optim.gn.noise", "optim.sgd.momentum", "model.init_std"):
        at_least(key, 0)
    for key in ("model.blocks", "model.hidden", "train.eval_batch_size", "diagnostics.every", "diagnostics.probe_size"):
        at_least(key, 1)
    at_least("optim.adam.eps", 0)
    betas = cfg.optim.adam.betas
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise ConfigError(f"optim.adam.betas: expected two numbers in [0, 1), got {betas!r}")
    for key in ("data.crop_scale", "data.crop_ratio"):
        pair = _get(cfg, key)
        if len(pair) != 2 or not (0 < pair[0] <= pair[1]) or not all(math.isfinite(p) for p in pair):
            raise ConfigError(f"{key}: expected two numbers 0 < lo <= hi, got {pair!r}")
    if cfg.data.crop_scale[1] > 1:
        raise ConfigError(f"data.crop_scale: the area fraction cannot exceed 1, got {cfg.data.crop_scale!r}")
    if cfg.optim.sgd.nesterov and cfg.optim.sgd.momentum == 0:
        raise ConfigError("optim.sgd.nesterov: Nesterov momentum needs optim.sgd.momentum > 0")
    if cfg.optim.gn.hessian == "exact" and cfg.train.loss == "mse":
        raise ConfigError("optim.gn.hessian: 'exact' applies to cross-entropy; MSE's Hessian is the identity already")
    device = cfg.train.device
    if not (device in ("auto", "cpu", "cuda", "mps") or (device.startswith("cuda:") and device[5:].isdigit())):
        raise ConfigError(f"train.device: expected auto, cpu, cuda, cuda:N or mps, got {device!r}")
    if cfg.model.init_from != cfg.model.init_from.strip():
        raise ConfigError(f"model.init_from: the path has surrounding spaces: {cfg.model.init_from!r}")
    if not cfg.name or any(c in cfg.name for c in "/\\") or cfg.name.strip() != cfg.name:
        raise ConfigError(f"name: must be a non-empty name without slashes or surrounding spaces, got {cfg.name!r}")
    return cfg


# ---------------------------------------------------------------------------- overrides
def parse_override(text: str) -> tuple[str, Any]:
    """``"optim.lr=0.5"`` → ``("optim.lr", 0.5)``. The value is read as a TOML value when it is one
    (numbers, true/false, "strings", [lists]), otherwise taken as a bare string."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. optim.lr=0.5")
    key, raw = (part.strip() for part in text.split("=", 1))
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: the key must be dotted names like optim.lr")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key, value


def apply_overrides(data: dict[str, Any], overrides: list[str] | dict[str, Any]) -> dict[str, Any]:
    """Apply ``KEY=VALUE`` overrides (dotted keys) to nested dicts, in place; returns ``data``.

    Keys are checked against the schema here, so a typo is an error rather than a silently ignored setting.
    """
    items = overrides.items() if isinstance(overrides, dict) else (parse_override(o) for o in overrides)
    for key, value in items:
        cls: Any = RunConfig
        node = data
        parts = key.split(".")
        for depth, part in enumerate(parts):
            hints = _hints(cls)
            full = ".".join(parts[: depth + 1])
            if part not in hints:
                raise _unknown(full, [f.name for f in dataclasses.fields(cls)])
            hint = hints[part]
            last = depth == len(parts) - 1
            if dataclasses.is_dataclass(hint):
                if last:
                    raise ConfigError(f"--set {key}: [{key}] is a table; set one of its keys, e.g. {key}.<key>=...")
                cls = hint
                child = node.setdefault(part, {})
                if not isinstance(child, dict):
                    raise ConfigError(f"{full}: expected a table, got {_describe(child)}")
                node = child
            elif not last:
                raise ConfigError(f"--set {key}: {full} is a value, not a table")
            else:
                node[part] = value
    return data


# ---------------------------------------------------------------------------- files
def loads_config(text: str, overrides: list[str] | dict[str, Any] = (), *, source: str = "<string>") -> RunConfig:
    """Parse TOML text (plus overrides) into a validated :class:`RunConfig`."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: invalid TOML: {exc}") from exc
    apply_overrides(data, list(overrides) if not isinstance(overrides, dict) else overrides)
    try:
        return from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from exc


def load_config(path: str | Path, overrides: list[str] | dict[str, Any] = ()) -> RunConfig:
    """Load a TOML run configuration (a path or a shipped experiment name) with ``--set`` overrides."""
    resolved = find_config(path)
    try:
        text = resolved.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{resolved}: cannot read: {exc.strerror or exc}") from exc
    return loads_config(text, overrides, source=str(resolved))


def list_experiments() -> list[str]:
    """Names of the shipped experiments, ``<setting>/<optimiser>``."""
    return sorted(p.relative_to(EXPERIMENTS_DIR).with_suffix("").as_posix() for p in EXPERIMENTS_DIR.rglob("*.toml"))


def list_settings() -> list[str]:
    """Shipped settings (folders of experiments) that have a file for every optimiser (for ``exactgn compare``)."""
    return sorted(
        p.relative_to(EXPERIMENTS_DIR).as_posix()
        for p in EXPERIMENTS_DIR.rglob("*")
        if p.is_dir() and all((p / f"{o}.toml").is_file() for o in OPTIMISERS)
    )


def find_shipped(name: str | Path, folder: Path, shipped: list[str], what: str, kinds: tuple[str, str]) -> Path:
    """An existing file ``name``, else ``folder/<name>.toml`` (``.toml`` optional) among the ``shipped`` names.

    The error for neither names ``what`` was asked for and suggests close names; ``kinds`` is the singular and
    plural of what ships (``("experiment", "experiments")``).
    """
    path = Path(name)
    if path.is_file():
        return path
    stem = str(name)[:-5] if str(name).endswith(".toml") else str(name)
    candidate = folder / f"{stem}.toml"
    if candidate.is_file():
        return candidate
    close = difflib.get_close_matches(stem, shipped, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; shipped {kinds[1]}: {', '.join(shipped)}"
    raise ConfigError(f"{what} {str(name)!r}: no such file, and no shipped {kinds[0]} of that name{hint}")


def find_config(name: str | Path) -> Path:
    """A config path: an existing file, else a shipped experiment ``<setting>/<optimiser>`` (``.toml`` optional)."""
    return find_shipped(name, EXPERIMENTS_DIR, list_experiments(), "config", ("experiment", "experiments"))


def read_toml(path: str | Path) -> dict[str, Any]:
    """A TOML file as a dict; :class:`ConfigError` naming the file when it cannot be read or parsed."""
    path = Path(path)
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested tables as dotted keys: ``{"optim": {"lr": 1}}`` → ``{"optim.lr": 1}``."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


# ---------------------------------------------------------------------------- TOML writer
def _toml_string(s: str) -> str:
    out = ['"']
    for ch in s:
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def toml_value(value: Any) -> str:
    """One TOML value (bool, int, float, string or list of those)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)  # shortest round-trip form; always has '.', 'e' or is inf/nan
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as a TOML value")


def _bare_key(key: str) -> str:
    return key if key and all(c.isalnum() or c in "-_" for c in key) else _toml_string(key)


def dumps(data: dict[str, Any] | Any, header: str = "") -> str:
    """Nested dicts (or a dataclass) as TOML: scalars first, then one ``[table]`` per nested dict."""
    if dataclasses.is_dataclass(data) and not isinstance(data, type):
        data = to_dict(data)
    lines: list[str] = [f"# {line}".rstrip() for line in header.splitlines()]

    def emit(table: dict[str, Any], path: list[str]) -> None:
        scalars = [(k, v) for k, v in table.items() if not isinstance(v, dict)]
        tables = [(k, v) for k, v in table.items() if isinstance(v, dict)]
        if path and (scalars or not tables):
            if lines:
                lines.append("")
            lines.append("[" + ".".join(_bare_key(p) for p in path) + "]")
        for key, value in scalars:
            lines.append(f"{_bare_key(key)} = {toml_value(value)}")
        for key, value in tables:
            emit(value, path + [key])

    emit(data, [])
    return "\n".join(lines) + "\n"


def write_config(cfg: RunConfig, path: str | Path, header: str = "") -> None:
    """Write the resolved configuration as TOML (atomically)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(dumps(cfg, header), encoding="utf-8")
    tmp.replace(path)
