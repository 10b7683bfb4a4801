"""Pick each contender's learning rate from a tuning study and write the follow-up study with those rates.

    python scripts/tune.py runs/studies/tune-minibatch-cpu                  # the table and the chosen rates
    python scripts/tune.py runs/studies/tune-minibatch-cpu \\
        --template exactgn/lab/configs/studies/tuning/final-minibatch-cpu.toml --out
        runs/final-minibatch-cpu.toml

Reads every run folder below TUNING_DIR (config.toml, meta.json, epochs.csv: a run folder or a results/ copy).
Contenders are exactgn.lab.evidence.contender labels (jflat-trunc, jflat, jplus, adam, sgd). Selection: per
contender, the rate whose run has the highest ``val_accuracy`` at its final epoch (``--criterion best``: at
its best epoch >= 1); runs that did not finish (diverged, failed) are out; a tie goes to the smaller rate. A
run without validation accuracy is an error (tune on a validation split: ``data.val_size``).

``--template`` (a list-of-runs study file): a copy is written to ``--out`` in which every run's ``optim.lr``
is the rate chosen for its contender; nothing else changes. A contender of the template that was not tuned is
an error. ``--only PREFIX`` fills only the runs whose name starts with PREFIX (a study of several settings,
e.g. architecture-cpu.toml's ``mb-`` and ``fb-`` runs, tuned separately: run tune.py once per setting).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from exactgn.lab import evidence  # noqa: E402
from exactgn.lab.config import read_toml, to_dict, toml_value  # noqa: E402
from exactgn.lab.rundir import read_meta, read_rows  # noqa: E402
from exactgn.lab.study import load_study, run_config  # noqa: E402


class TuneError(ValueError):
    """The tuning runs or the template cannot give a choice; the message says what is wrong."""


def score(run: Path, criterion: str) -> float | None:
    """Validation accuracy of a finished run at its final (or best) epoch; ``None`` when it did not finish."""
    if read_meta(run).get("status") != "finished":
        return None
    rows = [r for r in read_rows(run / "epochs.csv") if isinstance(r.get("val_accuracy"), (int, float))]
    if not rows:
        raise TuneError(
            f"{run}: no val_accuracy in epochs.csv; tuning needs a validation split (data.val_size > 0)"
        )
    if criterion == "final":
        return float(rows[-1]["val_accuracy"])
    return max(float(r["val_accuracy"]) for r in rows if r["epoch"] >= 1)


def trials(folder: Path, criterion: str) -> list[dict[str, Any]]:
    """One entry per run below ``folder``: contender, lr, seed, status, score."""
    runs = sorted(p.parent for p in folder.rglob("meta.json"))
    if not runs:
        raise TuneError(f"{folder}: no run folder (meta.json) below it; run the tuning study first")
    out = []
    for run in runs:
        cfg = read_toml(run / "config.toml")
        out.append(
            {
                "run": run.relative_to(folder).as_posix(),
                "contender": evidence.contender(cfg),
                "lr": float(cfg["optim"]["lr"]),
                "seed": cfg.get("seed"),
                "status": read_meta(run).get("status"),
                "score": score(run, criterion),
            }
        )
    return out


def choose(entries: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Contender → its best entry (highest score, then the smaller rate); an error when none finished."""
    chosen: dict[str, dict[str, Any]] = {}
    for name in sorted({e["contender"] for e in entries}):
        ok = [e for e in entries if e["contender"] == name and e["score"] is not None]
        if not ok:
            raise TuneError(f"contender {name}: no tuning run finished; widen the grid towards smaller rates")
        chosen[name] = max(ok, key=lambda e: (e["score"], -e["lr"]))
    return chosen


