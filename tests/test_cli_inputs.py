"""Bad input through the real command line: exit 2, one line naming the key and the fix, no traceback, no Ray.

Every input of issue 14's table is here, plus bad values per option generated from the configuration's own
field types (NaN and infinity for every float, a boolean for every integer, a number for every string...).
Most cases run `simulations.run.main` in this process with `ray.init` replaced by a trap, so a check that
happened only after Ray started fails the test; a few run `python -m simulations.run` in a real process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from fedunlearn.config import FIELD_KINDS, FLOAT_FIELDS, build_config

Setup = Callable[[Path], list[str]]


def key(name: str) -> str:
    return name.replace("_", "-")


def args(*argv: str) -> Setup:
    """A case that needs no files: the arguments as given ({tmp} is the test's folder)."""
    return lambda tmp: [a.replace("{tmp}", str(tmp)) for a in argv]


def config_file(content: str | bytes, suffix: str = ".json", *more: str) -> Setup:
    """A case whose --config file holds `content`."""

    def setup(tmp: Path) -> list[str]:
        path = tmp / f"settings{suffix}"
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return ["--config", str(path), *more]

    return setup


def garbage_mnist(tmp: Path) -> list[str]:
    """Every file torchvision reads for MNIST, each holding bytes that are not MNIST's."""
    raw = tmp / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (raw / name).write_bytes(os.urandom(4096))
    return ["--dataset", "mnist", "--data-dir", str(tmp / "data")]


def truncated_mnist(tmp: Path) -> list[str]:
    """MNIST files with the right headers but cut short, as an interrupted copy leaves them."""
    raw = tmp / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name, count in (("train-images-idx3-ubyte", 60000), ("t10k-images-idx3-ubyte", 10000)):
        (raw / name).write_bytes((0x803).to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in (count, 28, 28)) + bytes(100))
    for name, count in (("train-labels-idx1-ubyte", 60000), ("t10k-labels-idx1-ubyte", 10000)):
        (raw / name).write_bytes((0x801).to_bytes(4, "big") + count.to_bytes(4, "big") + bytes(count))
    return ["--dataset", "mnist", "--data-dir", str(tmp / "data")]


def half_mnist(tmp: Path) -> list[str]:
    """The training files only: the message must name the test files that are missing."""
    raw = tmp / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"):
        (raw / name).write_bytes(b"")
    return ["--dataset", "mnist", "--data-dir", str(tmp / "data")]


def out_is_file(tmp: Path) -> list[str]:
    (tmp / "results").write_text("not a folder")
    return ["--out", str(tmp / "results")]


def out_under_file(tmp: Path) -> list[str]:
    (tmp / "results").write_text("not a folder")
    return ["--out", str(tmp / "results" / "run")]


SMALL = ["--preset", "smoke", "--model", "mlp", "--rounds", "4", "--methods", "retrain,iau", "--no-shadow-mia"]


def write_checkpoint(out: Path, round_: int, **changed: object) -> None:
    """A checkpoint as an interrupted run of SMALL (with `changed` settings) leaves it: state.json only."""
    cfg = build_config("smoke", overrides={"model": "mlp", "rounds": 4, "methods": "retrain,iau", "shadow_mia": False, **changed})
    (out / "checkpoint").mkdir(parents=True)
    (out / "checkpoint" / "state.json").write_text(
        json.dumps({"round": round_, "config": cfg.to_dict(), "history": {}, "training_cost": {}})
    )


def failed_run_folder(tmp: Path) -> list[str]:
    """A failed run's results.json, whose status embeds a long multi-line traceback (as Ray's errors do); no checkpoint."""
    out = tmp / "out"
    out.mkdir()
    trace = "\n".join(f'  File "x.py", line {i}, in f\n    raise RuntimeError' for i in range(21))
    (out / "results.json").write_text(
        json.dumps({"status": f"failed: RayTaskError: ray::run()\nTraceback (most recent call last):\n{trace}", "models": {}})
    )
    return [*SMALL, "--out", str(out)]


def checkpoint_only(tmp: Path) -> list[str]:
    write_checkpoint(tmp / "out", 2)
    return [*SMALL, "--out", str(tmp / "out")]


def truncated_results(tmp: Path) -> list[str]:
    out = tmp / "out"
    out.mkdir()
    (out / "results.json").write_text('{"status": "complete", "models": {"retr')
    return [*SMALL, "--out", str(out)]


def resume_changed(tmp: Path) -> list[str]:
    write_checkpoint(tmp / "out", 2, rounds=6)
    return [*SMALL, "--out", str(tmp / "out"), "--resume"]


