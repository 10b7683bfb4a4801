"""Run configurations: TOML files ↔ validated models, ``--set key=value`` overrides, the shipped experiments.

A run is described by one TOML file with the tables ``[data]``, ``[model]``, ``[optim]`` (and one
``[optim.<name>]`` table per optimiser), ``[train]`` and ``[diagnostics]``, plus top-level ``name``,
``description`` and ``seed``. Every key has a default (see the models below), so a file lists only what it
changes. The models are pydantic models (:mod:`exactgn.lab.schema`): unknown keys and values of the wrong type
are errors that name the dotted key, e.g. ``optim.lr: expected a number, got 'abc'``. :func:`dumps` writes the
fully resolved configuration back as TOML.

Shipped experiments live in ``exactgn/lab/configs/experiments/<setting>/<optimiser>.toml`` and are named
``<setting>/<optimiser>`` (e.g. ``mnist-fullbatch/gn``); :func:`find_config` accepts either a path or a name.
"""

from __future__ import annotations

import difflib
import math
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from ..gn import INVERSES
from ..losses import HESSIANS, LOSSES
from ..models import ACTIVATIONS as MODEL_ACTIVATIONS
from ..precision import DTYPES
from .data import DATASETS, SUBSETS
from .rundir import config_path
from .schema import ConfigError, Table, field_names, nested_table, unknown_key, validate_table

__all__ = [
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "MODEL_KINDS",
    "ignored_model_keys",
    "GNConfig",
    "AdamConfig",
    "AdamWConfig",
    "SGDConfig",
    "OptimConfig",
    "TrainConfig",
    "DiagnosticsConfig",
    "RunConfig",
    "OPTIMISERS",
    "EXPERIMENTS_DIR",
    "BOOKKEEPING_KEYS",
    "EXECUTION_KEYS",
    "RESUMABLE_KEYS",
    "load_config",
    "loads_config",
    "from_dict",
    "to_dict",
    "apply_overrides",
    "with_overrides",
    "replace_key",
    "parse_override",
    "dumps",
    "toml_value",
    "write_config",
    "find_config",
    "find_shipped",
    "list_experiments",
    "list_settings",
    "read_toml",
    "read_run_config",
    "flatten",
]

EXPERIMENTS_DIR = Path(__file__).resolve().parent / "configs" / "experiments"

# ---------------------------------------------------------------------------- schema
Pair = list[float]


def _pair_ok(pair: list[float]) -> bool:
    return len(pair) == 2 and all(math.isfinite(p) for p in pair) and 0 < pair[0] <= pair[1]


class DataConfig(Table):
    """``[data]``: which images, how many, and augmentation."""

    # type: ignore[valid-type]  # a key of exactgn.lab.data.DATASETS
    dataset: Literal[DATASETS] = "mnist-small"
    root: str = ""  # data root; "" = --data-root or $EXACTGN_DATA
    download: bool = False  # fetch missing files with torchvision
    train_size: int = Field(0, ge=0)  # training images to keep; 0 = all
    # type: ignore[valid-type]  # first (reference) | balanced (seeded draw)
    subset: Literal[SUBSETS] = "first"
    subset_seed: int = 0
    test_size: int = Field(0, ge=0)  # first N test images; 0 = all
    # Validation images held out of the *training* file (never the test file), logged as val_loss and
    # val_accuracy: a uniform seeded draw from the images outside the training subset (train_size = 0: from
    # all, and training gets the rest). 0 = no validation set. Rule: exactgn.lab.data.split_indices.
    val_size: int = Field(0, ge=0)
    val_seed: int = Field(0, ge=0)
    augment: bool = False  # random-resized-crop of every training batch
    crop_scale: Pair = [0.08, 1.0]
    crop_ratio: Pair = [0.75, 1.33]

    @model_validator(mode="after")
    def _crops(self) -> DataConfig:
        for key in ("crop_scale", "crop_ratio"):
            if not _pair_ok(getattr(self, key)):
                raise ValueError(f"data.{key}: expected two numbers 0 < lo <= hi, got {getattr(self, key)!r}")
        if self.crop_scale[1] > 1:
            raise ValueError(f"data.crop_scale: the area fraction cannot exceed 1, got {self.crop_scale!r}")
        return self


