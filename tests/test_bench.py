"""The benchmark's contract: its JSON keys and its FLOP counts (checked against torch's FLOP counter)."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import exactgn
from exactgn.cli import main
from exactgn.lab.bench import estimate_seconds, step_flops


@pytest.mark.parametrize("hidden", [8, None])
def test_counted_flops_of_forward_and_adam_match_torch(hidden):
    model = exactgn.RevMLP(16, 3, 3, hidden)
    x, y = torch.randn(5, 16), torch.randint(0, 3, (5,))
    counted = step_flops(16, hidden, 3, 5, 3)
    with FlopCounterMode(display=False) as fwd, torch.no_grad():
        model(x)
    with FlopCounterMode(display=False) as step:
        torch.nn.functional.cross_entropy(model(x), y).backward()
    assert counted["forward"] == fwd.get_total_flops()
    assert counted["adam_step"] == step.get_total_flops()


def test_bench_writes_the_documented_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = [
        "bench",
        "--features",
        "16",
        "--hidden",
        "8",
        "--blocks",
        "2",
        "--batch",
        "4",
        "--classes",
        "3",
        "--repeats",
        "3",
        "--warmup",
        "1",
        "--device",
        "cpu",
        "--json",
        str(out),
    ]
    assert main(args) == 0
    table = capsys.readouterr().out
    for row in ("forward", "adam_step", "gn_right_step", "gn_pinv_step", "× Adam step"):
        assert row in table
    res = json.loads(out.read_text())
    keys = ("forward_s", "adam_step_s", "gn_right_step_s", "gn_pinv_step_s")
    assert all(isinstance(res[k], float) and res[k] > 0 for k in keys)
    assert res["sizes"] == dict(features=16, hidden=8, blocks=2, batch=4, classes=3)
    assert res["device"] == "cpu"
    assert res["ratios"]["gn_pinv_step"] == pytest.approx(res["gn_pinv_step_s"] / res["adam_step_s"])
    assert all(len(res["timings"][k[:-2]]) == 3 for k in keys)
    env = res["environment"]
    assert env["threads"] == torch.get_num_threads() and isinstance(env["cpu_count"], int)
    assert isinstance(env["lscpu"], dict) and len(env["load_average"]) == 3
    with open("/proc/cpuinfo") as fh:
        model = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    assert env["cpu_model"] == model and model in table
    # it said how long the rest would take, before taking it: the counted work at the forward pass's speed
    per_flop = res["forward_s"] / res["flops"]["forward"]
    rest = sum(res["flops"][s] for s in ("adam_step", "gn_right_step", "gn_pinv_step"))
    assert res["estimated_s"] == pytest.approx(rest * per_flop * (3 + 1))
    assert table.index("the other steps will take about") < table.index("gn_right_step")


def test_estimate_seconds_is_the_counted_work_at_the_forward_speed():
    flops = {"forward": 2e9, "adam_step": 4e9, "gn_pinv_step": 10e9}
    assert estimate_seconds(0.5, flops, ("adam_step", "gn_pinv_step"), repeats=4, warmup=1) == pytest.approx(
        (4 + 10) / 2 * 0.5 * 5
    )


def test_bench_truncation_reaches_the_steps(tmp_path, capsys):
    base = [
        "bench",
        "--features",
        "16",
        "--hidden",
        "8",
        "--blocks",
        "2",
        "--batch",
        "4",
        "--classes",
        "3",
        "--repeats",
        "1",
        "--warmup",
        "0",
        "--device",
        "cpu",
        "--json",
    ]
    assert main(base + [str(tmp_path / "exact.json")]) == 0
    assert main(base + [str(tmp_path / "trunc.json"), "--rtol", "1e-2", "--atol", "1e-5"]) == 0
    assert "truncated: rtol=0.01 atol=1e-05" in capsys.readouterr().out
    exact, trunc = (json.loads((tmp_path / f).read_text()) for f in ("exact.json", "trunc.json"))
    assert exact["solve_methods"] == {"gn_right_step": ["cholesky"], "gn_pinv_step": ["cholesky"]}
    assert trunc["solve_methods"] == {"gn_right_step": ["eigh"], "gn_pinv_step": ["eigh"]}
    assert (trunc["settings"]["rtol"], trunc["settings"]["atol"]) == (1e-2, 1e-5)
    with pytest.raises(SystemExit, match="--rtol must be a number >= 0"):
        main(base + [str(tmp_path / "bad.json"), "--rtol", "-1"])


def test_bench_rejects_bad_sizes(capsys):
    with pytest.raises(SystemExit, match="--batch must be at least 1"):
        main(["bench", "--batch", "0"])
    assert (
        main(
            [
                "bench",
                "--features",
                "15",
                "--hidden",
                "4",
                "--batch",
                "2",
                "--repeats",
                "1",
                "--device",
                "cpu",
            ]
        )
        == 2
    )
    assert "in_features must be even" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["mlp", "resmlp"])
def test_bench_of_an_mlp_and_a_resmlp(tmp_path, capsys, kind):
    out = tmp_path / "bench.json"
    shape = ["--widths", "24", "16"] if kind == "mlp" else ["--hidden", "8", "--blocks", "2"]
    args = ["bench", "--model", kind, "--features", "16", *shape, "--batch", "4", "--classes", "3"]
    assert main([*args, "--repeats", "2", "--warmup", "1", "--device", "cpu", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert (
        "gn_pinv_step" in table
        and "gn_right_step" not in table
        and {"mlp": "MLP d=16", "resmlp": "ResMLP d=16"}[kind] in table
    )
    res = json.loads(out.read_text())
    assert res["model"] == kind and res["steps"] == ["forward", "adam_step", "gn_pinv_step"]
    assert all(isinstance(res[f"{s}_s"], float) and res[f"{s}_s"] > 0 for s in res["steps"])
    assert "gn_right_step_s" not in res
    if kind == "mlp":
        model = exactgn.models.MLP(16, 3, [24, 16])
        assert res["sizes"] == dict(features=16, widths=[24, 16], batch=4, classes=3)
    else:
        model = exactgn.models.ResMLP(16, 3, 2, 8)
        assert res["sizes"] == dict(features=16, hidden=8, blocks=2, batch=4, classes=3)
    assert res["parameters"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert res["flops"] == exactgn.gn_step_flops(model, torch.randn(4, 16))
    assert res["ratios"]["adam_step"] == 1.0 and res["flop_ratios"]["gn_pinv_step"] > 1


def test_bench_mlp_widths_default_to_the_revmlp_parameter_count():
    from exactgn.lab.bench import BenchConfig

    cfg = BenchConfig(model="mlp", features=40, hidden=12, blocks=3, classes=5)
    rev = sum(p.numel() for p in exactgn.RevMLP(40, 5, 3, 12).parameters() if p.requires_grad)
    (w, w2) = cfg.mlp_widths()

    def count(width: int) -> int:
        return sum(p.numel() for p in exactgn.models.MLP(40, 5, [width, width]).parameters())

    assert w == w2 and abs(count(w) - rev) <= min(abs(count(w - 1) - rev), abs(count(w + 1) - rev))
    with pytest.raises(SystemExit, match="--widths is for --model mlp"):
        main(["bench", "--model", "resmlp", "--widths", "8"])