def resume_nothing(tmp: Path) -> list[str]:
    return [*SMALL, "--out", str(tmp / "out"), "--resume"]


def resume_complete(tmp: Path) -> list[str]:
    write_checkpoint(tmp / "out", 4)
    (tmp / "out" / "results.json").write_text(json.dumps({"status": "complete", "models": {}}))
    return [*SMALL, "--out", str(tmp / "out"), "--resume"]


def resume_pga(tmp: Path) -> list[str]:
    write_checkpoint(tmp / "out", 2, methods="retrain,pga")
    return [*SMALL[:-3], "--methods", "retrain,pga", "--no-shadow-mia", "--out", str(tmp / "out"), "--resume"]


def damaged_state(tmp: Path) -> list[str]:
    (tmp / "out" / "checkpoint").mkdir(parents=True)
    (tmp / "out" / "checkpoint" / "state.json").write_text('{"round": 2, "conf')
    return [*SMALL, "--out", str(tmp / "out"), "--resume"]


# (id, setup, what the line must name, what it must not say)
TABLE: list[tuple[str, Setup, tuple[str, ...], tuple[str, ...]]] = [
    # issue 14's table, row by row
    *[(f"nan-{key(f)}", args(f"--{key(f)}", "nan"), (f"{key(f)}='nan'", "finite"), ()) for f in FLOAT_FIELDS],
    *[(f"inf-{key(f)}", args(f"--{key(f)}", "inf"), (f"{key(f)}='inf'", "finite"), ()) for f in FLOAT_FIELDS],
    *[(f"minus-inf-{key(f)}", args(f"--{key(f)}=-inf"), (key(f), "finite"), ()) for f in FLOAT_FIELDS],
    *[(f"overflow-{key(f)}", args(f"--{key(f)}", "1e400"), (key(f), "finite"), ()) for f in FLOAT_FIELDS],
    ("seed-minus-1", args("--seed", "-1"), ("seed=-1",), ()),
    ("seed-2-32", args("--seed", str(2**32)), ("seed=4294967296",), ()),
    ("json-list", config_file("[1, 2]"), ("settings.json", "list"), ()),
    ("json-null", config_file("null"), ("settings.json", "NoneType"), ()),
    ("json-methods-with-a-number", config_file('{"methods": ["iau", 3]}'), ("methods=", "3"), ()),
    ("binary-file", config_file(bytes(range(256)) * 4, ".toml"), ("settings.toml", "not a text file"), ()),
    ("config-is-a-folder", args("--config", "{tmp}"), ("config file", "not a file"), ()),
    ("config-missing", args("--config", "{tmp}/none.toml"), ("none.toml", "does not exist"), ()),
    ("json-truncated", config_file('{"rounds": 3, "lr": 0.'), ("settings.json", "not valid JSON"), ()),
    ("json-nan-literal", config_file('{"lr": NaN}'), ("settings.json", "NaN"), ()),
    ("json-bool-for-int", config_file('{"num-clients": true}'), ("num-clients=True", "not a boolean"), ()),
    (
        "mnist-missing-folder",
        args("--dataset", "mnist", "--data-dir", "{tmp}/nonexistent"),
        ("--dataset mnist", "train-images-idx3-ubyte", "--download"),
        (),
    ),
    ("mnist-garbage-files", garbage_mnist, ("--dataset mnist", "train-images-idx3-ubyte", "not mnist's file", "--download"), ()),
    ("mnist-truncated-files", truncated_mnist, ("--dataset mnist", "header", "--download"), ()),
    ("mnist-half-the-files", half_mnist, ("t10k-images-idx3-ubyte", "--download"), ("train-images-idx3-ubyte,",)),
    ("digits-2000-clients", args("--num-clients", "2000"), ("num-clients=2000", "fewer clients"), ()),
    ("out-is-a-file", out_is_file, ("out=", "is a file"), ()),
    ("out-under-a-file", out_under_file, ("out=", "cannot be used"), ()),
    ("failed-run-folder", failed_run_folder, ("already holds results", "failed: RayTaskError", "--overwrite"), ("--resume", 'File "x.py"')),
    ("truncated-results-json", truncated_results, ("results.json", "not valid JSON", "--overwrite"), ()),
    ("checkpoint-only-folder", checkpoint_only, ("checkpoint", "round 2", "--resume", "--overwrite"), ()),
    ("resume-changed-settings", resume_changed, ("rounds: checkpoint 6 vs now 4", "state.json"), ("results.json",)),
    # beyond the table: the out folder and resume
    ("resume-without-checkpoint", resume_nothing, ("--resume", "no checkpoint"), ()),
    ("resume-a-complete-run", resume_complete, ("complete run", "nothing to resume"), ()),
    ("resume-pga-after-training-started", resume_pga, ("--resume", "pga"), ()),
    ("resume-damaged-state", damaged_state, ("state.json", "cannot be read"), ()),
    ("out-empty", args("--out", ""), ("out=''",), ()),
    # types, per field, from the dataclass: a boolean is not an integer, a number is not a string, ...
    *[
        (f"bool-for-int-{key(f)}", config_file(json.dumps({key(f): True})), (f"{key(f)}=True",), ())
        for f, (kind, _, many) in FIELD_KINDS.items()
        if kind is int and not many
    ],
    *[(f"bool-for-float-{key(f)}", config_file(json.dumps({key(f): False})), (f"{key(f)}=False",), ()) for f in FLOAT_FIELDS],
    *[
        (f"word-for-int-{key(f)}", args(f"--{key(f)}", "ten"), (f"{key(f)}='ten'", "integer"), ())
        for f, (kind, _, many) in FIELD_KINDS.items()
        if kind is int and not many
    ],
    *[
        (f"fraction-for-int-{key(f)}", args(f"--{key(f)}", "2.5"), (f"{key(f)}='2.5'",), ())
        for f, (kind, _, many) in FIELD_KINDS.items()
        if kind is int and not many
    ],
    *[(f"word-for-float-{key(f)}", args(f"--{key(f)}", "fast"), (f"{key(f)}='fast'", "number"), ()) for f in FLOAT_FIELDS],
    *[
        (f"number-for-string-{key(f)}", config_file(json.dumps({key(f): 3})), (f"{key(f)}=3", "string"), ())
        for f, (kind, _, many) in FIELD_KINDS.items()
        if kind is str and not many
    ],
    *[
        (f"number-for-bool-{key(f)}", config_file(json.dumps({key(f): 1})), (f"{key(f)}=1", "true or false"), ())
        for f, (kind, _, _) in FIELD_KINDS.items()
        if kind is bool
    ],
    *[
        (f"word-for-bool-{key(f)}", config_file(f'{key(f)} = "maybe"\n', ".toml"), (f"{key(f)}='maybe'",), ())
        for f, (kind, _, _) in FIELD_KINDS.items()
        if kind is bool
    ],
    *[
        (f"object-for-list-{key(f)}", config_file(json.dumps({key(f): {"a": 1}})), (f"{key(f)}=",), ())
        for f, (kind, _, many) in FIELD_KINDS.items()
        if many
    ],
    ("stream-clients-word", args("--stream-clients", "3,x"), ("stream-clients='3,x'", "'x'"), ()),
    ("stream-clients-bool", config_file('{"stream-clients": [3, true]}'), ("stream-clients=",), ()),
    # ranges and choices
    ("rounds-0", args("--rounds", "0"), ("rounds=0",), ()),
    ("num-clients-1", args("--num-clients", "1"), ("num-clients=1",), ()),
    ("batch-size-0", args("--batch-size", "0"), ("batch-size=0",), ()),
    ("lr-0", args("--lr", "0"), ("lr=0.0",), ()),
    ("lr-underflow", args("--lr", "1e-400"), ("lr=0.0",), ()),
    ("momentum-2", args("--momentum", "2"), ("momentum=2.0",), ()),
    ("fraction-fit-0", args("--fraction-fit", "0"), ("fraction-fit=0.0",), ()),
    ("dropout-prob-1", args("--dropout-prob", "1"), ("dropout-prob=1.0",), ()),
    ("grid-poll-interval-0", args("--grid-poll-interval", "0"), ("grid-poll-interval=0.0",), ()),
    ("round-timeout-0", args("--round-timeout", "0"), ("round-timeout=0.0",), ()),
    ("num-cpus-per-client-0", args("--num-cpus-per-client", "0"), ("num-cpus-per-client=0.0",), ()),
    ("num-cpus-per-client-too-many", args("--num-cpus-per-client", "100000"), ("num-cpus-per-client=100000.0", "CPUs"), ()),
    ("num-gpus-per-client-negative", args("--num-gpus-per-client", "-1"), ("num-gpus-per-client=-1.0",), ()),
    ("lira-shadows-odd", args("--mia-attacks", "loss,lira", "--lira-shadows", "3"), ("lira-shadows=3",), ()),
    ("forget-client-out-of-range", args("--forget-client", "10"), ("forget-client=10",), ()),
    ("withdraw-round-last", args("--withdraw-round", "30"), ("withdraw-round=30",), ()),
    ("crash-client-without-round", args("--crash-client", "1"), ("crash-round=None",), ()),
    ("stream-repeats-forget-client", args("--stream-clients", "0"), ("stream-clients=0",), ()),
    ("train-limit-too-small", args("--train-limit", "10"), ("train-limit=10",), ()),
    ("trigger-larger-than-digits", args("--trigger-size", "9"), ("trigger-size=9",), ()),
    ("backdoor-target-not-a-class", args("--backdoor-target", "10"), ("backdoor-target=10",), ()),
    ("device-cuda-letter", args("--device", "cuda:x"), ("device='cuda:x'",), ()),
    ("device-gpu", args("--device", "gpu"), ("device='gpu'",), ()),
    ("ray-address-empty", args("--ray-address", " "), ("ray-address=",), ()),
    ("methods-empty", args("--methods", ","), ("methods",), ()),
    ("methods-unknown", args("--methods", "iau,federased"), ("federased", "did you mean"), ()),
    ("dataset-typo", args("--dataset", "mnits"), ("dataset='mnits'", "did you mean 'mnist'"), ()),
    ("partition-typo", args("--partition", "dirichelt"), ("partition='dirichelt'",), ()),
    ("cohort-size-without-cohort", args("--cohort-size", "2"), ("cohort-size=2",), ()),
    ("preset-typo", args("--preset", "smok"), ("preset='smok'", "did you mean 'smoke'"), ()),
    ("seeds-negative", args("--seeds", "0,-1"), ("seeds='0,-1'",), ()),
    ("seeds-word", args("--seeds", "0,a"), ("seeds='0,a'",), ()),
    ("seeds-repeated", args("--seeds", "1,1"), ("seeds='1,1'",), ()),
    ("flag-typo", args("--num-client", "3"), ("--num-client", "did you mean --num-clients"), ()),
    ("flag-abbreviated", args("--round", "3"), ("--round", "did you mean --rounds"), ()),
    ("flag-without-value", args("--rounds"), ("--rounds", "expected one argument"), ()),
    ("unknown-key-in-file", config_file('{"num_clientz": 3}'), ("num_clientz", "did you mean 'num-clients'"), ()),
    ("tool-without-flwr-table", config_file("[tool.other]\nx = 1\n", ".toml"), ("tool.flwr.app.config",), ()),
    ("toml-syntax", config_file("rounds = = 3\n", ".toml"), ("settings.toml", "not valid TOML"), ()),
]
# Checks that ask torch about this machine: meaningful only where there is no GPU (the CI machine).
try:
    import torch

    if not torch.cuda.is_available():
        TABLE += [
            ("device-cuda-without-gpu", args("--device", "cuda"), ("device='cuda'", "--device cpu"), ()),
            ("gpus-per-client-without-gpu", args("--num-gpus-per-client", "0.5"), ("num-gpus-per-client=0.5", "no GPU"), ()),
        ]
