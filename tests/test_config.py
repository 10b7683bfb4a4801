"""TOML run configs: schema errors that name the key, overrides, the writer, and the shipped reference
settings."""

from __future__ import annotations

import tomllib

import pytest

from exactgn.lab import config as C


# ---------------------------------------------------------------------------- loading and errors
def test_defaults_and_partial_files():
    cfg = C.loads_config('[optim]\nname = "adam"\nlr = 1\n')
    assert cfg.optim.name == "adam" and cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.data.dataset == "mnist-small" and cfg.train.epochs == 100
    assert (cfg.diagnostics.enabled, cfg.diagnostics.every, cfg.diagnostics.probe_size) == (False, 1, 256)


BAD = {
    # TOML text: expected message (regex)
    '[optim]\nlr = "abc"\n': r"optim\.lr: expected a number, got 'abc'",
    "[optim]\nlrr = 0.1\n": r"optim\.lrr: unknown key \(did you mean 'lr'\?\); the keys of \[optim\] are: "
    r"name, lr,",
    "epochz = 3\n": r"epochz: unknown key; the keys of the top level are",
    "[trian]\nepochs = 3\n": r"trian: unknown key \(did you mean 'train'\?\)",
    "[optim.gn]\nrtoll = 1e-2\n": r"optim\.gn\.rtoll: unknown key \(did you mean 'rtol'\?\)",
    "[train]\nepochs = 2.5\n": r"train\.epochs: expected an integer, got 2\.5",
    "[train]\nepochs = true\n": r"train\.epochs: expected an integer, got True",
    "[train]\nshuffle = 1\n": r"train\.shuffle: expected true or false, got 1",
    "[data]\ncrop_scale = 0.5\n": r"data\.crop_scale: expected a list, got 0\.5",
    '[data]\ncrop_scale = [0.5, "x"]\n': r"data\.crop_scale\[1\]: expected a number, got 'x'",
    "optim = 3\n": r"optim: expected a table \[optim\], got 3",
    "[optim]\nname = 'lbfgs'\n": r"optim\.name: must be one of 'gn', 'adam', 'sgd', 'adamw'; got 'lbfgs'",
    "[data]\ndataset = 'imagenet'\n": r"data\.dataset: must be one of 'mnist', 'cifar10', 'mnist-small'",
    "[train]\nepochs = -1\n": r"train\.epochs: must be >= 0, got -1",
    "[optim]\nlr = -0.1\n": r"optim\.lr: must be > 0, got -0\.1",
    "[optim]\nlr = nan\n": r"optim\.lr: must be finite",
    "[model]\nhidden = 0\n": r"model\.hidden: must be >= 1",
    "[optim.adam]\nbetas = [0.9]\n": r"optim\.adam\.betas: expected two numbers in \[0, 1\)",
    "[data]\ncrop_scale = [0.5, 2.0]\n": r"data\.crop_scale: the area fraction cannot exceed 1",
    "[optim.sgd]\nnesterov = true\n": r"optim\.sgd\.nesterov: Nesterov momentum needs optim\.sgd\.momentum > "
    r"0",
    "[train]\nloss = 'mse'\n[optim.gn]\nhessian = 'exact'\n": r"optim\.gn\.hessian: 'exact' applies to "
    r"cross-entropy",
    "[train]\ndevice = 'gpu'\n": r"train\.device: expected auto, cpu, cuda, cuda:N or mps, got 'gpu'",
    "name = 'a/b'\n": r"name: must be a non-empty name without slashes",
}


@pytest.mark.parametrize("text", list(BAD))
def test_bad_configs_name_the_key(text):
    with pytest.raises(C.ConfigError, match=BAD[text]):
        C.loads_config(text, source="x.toml")


