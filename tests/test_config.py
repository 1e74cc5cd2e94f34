"""Config errors name the file and the key, and list every problem at once."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from mlci.cli import app
from mlci.config import ConfigError, check_model_files, load_config, parse_config

from .conftest import save, tiny_mlp, write_config


def test_valid_config_defaults_and_overrides(tmp_path: Path) -> None:
    save(tiny_mlp(), tmp_path / "m.onnx")
    cfg = load_config(write_config(tmp_path, """
        [tuning]
        trials = 12
        [[models]]
        path = "m.onnx"
        dims = { batch = 2 }
        atol = 0.01
    """))
    assert cfg.tuning.trials == 12
    assert cfg.tuning.seconds == 600.0
    assert cfg.models[0].name == "m"  # defaults to the file stem
    assert cfg.models[0].path == tmp_path / "m.onnx"
    assert cfg.models[0].dims == {"batch": 2}
    assert list(cfg.targets) == ["cpu"]  # host CPU when no target is configured
    assert cfg.cache_dir == tmp_path / ".mlci" / "cache"


def test_unknown_key_is_named_with_a_suggestion(tmp_path: Path) -> None:
    path = write_config(tmp_path, """
        [tuning]
        trails = 5
        [[models]]
        path = "m.onnx"
        shape = { x = [1, 2] }
    """)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    text = str(err.value)
    assert str(path) in text
    assert "tuning.trails: unknown key (did you mean 'trials'?)" in text
    assert "models[0].shape: unknown key" in text


def test_bad_types_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(
            """
            [tuning]
            trials = "64"
            [measure]
            samples = true
            [[models]]
            path = "m.onnx"
            inputs = { x = [1, -3] }
            """,
            tmp_path / "mlci.toml",
        )
    problems = err.value.problems
    assert any(p.startswith("tuning.trials: expected a non-negative integer, got str '64'") for p in problems)
    assert any(p.startswith("measure.samples: expected a positive integer, got bool") for p in problems)
    assert any(p.startswith("models[0].inputs.x: expected a list of positive integers") for p in problems)


def test_missing_model_file_is_named(tmp_path: Path) -> None:
    cfg = load_config(write_config(tmp_path, """
        [[models]]
        name = "ghost"
        path = "models/ghost.onnx"
    """))
    with pytest.raises(ConfigError) as err:
        check_model_files(cfg)
    assert "models[0].path: model file not found" in str(err.value)
    assert "ghost.onnx" in str(err.value)


def test_invalid_toml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        parse_config("[tuning\n", tmp_path / "mlci.toml")
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.toml")


def test_bad_target_table(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(
            """
            [targets.gpu]
            tvm = "cuda -arch=sm_80"
            [targets.arm]
            tvm = { mcpu = "neoverse-n1" }
            [[models]]
            path = "m.onnx"
            """,
            tmp_path / "mlci.toml",
        )
    text = str(err.value)
    assert "targets.gpu.tvm: expected \"host\" or a TVM Target JSON table" in text
    assert "targets.arm.tvm.kind: required string" in text


def test_cli_exits_2_and_names_file_and_key(tmp_path: Path) -> None:
    path = write_config(tmp_path, """
        [[models]]
        path = "missing.onnx"
        atol = "tight"
    """)
    result = CliRunner().invoke(app, ["run", "-c", str(path), "--no-tracking"])
    assert result.exit_code == 2
    assert "models[0].atol: expected a non-negative number, got str 'tight'" in result.output
    assert "mlci.toml" in result.output


def test_cli_missing_model_file_exits_2(tmp_path: Path) -> None:
    path = write_config(tmp_path, """
        [[models]]
        path = "missing.onnx"
    """)
    result = CliRunner().invoke(app, ["run", "-c", str(path), "--no-tracking"])
    assert result.exit_code == 2
    assert "models[0].path: model file not found" in result.output


@pytest.mark.parametrize("section, key, value", [
    ("tuning", "seconds", "nan"), ("tuning", "seconds", "inf"), ("numerics", "atol", "nan"),
    ("numerics", "rtol", "inf"), ("measure", "min_sample_ms", "nan"), ("measure", "max_seconds", "inf"),
])
def test_numbers_toml_allows_but_that_make_no_sense_are_refused(tmp_path: Path, section, key, value) -> None:
    # nan seconds searched nothing yet credited trials; nan atol turned the check off.
    path = write_config(tmp_path, f"""
        [{section}]
        {key} = {value}
        [[models]]
        path = "m.onnx"
    """)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert f"{section}.{key}:" in str(err.value) and "finite" in str(err.value)


def test_a_negative_or_nan_model_threshold_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config('[[models]]\npath = "a.onnx"\nthreshold = -0.1\n[[models]]\npath = "b.onnx"\nthreshold = nan\n',
                     tmp_path / "mlci.toml")
    assert "models[0].threshold: must not be negative" in str(err.value)
    assert "models[1].threshold:" in str(err.value)


@pytest.mark.parametrize("name", ["../escape", "/etc/passwd", "a/b", ".hidden", "", "two words"])
def test_a_model_name_that_would_leave_mlci_directory_is_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(f'[[models]]\npath = "m.onnx"\nname = "{name}"\n', tmp_path / "mlci.toml")
    assert "models[0].name:" in str(err.value)


def test_input_tables_give_shapes_value_rules_and_files(tmp_path: Path) -> None:
    cfg = parse_config("""
        [[models]]
        path = "asr.onnx"
        inputs_file = ["samples/a.npz", "samples/b.npz"]
        inputs.audio = [1, 16000]
        inputs.sample_rate = { value = 16000 }
        inputs.tokens = { shape = [1, 64], range = [0, 30522] }
        inputs.noise = { range = [-1, 1], distribution = "normal" }
    """.replace("\n        ", "\n"), tmp_path / "mlci.toml")
    model = cfg.models[0]
    assert model.inputs == {"audio": [1, 16000], "tokens": [1, 64]}
    assert model.input_rules["sample_rate"].value == 16000
    assert model.input_rules["tokens"].range == (0, 30522)
    assert model.input_rules["noise"].distribution == "normal"
    assert model.inputs_files == [tmp_path / "samples/a.npz", tmp_path / "samples/b.npz"]


def test_input_rule_mistakes_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config("""
            [[models]]
            path = "m.onnx"
            inputs_file = 3
            inputs.a = { range = [5, 1] }
            inputs.b = { value = 1, range = [0, 2] }
            inputs.c = { distribution = "poisson" }
            inputs.d = { rnage = [0, 1] }
        """.replace("\n            ", "\n"), tmp_path / "mlci.toml")
    text = str(err.value)
    assert "models[0].inputs_file: expected an .npz path or a list of them" in text
    assert "models[0].inputs.a.range: expected [low, high] with low < high" in text
    assert "models[0].inputs.b.value: a fixed value takes no range or distribution" in text
    assert "models[0].inputs.c.distribution: expected one of \"normal\", \"uniform\"" in text
    assert "models[0].inputs.d.rnage: unknown key (did you mean 'range'?)" in text


@pytest.mark.parametrize("what", ["results_dir", "cache_dir", "--output"])
def test_unusable_output_paths_exit_2_before_any_work(tmp_path: Path, what: str) -> None:
    save(tiny_mlp(), tmp_path / "m.onnx")
    (tmp_path / "a-file").write_text("in the way")
    setting = f'{what} = "a-file/sub"\n' if what != "--output" else ""
    path = write_config(tmp_path, setting + """
        prepare = ["touch", "prepare-ran"]
        [[models]]
        path = "m.onnx"
        dims = { batch = 1 }
    """)
    extra = ["-o", str(tmp_path / "a-file" / "r.json")] if what == "--output" else []
    result = CliRunner().invoke(app, ["run", "-c", str(path), "--no-tracking", *extra])
    assert result.exit_code == 2, result.output
    assert f"{what} " in result.output and "a-file is not a directory" in result.output
    assert not (tmp_path / "prepare-ran").exists()  # refused before anything ran


@pytest.mark.parametrize("stem", [".hidden", "my model", "résumé", "-x", "v1.2_final"])
def test_init_proposes_model_names_the_config_accepts(tmp_path: Path, stem: str) -> None:
    from mlci.config import model_name_from

    name = model_name_from(stem)
    assert parse_config(f'[[models]]\npath = "m.onnx"\nname = "{name}"\n', tmp_path / "mlci.toml").models[0].name == name


def test_warnings_reach_stderr_as_well_as_the_log_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import logging

    from mlci.commands.run import setup_logging

    cfg = parse_config('[[models]]\npath = "m.onnx"\n', tmp_path / "mlci.toml")
    setup_logging(cfg)
    setup_logging(cfg)  # a second run in the same process does not double every line
    log = logging.getLogger("mlci")
    log.info("an info line")
    log.warning("tuning cache x: database_tuning_record.json is damaged")
    err = capsys.readouterr().err
    assert err.count("warning: tuning cache x: database_tuning_record.json is damaged") == 1
    assert "an info line" not in err
    for handler in log.handlers:
        handler.flush()
    logged = (tmp_path / ".mlci" / "logs" / "mlci.log").read_text()
    assert "an info line" in logged and logged.count("is damaged") == 1


@pytest.mark.parametrize(("value", "expected"), [(None, True), ("false", False), ("true", True),
                                                 ('"release"', "release")])
def test_tracking_register_names_a_branch_or_switches_registering(tmp_path: Path, value: str | None,
                                                                  expected: bool | str) -> None:
    body = f"[tracking]\nregister = {value}\n" if value is not None else ""
    cfg = parse_config(body + '[[models]]\npath = "m.onnx"\n', tmp_path / "mlci.toml")
    assert cfg.tracking.register == expected


@pytest.mark.parametrize(("value", "shown"), [("1", "got int 1"), ('""', "got an empty string"),
                                              ('["main"]', "got list ['main']")])
def test_a_tracking_register_that_is_no_branch_or_flag_is_named(tmp_path: Path, value: str, shown: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(f'[tracking]\nregister = {value}\n[[models]]\npath = "m.onnx"\n', tmp_path / "mlci.toml")
    assert err.value.problems == [f"tracking.register: expected a branch name, true (the default branch) or false, {shown}"]


def test_a_target_states_its_price_per_hour(tmp_path: Path) -> None:
    cfg = parse_config('[targets.cpu]\nprice_per_hour = 0.36\n[targets.gpu]\ntvm = { kind = "cuda" }\n'
                       'price_per_hour = 1\n[targets.arm]\n[[models]]\npath = "m.onnx"\n', tmp_path / "mlci.toml")
    assert {name: t.price_per_hour for name, t in cfg.targets.items()} == {"cpu": 0.36, "gpu": 1.0, "arm": None}


@pytest.mark.parametrize("value", ["0", "-0.36", "nan", "inf", '"0.36"', "true"])
def test_a_price_that_is_no_positive_finite_number_is_named(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(f'[targets.cpu]\nprice_per_hour = {value}\n[[models]]\npath = "m.onnx"\n', tmp_path / "mlci.toml")
    text = str(err.value)
    assert "mlci.toml" in text
    assert "targets.cpu.price_per_hour: expected the machine's price in USD per hour, a number greater than 0" in text