except ImportError:  # pragma: no cover
    pass


@pytest.fixture
def ray_trapped(monkeypatch):
    """ray.init replaced by a trap: a check that only happens once Ray is up fails the test."""
    import ray

    def trap(*args: object, **kwargs: object) -> None:
        raise AssertionError("Ray was started before the bad input was refused")

    monkeypatch.setattr(ray, "init", trap)


def check_one_line(rc: int, out: str, err: str, names: tuple[str, ...], never: tuple[str, ...]) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, (rc, out[-2000:], err[-2000:])
    assert "Traceback" not in err + out, err
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), lines[0]
    for name in names:
        assert name in lines[0], (name, lines[0])
    for word in never:
        assert word not in lines[0], (word, lines[0])


@pytest.mark.parametrize("setup,names,never", [c[1:] for c in TABLE], ids=[c[0] for c in TABLE])
def test_bad_input_is_refused_in_one_line_before_ray(setup, names, never, tmp_path, capsys, ray_trapped):
    from simulations.run import main

    argv = setup(tmp_path)
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "never-written")]
    try:
        rc = main(argv)
    except SystemExit as stop:  # argparse's own exit (usage errors)
        rc = int(stop.code or 0)
    captured = capsys.readouterr()
    check_one_line(rc, captured.out, captured.err, names, never)
    assert not (tmp_path / "never-written").exists()  # a refused run creates nothing


