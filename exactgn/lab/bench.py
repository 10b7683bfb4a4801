"""``exactgn bench``: time a forward pass, an Adam step and both GN steps on one model, in one process.

``--model revmlp`` (default) times both GN steps of a RevMLP; ``--model mlp`` and ``--model resmlp`` time the
minimum-norm step (:mod:`exactgn.generic`; no right inverse exists for them) and count FLOPs with
:func:`exactgn.gn_step_flops`. An MLP's widths default to two hidden layers with as many parameters as the
RevMLP of the same ``d``, ``h``, ``L`` (:func:`exactgn.models.mlp_width_for`).

Speed is reported as ratios to the Adam step measured in the same run (machines are shared and noisy), with
the floating-point work each step must do (:func:`step_flops`) so that a reader can see how close each step
comes to its floor.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..core import GRAM_CHUNKS
from ..generic import gn_step_flops
from ..model import RevMLP, activation_rank_bound
from ..models import MLP, ResMLP, mlp_width_for
from ..optim import GaussNewton
from ..precision import dtype_from_name, matmul_precision
from .rundir import meta_value, provenance

__all__ = ["BenchConfig", "MODELS", "run_bench", "step_flops", "format_table", "build_bench_model"]

STEPS = ("forward", "adam_step", "gn_right_step", "gn_pinv_step")
MODELS = ("revmlp", "mlp", "resmlp")


@dataclass
class BenchConfig:
    """Sizes and settings of one benchmark."""

    features: int = 784
    hidden: int | None = 1024
    blocks: int = 2
    batch: int = 256
    classes: int = 10
    device: str | None = None
    repeats: int = 10
    warmup: int = 2
    dtype: str = "float32"
    solve_dtype: str | None = None
    tf32: bool = False
    rtol: float = 0.0  # truncation of both GN steps (0, 0: exact, Cholesky solves; > 0: eigendecompositions)
    atol: float = 0.0
    seed: int = 0
    model: str = "revmlp"  # revmlp | mlp | resmlp
    widths: list[int] | None = None  # mlp only; None = 2 layers matched to the RevMLP's parameter count

    def mlp_widths(self) -> list[int]:
        """The MLP's hidden widths: :attr:`widths`, or two layers as wide as match the RevMLP's count."""
        if self.widths is not None:
            return list(self.widths)
        rev = RevMLP(self.features, self.classes, self.blocks, self.hidden, dtype=torch.float32)
        count = sum(p.numel() for p in rev.parameters() if p.requires_grad)
        return [mlp_width_for(count, self.features, self.classes, 2)] * 2


def build_bench_model(cfg: BenchConfig, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """The model ``cfg.model`` names, seeded by ``cfg.seed``, on ``device``."""
    if cfg.model not in MODELS:
        raise ValueError(f"model must be one of {', '.join(MODELS)}; got {cfg.model!r}")
    d, k, seed = cfg.features, cfg.classes, cfg.seed
    if cfg.model == "mlp":
        model: nn.Module = MLP(d, k, cfg.mlp_widths(), seed=seed, dtype=dtype)
    elif cfg.model == "resmlp":
        model = ResMLP(d, k, cfg.blocks, cfg.hidden, seed=seed, dtype=dtype)
    else:
        model = RevMLP(d, k, cfg.blocks, cfg.hidden, seed=seed, dtype=dtype)
    return model.to(device)


def step_flops(features: int, hidden: int | None, blocks: int, batch: int, classes: int) -> dict[str, float]:
    """Floating-point operations (multiply and add counted separately) of each step, as implemented.

    Counts the matrix products, Gram matrices and factorisations; elementwise work is left out. Grams are
    counted as exactgn computes them (the lower block triangle in 8 row chunks), and half-layers whose batch
    exceeds their rank bound by their column-Gram least-squares route.
    """
    n, B, k, L = features // 2, batch, classes, blocks
    w = n if hidden is None else hidden
    hl = 2 * L
    proj = 2 * B * n * w if hidden is not None else 0  # u C
    readout = 2 * B * features * k
    layer_fwd = proj + 2 * B * w * n
    forward = hl * layer_fwd + readout
    # Backward: weight gradient 2Bwn, feature gradient 2Bnw, through C; the first half-layer reads the input,
    # which needs no gradient, so it has only its weight gradient.
    backward = hl * (4 * B * n * w + proj) - proj - 2 * B * n * w + readout
    adam = forward + backward
    q = min(GRAM_CHUNKS, B)
    tri = (q + 1) / (2 * q)  # share of a Gram's blocks in its lower block triangle (row chunks)
    gram = 2 * B * B * w * tri + B * B  # K = φφᵀ (+1)
    param_step = 2 * B * n * w
    jvp = proj + 2 * B * w * n
    row_solve = gram + B**3 / 3 + 4 * B * B * n + param_step  # Gram, Cholesky, solve + residual, ΔΘ
    # Half-layers whose batch exceeds their rank bound take the column route (see gn._column_step).
    bounds = [
        (activation_rank_bound(n, w, "identity" if l == 0 else "relu", True), l == 0)
        for l in range(L)
        for _ in (0, 1)
    ]
    right_solves = 0.0
    for c, identity in bounds:
        if B <= c:
            right_solves += row_solve
        else:
            factored = identity and hidden is not None and w > n
            right_solves += (
                (2 * B * n * n if factored else 0)
                + 2 * B * c * c
                + 2 * B * c * n
                + c**3 / 3
                + 2 * c * c * n
                + (2 * n * n * w if factored else 0)
            )
    right = forward + right_solves + (hl - 1) * jvp + 2 * B * k * features
    vjp = k * jvp
    mmt = (hl - 1) * 2 * (B * k) ** 2 * n * tri
    size = B * k
    shortcut = (k * B - k) * 2 * w * n  # the last half-layer's cotangent is the same for every sample
    pinv = (
        forward
        + (hl - 1) * vjp
        - shortcut
        + hl * gram
        + mmt
        + size**3 / 3
        + 2 * size**2
        + hl * (param_step + 2 * k * B * n)
    )
    return {"forward": forward, "adam_step": adam, "gn_right_step": right, "gn_pinv_step": pinv}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(
    fn: Callable[[], object], device: torch.device, repeats: int, warmup: int
) -> tuple[float, list[float], int | None]:
    for _ in range(warmup):
        fn()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return statistics.median(times), times, peak


def _cpu_info() -> dict[str, object]:
    """The CPU model (``/proc/cpuinfo``), ``lscpu``'s summary fields where available, and the load average."""
    info: dict[str, object] = {}
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    wanted = (
        "Model name",
        "CPU(s)",
        "Thread(s) per core",
        "Core(s) per socket",
        "Socket(s)",
        "CPU max MHz",
        "Hypervisor vendor",
        "L2 cache",
        "L3 cache",
    )
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    info["lscpu"] = {k: fields[k].strip() for k in wanted if k in fields}
    if hasattr(os, "getloadavg"):
        info["load_average"] = list(os.getloadavg())
    info["cpu_count"] = os.cpu_count()
    return info