#: ``model.kind`` → what it builds: the RevMLP, and the two models of :mod:`exactgn.models`.
MODEL_KINDS = ("revmlp", "mlp", "resmlp")
ACTIVATIONS = tuple(MODEL_ACTIVATIONS)  # MLP only
MLP_INITS = ("fan_in", "std")


class ModelConfig(Table):
    """``[model]``: which network (``d`` and ``k`` come from the dataset).

    ``kind = "revmlp"`` (default) and ``"resmlp"`` read ``blocks``, ``hidden``, ``bottleneck``, ``bias`` and
    ``init_std``; ``kind = "mlp"`` reads ``widths``, ``activation``, ``bias``, ``init`` and (with ``init =
    "std"``) ``init_std``. Keys a kind does not read are ignored (a resolved config lists them all).
    """

    # type: ignore[valid-type]  # revmlp | mlp (exactgn.models.MLP) | resmlp (exactgn.models.ResMLP)
    kind: Literal[MODEL_KINDS] = "revmlp"
    blocks: int = Field(2, ge=1)  # L coupling blocks (revmlp) or residual blocks (resmlp)
    hidden: int = Field(1024, ge=1)  # bottleneck width h
    bottleneck: bool = True  # false: the variant without bottleneck (W is d/2 × d/2)
    bias: bool = True
    init_std: float = Field(1e-3, ge=0, allow_inf_nan=False)
    widths: list[int] = [1024, 1024]  # mlp: hidden widths w_1 … w_m ([] = a linear model)
    activation: Literal[ACTIVATIONS] = "relu"  # type: ignore[valid-type]  # mlp: between the layers
    init: Literal[MLP_INITS] = "fan_in"  # type: ignore[valid-type]  # mlp: gain/√fan_in, or N(0, init_std²)
    dtype: Literal[tuple(DTYPES)] = "float32"  # type: ignore[valid-type]
    # Start from the weights of an earlier run instead of a fresh draw: a checkpoint file
    # (RUN/checkpoints/last.pt or epoch_NNNN.pt) or a run folder (its checkpoints/last.pt); "" = fresh init.
    # The optimiser starts fresh; seed still drives the data order (exactgn.lab.checkpoint.load_init_weights).
    init_from: str = ""

    @model_validator(mode="after")
    def _path(self) -> ModelConfig:
        bad = [w for w in self.widths if w < 1]
        if bad:
            raise ValueError(f"model.widths: every width must be an integer >= 1, got {self.widths!r}")
        if self.init_from != self.init_from.strip():
            raise ValueError(f"model.init_from: the path has surrounding spaces: {self.init_from!r}")
        return self


#: The ``[model]`` keys each kind reads; a resolved configuration lists the others too, at their defaults.
_SHARED_MODEL_KEYS = ("kind", "bias", "dtype", "init_from")
MODEL_KEYS_READ = {
    "revmlp": (*_SHARED_MODEL_KEYS, "blocks", "hidden", "bottleneck", "init_std"),
    "resmlp": (*_SHARED_MODEL_KEYS, "blocks", "hidden", "bottleneck", "init_std"),
    "mlp": (*_SHARED_MODEL_KEYS, "widths", "activation", "init", "init_std"),
}


def ignored_model_keys(config: dict[str, Any]) -> set[str]:
    """The dotted ``model.*`` keys of a configuration (nested dict) that its ``model.kind`` does not read
    (e.g. ``model.widths`` of a RevMLP); labels and comparisons leave them out."""
    model = config.get("model", {})
    kind = model.get("kind", "revmlp")
    read = set(MODEL_KEYS_READ.get(kind, model))
    if kind == "mlp" and model.get("init", "fan_in") == "fan_in":
        read.discard("init_std")
    return {f"model.{key}" for key in model if key not in read}