def test_the_table_covers_issue_14(tmp_path):
    """Every row of the issue's table is a case above (a row dropped from TABLE fails here)."""
    ids = {c[0] for c in TABLE}
    issue_rows = {
        "nan-momentum",
        "nan-gr-alpha",
        "nan-gradient-norm-bound",
        "nan-slow-seconds",
        "nan-grid-poll-interval",
        "nan-num-cpus-per-client",
        "nan-num-gpus-per-client",
        "nan-pga-radius",
        "inf-iau-eta",
        "inf-lr",
        "inf-alpha",
        "inf-malicious-norm",
        "seed-minus-1",
        "json-list",
        "json-null",
        "json-methods-with-a-number",
        "binary-file",
        "config-is-a-folder",
        "json-bool-for-int",
        "mnist-missing-folder",
        "mnist-garbage-files",
        "digits-2000-clients",
        "out-is-a-file",
        "failed-run-folder",
        "truncated-results-json",
        "checkpoint-only-folder",
        "resume-changed-settings",
    }
    assert issue_rows <= ids, issue_rows - ids


# In a real process: the exit code the shell sees, and nothing printed by libraries on the way.
REAL = [
    "nan-momentum",
    "json-list",
    "binary-file",
    "mnist-missing-folder",
    "mnist-garbage-files",
    "digits-2000-clients",
    "out-is-a-file",
    "failed-run-folder",
    "resume-changed-settings",
    "flag-typo",
]