def _environment(device: torch.device) -> dict[str, object]:
    """Where the benchmark ran: the provenance keys every exactgn writer uses, the processor and the CPU."""
    env: dict[str, object] = {
        **provenance(device),
        "processor": platform.processor() or platform.machine(),
        **_cpu_info(),
    }
    if device.type != "cuda" and "cpu_model" in env:
        env["device_name"] = env["cpu_model"]
    return env


def _gn_steps(cfg: BenchConfig) -> tuple[str, ...]:
    return ("right", "pinv") if cfg.model == "revmlp" else ("pinv",)


def _sizes(cfg: BenchConfig) -> dict[str, object]:
    sizes: dict[str, object] = dict(features=cfg.features, hidden=cfg.hidden, blocks=cfg.blocks)
    if cfg.model == "mlp":
        sizes = dict(features=cfg.features, widths=cfg.mlp_widths())
    return {**sizes, "batch": cfg.batch, "classes": cfg.classes}


def _counted_flops(cfg: BenchConfig, model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    if cfg.model == "revmlp":
        return step_flops(cfg.features, cfg.hidden, cfg.blocks, cfg.batch, cfg.classes)
    return gn_step_flops(model, x)


def estimate_seconds(
    forward_s: float, flops: dict[str, float], steps: tuple[str, ...], repeats: int, warmup: int
) -> float:
    """Rough time for the remaining ``steps``: each one's counted work at the forward pass's measured speed,
    ``repeats + warmup`` times. Eigendecompositions (truncated steps) run slower than their count suggests."""
    per_flop = forward_s / flops["forward"]
    return sum(flops[s] * per_flop for s in steps) * (repeats + warmup)


def _announce_estimate(
    results: dict[str, object], flops: dict[str, float], cfg: BenchConfig, progress: bool
) -> None:
    """Record (and print) how long the steps after the forward pass will take, before taking them."""
    remaining = ("adam_step", *(f"gn_{inv}_step" for inv in _gn_steps(cfg)))
    results["estimated_s"] = estimate_seconds(results["forward_s"], flops, remaining, cfg.repeats, cfg.warmup)
    if progress:
        print(
            f"  forward: {results['forward_s']:.4g} s; the other steps will take about "
            f"{results['estimated_s']:.0f} s (their counted work at the forward pass's speed)",
            flush=True,
        )


def _time_adam(
    build: Callable[[], nn.Module], x: torch.Tensor, y: torch.Tensor, device: torch.device, cfg: BenchConfig
) -> tuple[float, list[float], int | None]:
    model = build()
    adam = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def adam_step() -> None:
        adam.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        adam.step()

    return _time(adam_step, device, cfg.repeats, cfg.warmup)


def _time_gn(
    build: Callable[[], nn.Module],
    x: torch.Tensor,
    y: torch.Tensor,
    device: torch.device,
    cfg: BenchConfig,
    *,
    inverse: str,
    least_squares: bool,
) -> tuple[float, list[float], int | None, list[str]]:
    """Median, timings and peak memory of one GN step kind, and how its last step solved its Grams."""
    opt = GaussNewton(
        build(),
        lr=0.1,
        inverse=inverse,
        least_squares=least_squares,
        solve_dtype=cfg.solve_dtype,
        rtol=cfg.rtol,
        atol=cfg.atol,
    )
    median, times, peak = _time(lambda: opt.step(x, y), device, cfg.repeats, cfg.warmup)
    return median, times, peak, sorted({s.method for s in opt.last_result.solves})


def run_bench(cfg: BenchConfig, *, progress: bool = True) -> dict[str, object]:
    """Run the benchmark; returns medians in seconds (``forward_s``, ``adam_step_s``, ``gn_pinv_step_s`` and,
    for a RevMLP, ``gn_right_step_s``), every timing, ratios to the Adam step, counted FLOPs, sizes, the
    parameter count and the environment. ``steps`` lists the steps timed."""
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but torch sees no CUDA device; use --device cpu")
    dtype = dtype_from_name(cfg.dtype)
    tf32_ctx = matmul_precision(cfg.tf32) if device.type == "cuda" else nullcontext()
    gen = torch.Generator().manual_seed(cfg.seed)
    x = torch.randn(cfg.batch, cfg.features, generator=gen).to(device, dtype)
    y = torch.randint(0, cfg.classes, (cfg.batch,), generator=gen).to(device)

    def build() -> nn.Module:
        return build_bench_model(cfg, dtype, device)

    probe = build()
    least_squares = cfg.model == "revmlp" and cfg.batch > probe.max_exact_batch
    params = sum(p.numel() for p in probe.parameters() if p.requires_grad)
    flops = _counted_flops(cfg, probe, x)
    probe = None
    results: dict[str, object] = {}
    timings: dict[str, list[float]] = {}
    peaks: dict[str, int | None] = {}
    methods: dict[str, list[str]] = {}  # how the last GN step of each kind solved its Grams

    with tf32_ctx:
        model = build()
        with torch.no_grad():
            fwd = lambda: model(x)  # noqa: E731
            results["forward_s"], timings["forward"], peaks["forward"] = _time(
                fwd, device, cfg.repeats, cfg.warmup
            )
        model = None  # free it before the next build (closures below rebind it)
        _announce_estimate(results, flops, cfg, progress)
        results["adam_step_s"], timings["adam_step"], peaks["adam_step"] = _time_adam(
            build, x, y, device, cfg
        )
        for inverse in _gn_steps(cfg):
            key = f"gn_{inverse}_step"
            timed = _time_gn(build, x, y, device, cfg, inverse=inverse, least_squares=least_squares)
            results[f"{key}_s"], timings[key], peaks[key], methods[key] = timed
            if progress:
                print(f"  {key}: {results[f'{key}_s']:.4g} s", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()

    steps = tuple(s for s in STEPS if s in timings)
    adam_s = results["adam_step_s"]
    results.update(
        model=cfg.model,
        steps=list(steps),
        parameters=params,
        sizes=_sizes(cfg),
        settings=dict(
            dtype=cfg.dtype,
            solve_dtype=cfg.solve_dtype,
            tf32=cfg.tf32,
            repeats=cfg.repeats,
            warmup=cfg.warmup,
            seed=cfg.seed,
            least_squares_right=least_squares,
            rtol=cfg.rtol,
            atol=cfg.atol,
        ),
        solve_methods=methods,
        device=str(device),
        environment=_environment(device),
        ratios={s: results[f"{s}_s"] / adam_s for s in steps},
        flops={s: flops[s] for s in steps},
        flop_ratios={s: flops[s] / flops["adam_step"] for s in steps},
        gflops_per_s={s: flops[s] / results[f"{s}_s"] / 1e9 for s in steps},
        timings=timings,
        peak_memory_bytes=peaks,
    )
    return results


def _describe_sizes(results: dict[str, object]) -> str:
    sizes, model = results["sizes"], results.get("model", "revmlp")
    shape = f"widths={sizes['widths']}" if model == "mlp" else f"h={sizes['hidden']} L={sizes['blocks']}"
    name = {"revmlp": "RevMLP", "mlp": "MLP", "resmlp": "ResMLP"}[model]
    count = f", {results['parameters']:,} parameters" if "parameters" in results else ""
    return f"{name} d={sizes['features']} {shape} B={sizes['batch']} k={sizes['classes']}{count}"


def format_table(results: dict[str, object]) -> str:
    """A Markdown table of medians, ratios to Adam, counted FLOP ratios, throughput and peak memory."""
    env = results["environment"]
    head = (
        f"{_describe_sizes(results)} "
        f"on {env.get('device_name', env['device'])} ({results['device']}, "
        f"torch {meta_value(env, 'torch_version')}, {env['threads']} threads{_load(env)}, "
        f"{results['settings']['dtype']}"
        f"{', TF32' if results['settings']['tf32'] else ''}"
        f"{', float64 solves' if results['settings']['solve_dtype'] == 'float64' else ''}"
        f"{_truncation(results['settings'])})"
    )
    lines = [
        head,
        "",
        "| step | median (s) | × Adam step | counted FLOPs × Adam | GFLOP/s | peak memory |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for s in results.get("steps", STEPS):
        peak = results["peak_memory_bytes"][s]
        lines.append(
            f"| {s} | {results[f'{s}_s']:.4g} | {results['ratios'][s]:.2f} | {results['flop_ratios'][s]:.2f} "
            "| "
            f"{results['gflops_per_s'][s]:.1f} | {'-' if peak is None else f'{peak / 2**30:.2f} GiB'} |"
        )
    if results["settings"]["least_squares_right"]:
        lines.append("")
        lines.append(
            "Note: the batch exceeds the rank bound of the identity first block (d/2 + 1), so its "
            "half-layers "
            "take the exact least-squares step (least_squares=True, column-Gram solves) and J·Δθ = v "
            "holds only in the other blocks."
        )
    return "\n".join(lines)


def _load(env: dict[str, object]) -> str:
    load = env.get("load_average")
    return f", load {load[0]:.2f}" if load else ""


def _truncation(settings: dict[str, object]) -> str:
    rtol, atol = settings.get("rtol", 0.0), settings.get("atol", 0.0)
    return f", truncated: rtol={rtol:g} atol={atol:g}" if (rtol or atol) else ""