class GNConfig(Table):
    """``[optim.gn]``: settings of the Gauss–Newton direction (see :class:`exactgn.GaussNewton`)."""

    inverse: Literal[INVERSES] = "right"  # type: ignore[valid-type]  # right (J♭, includes 1/L) | pinv (J⁺)
    # type: ignore[valid-type]  # identity (reference) | exact (CE only)
    hessian: Literal[HESSIANS] = "identity"
    rtol: float = Field(0.0, ge=0, allow_inf_nan=False)
    atol: float = Field(0.0, ge=0, allow_inf_nan=False)
    damping: float = Field(0.0, ge=0, allow_inf_nan=False)
    noise: float = Field(0.0, ge=0, allow_inf_nan=False)
    least_squares: bool = False  # accept batches too large for an exact step
    solve_dtype: Literal[("model", *DTYPES)] = "model"  # type: ignore[valid-type]


def _betas(betas: list[float], key: str) -> None:
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise ValueError(f"{key}: expected two numbers in [0, 1), got {betas!r}")


class AdamConfig(Table):
    """``[optim.adam]``: ``torch.optim.Adam``'s settings."""

    betas: Pair = [0.9, 0.999]
    eps: float = Field(1e-8, ge=0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _check(self) -> AdamConfig:
        _betas(self.betas, "optim.adam.betas")
        return self


class AdamWConfig(Table):
    """``[optim.adamw]``: ``torch.optim.AdamW`` (decoupled weight decay: ``optim.weight_decay``)."""

    betas: Pair = [0.9, 0.999]
    eps: float = Field(1e-8, ge=0, allow_inf_nan=False)
    amsgrad: bool = False

    @model_validator(mode="after")
    def _check(self) -> AdamWConfig:
        _betas(self.betas, "optim.adamw.betas")
        return self


class SGDConfig(Table):
    """``[optim.sgd]``: ``torch.optim.SGD``'s settings (heavy-ball or Nesterov momentum)."""

    momentum: float = Field(0.0, ge=0, allow_inf_nan=False)
    nesterov: bool = False

    @model_validator(mode="after")
    def _check(self) -> SGDConfig:
        if self.nesterov and self.momentum == 0:
            raise ValueError("optim.sgd.nesterov: Nesterov momentum needs optim.sgd.momentum > 0")
        return self


#: Optimiser name → its ``[optim.<name>]`` table; ``exactgn.lab.steppers.STEPPERS`` has one stepper for each.
OPTIMISER_TABLES: dict[str, type[Table]] = {
    "gn": GNConfig,
    "adam": AdamConfig,
    "sgd": SGDConfig,
    "adamw": AdamWConfig,
}
OPTIMISERS = tuple(OPTIMISER_TABLES)


class OptimConfig(Table):
    """``[optim]``: which optimiser and its learning rate; the per-optimiser tables hold the rest."""

    name: Literal[OPTIMISERS] = "gn"  # type: ignore[valid-type]
    lr: float = Field(0.1, gt=0, allow_inf_nan=False)  # lr = 0 would train nothing
    weight_decay: float = Field(0.0, ge=0, allow_inf_nan=False)
    gn: GNConfig = GNConfig()
    adam: AdamConfig = AdamConfig()
    sgd: SGDConfig = SGDConfig()
    adamw: AdamWConfig = AdamWConfig()


_DEVICE_RE = r"^(auto|cpu|cuda|mps|cuda:\d+)$"


class TrainConfig(Table):
    """``[train]``: the loop."""

    epochs: int = Field(100, ge=0)
    batch_size: int = Field(1000, ge=0)  # 0 = full batch (the whole training set every step)
    shuffle: bool = True  # reshuffle the training set every epoch (seeded)
    drop_last: bool = False
    loss: Literal[LOSSES] = "cross_entropy"  # type: ignore[valid-type]
    loss_after: bool = True  # log the loss on the same batch after each step (one extra forward pass)
    eval_batch_size: int = Field(2000, ge=1)
    checkpoint_every: int = Field(10, ge=0)  # epochs between checkpoints; 0 = only at the end (and on Ctrl-C)
    keep_checkpoints: bool = False  # also keep checkpoints/epoch_NNNN.pt at those times
    device: str = Field("auto", pattern=_DEVICE_RE, description="auto, cpu, cuda, cuda:N or mps")
    threads: int = Field(0, ge=0)  # torch.set_num_threads; 0 = auto (lab.cores: share with live runs)


class DiagnosticsConfig(Table):
    """``[diagnostics]``: NTK/CKA/weight diagnostics (see ``exactgn.lab.diagnostics``)."""

    enabled: bool = False
    every: int = Field(1, ge=1)  # epochs between records
    probe_size: int = Field(256, ge=1)  # images in the fixed probe batch


class RunConfig(Table):
    """One training run."""

    name: str = "run"
    description: str = ""
    seed: int = Field(0, ge=0, le=2**62)  # model initialisation and data order (torch seeds are 64-bit)
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    diagnostics: DiagnosticsConfig = DiagnosticsConfig()

    @model_validator(mode="after")
    def _across_tables(self) -> RunConfig:
        if not self.name or any(c in self.name for c in "/\\") or self.name.strip() != self.name:
            raise ValueError(
                f"name: must be a non-empty name without slashes or surrounding spaces, got {self.name!r}"
            )
        if self.optim.name == "gn" and self.optim.gn.inverse == "right" and self.model.kind != "revmlp":
            raise ValueError(
                f"optim.gn.inverse: 'right' (the right inverse J♭) exists only for model.kind = 'revmlp', "
                f"whose blocks can be inverted; model.kind = {self.model.kind!r} needs optim.gn.inverse = "
                '"pinv" (the exact minimum-norm step J⁺v)'
            )
        if self.optim.gn.hessian == "exact" and self.train.loss == "mse":
            raise ValueError(
                "optim.gn.hessian: 'exact' applies to cross-entropy; MSE's Hessian is the identity already"
            )
        return self


#: Keys that say where or how fast a run executes, not what it computes (a study reruns nothing for them).
EXECUTION_KEYS = ("data.root", "data.download", "train.device", "train.threads", "train.eval_batch_size")
#: Keys a resumed run may change: the execution keys, how long it trains and what it keeps.
RESUMABLE_KEYS = ("train.epochs", "train.checkpoint_every", "train.keep_checkpoints", *EXECUTION_KEYS)
#: Keys that do not define a setting: two runs differing only here (and in seeds) are seeds of one setting.
BOOKKEEPING_KEYS = (
    "name",
    "description",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    *EXECUTION_KEYS,
)


def from_dict(data: dict[str, Any]) -> RunConfig:
    """A :class:`RunConfig` from nested dicts (as ``tomllib`` gives them), checked and validated."""
    return validate_table(RunConfig, data)


def to_dict(cfg: Table) -> dict[str, Any]:
    """Nested plain dicts, every key present."""
    return cfg.model_dump()


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


def _set_key(data: dict[str, Any], key: str, value: Any) -> None:
    cls: type[Table] | None = RunConfig
    node = data
    parts = key.split(".")
    for depth, part in enumerate(parts):
        full = ".".join(parts[: depth + 1])
        if part not in cls.model_fields:
            raise unknown_key(full, field_names(cls))
        child_cls = nested_table(cls, part)
        if depth == len(parts) - 1:
            if child_cls is not None:
                raise ConfigError(
                    f"--set {key}: [{key}] is a table; set one of its keys, e.g. {key}.<key>=..."
                )
            node[part] = value
            return
        if child_cls is None:
            raise ConfigError(f"--set {key}: {full} is a value, not a table")
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{full}: expected a table, got {child!r}")
        cls, node = child_cls, child


def apply_overrides(data: dict[str, Any], overrides: list[str] | dict[str, Any]) -> dict[str, Any]:
    """Apply ``KEY=VALUE`` overrides (dotted keys) to nested dicts, in place; returns ``data``.

    Keys are checked against the schema here, so a typo is an error rather than a silently ignored setting.
    """
    items = overrides.items() if isinstance(overrides, dict) else (parse_override(o) for o in overrides)
    for key, value in items:
        _set_key(data, key, value)
    return data


def with_overrides(cfg: RunConfig, overrides: list[str] | dict[str, Any]) -> RunConfig:
    """A new, validated :class:`RunConfig`: ``cfg`` with ``overrides`` applied."""
    return from_dict(apply_overrides(to_dict(cfg), overrides))


def replace_key(cfg: RunConfig, key: str, value: Any) -> RunConfig:
    """A new, validated :class:`RunConfig` with one dotted ``key`` set to ``value``."""
    return with_overrides(cfg, {key: value})


# ---------------------------------------------------------------------------- files
def loads_config(
    text: str, overrides: list[str] | dict[str, Any] = (), *, source: str = "<string>"
) -> RunConfig:
    """Parse TOML text (plus overrides) into a validated :class:`RunConfig`."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: invalid TOML: {exc}") from exc
    overrides = list(overrides) if not isinstance(overrides, dict) else overrides
    apply_overrides(data, overrides)
    try:
        return from_dict(data)
    except ConfigError as exc:
        keys = overrides if isinstance(overrides, dict) else [parse_override(o)[0] for o in overrides]
        if any(str(exc).startswith(f"{key}:") for key in keys):  # the override's fault, not the file's
            raise ConfigError(f"--set {exc} (the value given with --set, not in {source})") from exc
        raise ConfigError(f"{source}: {exc}") from exc


def load_config(path: str | Path, overrides: list[str] | dict[str, Any] = ()) -> RunConfig:
    """Load a TOML run configuration (a path or a shipped experiment name) with ``--set`` overrides."""
    resolved = find_config(path)
    try:
        text = resolved.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{resolved}: cannot read: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{resolved}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from exc
    return loads_config(text, overrides, source=str(resolved))


def list_experiments() -> list[str]:
    """Names of the shipped experiments, ``<setting>/<optimiser>``."""
    return sorted(
        p.relative_to(EXPERIMENTS_DIR).with_suffix("").as_posix() for p in EXPERIMENTS_DIR.rglob("*.toml")
    )


def list_settings() -> list[str]:
    """Shipped settings: folders of experiments, one file per optimiser (for ``exactgn compare``)."""
    return sorted(
        p.relative_to(EXPERIMENTS_DIR).as_posix()
        for p in EXPERIMENTS_DIR.rglob("*")
        if p.is_dir() and any((p / f"{o}.toml").is_file() for o in OPTIMISERS)
    )


def find_shipped(
    name: str | Path, folder: Path, shipped: list[str], what: str, kinds: tuple[str, str]
) -> Path:
    """An existing file ``name``, else ``folder/<name>.toml`` (``.toml`` optional) among the ``shipped``
    names.

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
    """A config path: an existing file, else a shipped experiment ``<setting>/<optimiser>`` (``.toml``
    optional)."""
    return find_shipped(name, EXPERIMENTS_DIR, list_experiments(), "config", ("experiment", "experiments"))


def read_toml(path: str | Path) -> dict[str, Any]:
    """A TOML file as a dict; :class:`ConfigError` naming the file when it cannot be read or parsed."""
    path = Path(path)
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc


def read_run_config(run_dir: str | Path) -> dict[str, Any]:
    """A run folder's ``config.toml`` as nested dicts (not validated: old runs stay readable)."""
    path = config_path(run_dir)
    if not path.is_file():
        raise FileNotFoundError(f"run folder {run_dir} has no config.toml (see docs/run-folder.md)")
    return read_toml(path)


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
    """Nested dicts (or a configuration model) as TOML: scalars first, then one ``[table]`` per nested
    dict."""
    if isinstance(data, Table):
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