@pytest.mark.parametrize("case", REAL)
def test_bad_input_in_a_real_process(case, tmp_path):
    setup, names, never = next(c[1:] for c in TABLE if c[0] == case)
    argv = setup(tmp_path)
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "never-written")]
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", RAY_USAGE_STATS_ENABLED="0", TMPDIR=str(tmp_path))
    proc = subprocess.run([sys.executable, "-m", "simulations.run", *argv], capture_output=True, text=True, timeout=300, env=env)
    check_one_line(proc.returncode, proc.stdout, proc.stderr, names, never)
    # Ray writes its session under the temporary folder as soon as it starts: nothing there means it never did.
    assert not any(p.name.startswith(("ray", "fedunlearn-ray")) for p in tmp_path.iterdir())


def test_print_config_is_strict_json(capsys):
    from simulations.run import main

    assert main(["--preset", "memorization", "--print-config"]) == 0
    text = capsys.readouterr().out

    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} in --print-config output")

    printed = json.loads(text, parse_constant=refuse)
    assert printed["lr"] == 0.05 and printed["mia-attacks"] == ["loss", "shadow", "lira"]


@pytest.mark.parametrize(
    "field,value,names",
    [
        ("num_clients", True, ("num-clients=True",)),
        ("lr", float("nan"), ("lr=nan", "finite")),
        ("momentum", float("inf"), ("momentum=inf", "finite")),
        ("methods", ("iau", 3), ("methods=('iau', 3)",)),
        ("methods", "retrain,iau", ("methods='retrain,iau'", "tuple")),
        ("dataset", 3, ("dataset=3", "string")),
        ("backdoor", 1, ("backdoor=1", "true or false")),
        ("train_limit", 2.5, ("train-limit=2.5", "integer")),
    ],
)
def test_the_dataclass_built_in_python_checks_types_too(field, value, names):
    """The library path (ExperimentConfig(...), cfg.replace(...)) gets the same type checks as the command line."""
    from fedunlearn.config import ExperimentConfig
    from fedunlearn.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        ExperimentConfig(**{field: value})
    for name in names:
        assert name in str(err.value), str(err.value)


def test_well_formed_mnist_files_pass_the_header_check_and_load(tmp_path):
    """The header check agrees with torchvision's reader: small but well-formed IDX files load (a wrong check refuses them)."""
    import numpy as np

    from fedunlearn.data import DatasetStore, DataSpec
    from simulations.preflight import check_data

    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, count in (("train", 60), ("t10k", 20)):
        images = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=count, dtype=np.uint8)
        header = (0x803).to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in (count, 28, 28))
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(header + images.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes((0x801).to_bytes(4, "big") + count.to_bytes(4, "big") + labels.tobytes())
    spec = DataSpec(dataset="mnist", data_dir=str(tmp_path), num_clients=3)
    try:
        data = check_data(spec)
        assert tuple(data.x_train.shape[1:]) == (1, 28, 28) and data.x_train.shape[0] + data.x_test.shape[0] == 80
    finally:
        DatasetStore.drop(spec)
