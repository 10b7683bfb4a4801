"""The schemas of sweep files and study files (the same mechanism as run configs: :mod:`exactgn.lab.schema`).

These models check a file's shape: keys, types, ranges, and the rules within one file (a ``[random]`` table
needs ``method = "random"``; a key is varied in one table only). What needs the run configurations (every
trial's config is valid, a study's runs can start from each other's weights) is checked by
:mod:`exactgn.lab.sweep` and :mod:`exactgn.lab.study`, which build those configurations.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import Discriminator, Field, Tag, model_validator

from .schema import Table

__all__ = [
    "METHODS",
    "BACKENDS",
    "DISTRIBUTIONS",
    "NAME_PATTERN",
    "SweepFile",
    "StudyFile",
    "StudyRunTable",
    "Resources",
]

METHODS = ("grid", "random")
BACKENDS = ("auto", "ray", "sequential")
DISTRIBUTIONS = ("choice", "uniform", "log_uniform", "int_uniform")
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
_NAME_DOC = "a folder name of letters, digits, '-', '_' or '.'"


# ---------------------------------------------------------------------------- sweep distributions
def _bounds(pair: list[float], kind: str, positive: bool = False) -> None:
    if len(pair) != 2:
        raise ValueError(f"{kind} needs [lo, hi], got {pair!r}")
    if positive and not 0 < pair[0] <= pair[1]:
        raise ValueError(f"{kind} needs 0 < lo <= hi, got {pair!r}")
    if not pair[0] <= pair[1]:
        raise ValueError(f"{kind} needs lo <= hi, got {pair!r}")


class Choice(Table):
    """``{ choice = [a, b, ...] }``: one of the values, uniformly."""

    choice: list[Any] = Field(min_length=1)


class Uniform(Table):
    """``{ uniform = [lo, hi] }``."""

    uniform: list[float]

    @model_validator(mode="after")
    def _check(self) -> Uniform:
        _bounds(self.uniform, "uniform")
        return self


class LogUniform(Table):
    """``{ log_uniform = [lo, hi] }``: uniform in ``log``; ``0 < lo``."""

    log_uniform: list[float]

    @model_validator(mode="after")
    def _check(self) -> LogUniform:
        _bounds(self.log_uniform, "log_uniform", positive=True)
        return self


class IntUniform(Table):
    """``{ int_uniform = [lo, hi] }``: an integer in ``[lo, hi]``."""

    int_uniform: list[int]

    @model_validator(mode="after")
    def _check(self) -> IntUniform:
        _bounds(self.int_uniform, "int_uniform")
        return self


def _distribution_kind(value: Any) -> str | None:
    if isinstance(value, dict) and len(value) == 1 and next(iter(value)) in DISTRIBUTIONS:
        return next(iter(value))
    return None


Distribution = Annotated[
    Union[
        Annotated[Choice, Tag("choice")],
        Annotated[Uniform, Tag("uniform")],
        Annotated[LogUniform, Tag("log_uniform")],
        Annotated[IntUniform, Tag("int_uniform")],
    ],
    Discriminator(
        _distribution_kind,
        custom_error_type="distribution",
        custom_error_message="must be one of { choice = [...] }, { uniform = [lo, hi] }, "
        "{ log_uniform = [lo, hi] }, { int_uniform = [lo, hi] }",
    ),
]


# ---------------------------------------------------------------------------- sweep files
class Resources(Table):
    """``[resources]``: what one trial gets."""

    cpus_per_trial: int = Field(1, ge=1)
    gpus_per_trial: Any = "auto"  # "auto" (1 with CUDA, else 0) or a number >= 0

    @model_validator(mode="after")
    def _check(self) -> Resources:
        gpus = self.gpus_per_trial
        if gpus != "auto" and (isinstance(gpus, bool) or not isinstance(gpus, (int, float)) or gpus < 0):
            raise ValueError(f'resources.gpus_per_trial: must be "auto" or a number >= 0, got {gpus!r}')
        return self


class RayTable(Table):
    """``[ray]``: ``address = ""`` starts a local Ray instance; ``"auto"`` or ``"ray://HOST:10001"`` joins
    one."""

    address: str = ""


class SweepFile(Table):
    """A sweep file (see :mod:`exactgn.lab.sweep`)."""

    name: str = Field(min_length=1)
    base: str = Field(min_length=1)
    method: Literal[METHODS] = "grid"  # type: ignore[valid-type]
    samples: int = Field(1, ge=1)
    seed: int = Field(0, ge=0)
    backend: Literal[BACKENDS] = "auto"  # type: ignore[valid-type]
    description: str = ""
    fixed: dict[str, Any] = Field(default_factory=dict, alias="set")
    grid: dict[str, Annotated[list[Any], Field(min_length=1)]] = Field(default_factory=dict)
    random: dict[str, Distribution] = Field(default_factory=dict)
    resources: Resources = Resources()
    ray: RayTable = RayTable()

    @model_validator(mode="after")
    def _tables(self) -> SweepFile:
        if self.method == "grid" and self.random:
            raise ValueError('random: [random] needs method = "random"')
        if self.method == "random" and not self.random:
            raise ValueError('method: method = "random" needs a [random] table')
        overlap = (set(self.grid) & set(self.random)) | (
            set(self.fixed) & (set(self.grid) | set(self.random))
        )
        if overlap:
            raise ValueError(f"key(s) {sorted(overlap)} appear in more than one of [set], [grid], [random]")
        return self

    def distributions(self) -> dict[str, tuple[str, list[Any]]]:
        """``[random]`` as key → (kind, argument)."""
        return {key: next(iter(dist.model_dump().items())) for key, dist in self.random.items()}


# ---------------------------------------------------------------------------- study files
class StudyRunTable(Table):
    """One ``[[run]]`` of a study file."""

    name: str = Field(pattern=NAME_PATTERN, description=_NAME_DOC)
    config: str = Field(min_length=1)  # a shipped experiment (e.g. mnist-minibatch-cpu/gn) or a TOML file
    fixed: dict[str, Any] = Field(default_factory=dict, alias="set")
    init_from: str | None = None  # an earlier run of the study
    init_epoch: int | None = Field(None, ge=0)  # its checkpoints/epoch_NNNN.pt instead of last.pt
    description: str = ""

    @model_validator(mode="after")
    def _check(self) -> StudyRunTable:
        if self.init_epoch is not None and self.init_from is None:
            raise ValueError("init_epoch: needs init_from (the run whose epoch checkpoint to start from)")
        if self.init_from is not None and "model.init_from" in self.fixed:
            raise ValueError(
                "init_from: give either init_from (an earlier run) or model.init_from (a path), not both"
            )
        return self


class StudyFile(Table):
    """A list-of-runs study file (see :mod:`exactgn.lab.study`)."""

    name: str = Field(pattern=NAME_PATTERN, description=_NAME_DOC)
    description: str = ""
    fixed: dict[str, Any] = Field(default_factory=dict, alias="set")
    run: list[StudyRunTable] = Field(min_length=1)