def table(entries: list[dict[str, Any]], chosen: dict[str, dict[str, Any]], criterion: str) -> str:
    head = ["contender", "lr", "seed", "status", f"{criterion} val acc %", "chosen"]
    rows = [
        [
            e["contender"],
            f"{e['lr']:g}",
            str(e["seed"]),
            str(e["status"]),
            "-" if e["score"] is None else f"{100 * e['score']:.2f}",
            "yes" if chosen[e["contender"]]["run"] == e["run"] else "",
        ]
        for e in sorted(entries, key=lambda e: (e["contender"], e["lr"]))
    ]
    return evidence.markdown(head, rows)


def fill(template: Path, rates: dict[str, float], header: str, only: str = "") -> str:
    """The template study file with the ``optim.lr`` of every run (whose name starts with ``only``) replaced
    by its contender's rate."""
    spec = load_study(template)
    data = read_toml(template)
    missing = set()
    chosen = [(raw, run) for raw, run in zip(data["run"], spec.runs) if run.name.startswith(only)]
    if not chosen:
        raise TuneError(f"{template}: no run's name starts with {only!r} (--only)")
    for raw, run in chosen:
        name = evidence.contender(to_dict(run_config(spec, run, check_only=True)))
        if name not in rates:
            missing.add(name)
            continue
        raw.setdefault("set", {})["optim.lr"] = rates[name]
    if missing:
        raise TuneError(
            f"{template}: contender(s) {', '.join(sorted(missing))} were not tuned "
            f"(tuned: {', '.join(sorted(rates))})"
        )
    return _keep_comments(template, header) + _study_toml(data)


def _keep_comments(template: Path, header: str) -> str:
    """``header``, then the template's own leading comment lines (a second fill keeps the first's header)."""
    leading = []
    for line in template.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        leading.append(line + "\n")
    return header + "".join(leading)


def _key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else toml_value(key)


def _study_toml(data: dict[str, Any]) -> str:
    """A list-of-runs study as TOML: top-level values, ``[set]``, then one ``[[run]]`` per run."""
    lines = [f"{_key(k)} = {toml_value(v)}" for k, v in data.items() if not isinstance(v, (dict, list))]
    if data.get("set"):
        lines += ["", "[set]"] + [f"{_key(k)} = {toml_value(v)}" for k, v in data["set"].items()]
    for run in data["run"]:
        lines += ["", "[[run]]"]
        for k, v in run.items():
            if isinstance(v, dict):
                body = ", ".join(f"{_key(a)} = {toml_value(b)}" for a, b in v.items())
                lines.append(f"{_key(k)} = {{ {body} }}")
            else:
                lines.append(f"{_key(k)} = {toml_value(v)}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("tuning", type=Path, help="the tuning study's output folder (or its results/ copy)")
    parser.add_argument(
        "--criterion",
        choices=("final", "best"),
        default="final",
        help="validation accuracy at the final epoch (default) or at the best epoch",
    )
    parser.add_argument("--template", type=Path, help="a study file whose runs get the chosen rates")
    parser.add_argument("--out", type=Path, help="where to write the filled template (needs --template)")
    parser.add_argument(
        "--only", metavar="PREFIX", default="", help="fill only the template's runs whose name starts so"
    )
    args = parser.parse_args(argv)
    if (args.template is None) != (args.out is None):
        parser.error("--template and --out go together")
    try:
        entries = trials(args.tuning, args.criterion)
        chosen = choose(entries)
        print(table(entries, chosen, args.criterion), end="")
        rates = {name: e["lr"] for name, e in chosen.items()}
        print("chosen: " + ", ".join(f"{n} {lr:g}" for n, lr in rates.items()))
        if args.template is not None:
            lines = [
                f"Generated by scripts/tune.py from {args.template} with the learning rates chosen on "
                f"{args.tuning} ({args.criterion} validation accuracy):"
            ]
            lines += [
                f"  {n}: lr {e['lr']:g} ({100 * e['score']:.2f}% on {e['run']})" for n, e in chosen.items()
            ]
            header = "".join(f"# {line}\n" for line in lines)
            args.out.write_text(fill(args.template, rates, header, args.only), encoding="utf-8")
            print(f"wrote {args.out}")
    except TuneError as exc:
        print(f"tune: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