def test_errors_name_the_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[optim]\nlr = "abc"\n')
    with pytest.raises(C.ConfigError, match=r"bad\.toml: optim\.lr: expected a number, got 'abc'"):
        C.load_config(path)
    path.write_text("[optim\nlr = 1\n")
    with pytest.raises(C.ConfigError, match=r"bad\.toml: invalid TOML"):
        C.load_config(path)
    with pytest.raises(
        C.ConfigError, match=r"no such file, and no shipped experiment .*did you mean mnist-fullbatch/gn"
    ):
        C.load_config("mnist-fullbatc/gn")


# ---------------------------------------------------------------------------- overrides
def test_overrides_are_typed_and_checked():
    assert C.parse_override("optim.lr=0.5") == ("optim.lr", 0.5)
    assert C.parse_override("train.epochs = 3") == ("train.epochs", 3)
    assert C.parse_override("optim.name=adam") == ("optim.name", "adam")
    assert C.parse_override("data.root=/tmp/x y") == ("data.root", "/tmp/x y")
    assert C.parse_override("data.crop_scale=[0.5, 1.0]") == ("data.crop_scale", [0.5, 1.0])
    assert C.parse_override('name="a=b"') == ("name", "a=b")
    cfg = C.loads_config("[optim]\nlr = 0.1\n", ["optim.lr=0.5", "optim.gn.rtol=1e-2", "train.shuffle=false"])
    assert (cfg.optim.lr, cfg.optim.gn.rtol, cfg.train.shuffle) == (0.5, 0.01, False)
    with pytest.raises(C.ConfigError, match=r"optim\.lr: expected a number, got 'abc'"):
        C.loads_config("", ["optim.lr=abc"])
    with pytest.raises(C.ConfigError, match=r"optim\.lrate: unknown key \(did you mean 'lr'\?\)"):
        C.loads_config("", ["optim.lrate=0.1"])
    with pytest.raises(C.ConfigError, match=r"expected KEY=VALUE"):
        C.parse_override("optim.lr")
    with pytest.raises(C.ConfigError, match=r"\[optim\.gn\] is a table"):
        C.loads_config("", ["optim.gn=1"])
    with pytest.raises(C.ConfigError, match=r"optim\.lr is a value, not a table"):
        C.loads_config("", ["optim.lr.x=1"])


# ---------------------------------------------------------------------------- writer
def test_resolved_config_round_trips_through_the_writer(tmp_path):
    cfg = C.loads_config(
        'name = "q"\ndescription = "a \\"quoted\\" \\\\ path\\nnewline\\t tab é"\n'
        "[optim]\nlr = 1e-05\n[optim.gn]\nrtol = 0.01\n[data]\ncrop_ratio = [0.75, 1.3333333333333333]\n"
    )
    text = C.dumps(cfg, header="two\nlines")
    assert text.startswith("# two\n# lines\n")
    again = C.loads_config(text)
    assert C.to_dict(again) == C.to_dict(cfg)
    path = tmp_path / "c.toml"
    C.write_config(cfg, path)
    assert C.to_dict(C.load_config(path)) == C.to_dict(cfg)
    parsed = tomllib.loads(
        C.dumps({"a": float("inf"), "b": {"c": [True, 2, "x"], "d": {"e": -0.0}}, "f g": 1})
    )
    assert parsed == {"a": float("inf"), "b": {"c": [True, 2, "x"], "d": {"e": -0.0}}, "f g": 1}


# ---------------------------------------------------------------------------- shipped experiments
# The reference settings, their twins and their conversions: tests/test_reference_configs.py.


def test_settings_listing_and_every_shipped_file_loads():
    settings = C.list_settings()
    for s in (
        "mnist-fullbatch",
        "mnist-minibatch-cpu",
        "cifar10-fullbatch-cpu",
        "demo-fullbatch",
        "demo-minibatch",
    ):
        assert s in settings
    names = C.list_experiments()
    assert len(names) >= 30
    for name in names:
        cfg = C.load_config(name)
        assert isinstance(cfg, C.RunConfig)
    assert C.load_config("demo-fullbatch/gn.toml").data.dataset == "mnist-small"
