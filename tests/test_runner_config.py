"""`[targets.NAME.launch]`: how a target's bench job gets its machine. A bad table is named down to the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlci.config import ConfigError, LaunchConfig, parse_config

GOOD = ('{ provider = "aws", region = "us-east-1", instance_type = "g5.xlarge", image = "ami-0123456789abcdef0", '
        'subnets = ["subnet-0a1b2c3d", "subnet-0f0e0d0c"], spot = true, max_minutes = 60 }')


def config(launch: str) -> str:
    return f'[[models]]\npath = "m.onnx"\n\n[targets.gpu]\ntvm = {{ kind = "cuda", arch = "sm_86" }}\nlaunch = {launch}\n'


def problems(launch: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(config(launch), Path("mlci.toml"))
    return info.value.problems


def test_a_launch_table_gives_the_target_its_machine_with_defaults_for_the_rest() -> None:
    launch = parse_config(config(GOOD), Path("mlci.toml")).targets["gpu"].launch
    assert launch == LaunchConfig(region="us-east-1", instance_type="g5.xlarge", image="ami-0123456789abcdef0",
                                  subnets=("subnet-0a1b2c3d", "subnet-0f0e0d0c"), spot=True, max_minutes=60)
    assert (launch.security_groups, launch.instance_profile, launch.volume_gb, launch.runner_group_id) == ((), None, None, 1)


def test_a_target_without_a_launch_table_has_none() -> None:
    cfg = parse_config('[[models]]\npath = "m.onnx"\n[targets.cpu]\ntvm = "host"\n', Path("mlci.toml"))
    assert cfg.targets["cpu"].launch is None


def test_every_optional_key_is_read() -> None:
    launch = parse_config(config(
        '{ region = "eu-west-1", instance_type = "c7g.large", image = "ami-0123abcd", subnets = "subnet-0a1b2c3d", '
        'spot = false, max_minutes = 30, security_groups = ["sg-0123abcd"], instance_profile = "mlci-bench", '
        'volume_gb = 100, runner_group_id = 7, runner_dir = "/home/ubuntu/runner", runner_user = "ubuntu" }'),
        Path("mlci.toml")).targets["gpu"].launch
    assert launch is not None
    assert (launch.subnets, launch.spot, launch.max_minutes, launch.security_groups, launch.instance_profile, launch.volume_gb,
            launch.runner_group_id, launch.runner_dir, launch.runner_user) == (
        ("subnet-0a1b2c3d",), False, 30, ("sg-0123abcd",), "mlci-bench", 100, 7, "/home/ubuntu/runner", "ubuntu")


@pytest.mark.parametrize(("launch", "expected"), [
    ('"g5.xlarge"', "targets.gpu.launch: expected a table"),
    ('{ instance_type = "g5.xlarge", image = "ami-0123abcd", subnets = ["subnet-0a1b2c3d"] }',
     "targets.gpu.launch.region: required key is missing"),
    (GOOD.replace('"us-east-1"', '"Virginia"'), "targets.gpu.launch.region: expected an AWS region"),
    (GOOD.replace('"g5.xlarge"', '"big gpu"'), "targets.gpu.launch.instance_type: expected an EC2 instance type"),
    (GOOD.replace('"ami-0123456789abcdef0"', '"ubuntu-22.04"'), "targets.gpu.launch.image: expected an AMI id"),
    (GOOD.replace('["subnet-0a1b2c3d", "subnet-0f0e0d0c"]', "[]"), "targets.gpu.launch.subnets: expected a list of subnet ids"),
    (GOOD.replace('"subnet-0f0e0d0c"', '"subnet-0a1b2c3d"'), "targets.gpu.launch.subnets: lists an id twice"),
    (GOOD.replace('"aws"', '"gcp"'), 'targets.gpu.launch.provider: expected one of "aws"'),
    (GOOD.replace("spot = true", 'spot = "yes"'), "targets.gpu.launch.spot: expected true or false"),
    (GOOD.replace("max_minutes = 60", "max_minutes = 0"), "targets.gpu.launch.max_minutes: expected the minutes"),
    (GOOD.replace("max_minutes = 60", "max_minutes = 100000"), "targets.gpu.launch.max_minutes: expected the minutes"),
    (GOOD.replace("max_minutes = 60", "max_minutes = true"), "targets.gpu.launch.max_minutes: expected the minutes"),
    (GOOD.replace("spot = true", "volume_gb = 2"), "targets.gpu.launch.volume_gb: expected the root volume's size"),
    (GOOD.replace("spot = true", 'security_groups = ["default"]'), "targets.gpu.launch.security_groups: expected a list"),
    (GOOD.replace("spot = true", 'runner_dir = "actions-runner"'), "targets.gpu.launch.runner_dir: expected an absolute path"),
    (GOOD.replace("spot = true", 'runner_user = "r; rm -rf /"'), "targets.gpu.launch.runner_user: expected a user name"),
    (GOOD.replace("spot = true", "runner_group_id = 0"), "targets.gpu.launch.runner_group_id: expected a runner group id"),
    (GOOD.replace("spot = true", 'instance_tipe = "x"'),
     "targets.gpu.launch.instance_tipe: unknown key (did you mean 'instance_type'?)"),
    (GOOD.replace("spot = true", 'key_name = "me"'), "targets.gpu.launch.key_name: mlci's runners take no SSH key"),
])
def test_a_bad_launch_table_is_named_down_to_the_key(launch: str, expected: str) -> None:
    found = problems(launch)
    assert any(p.startswith(expected) for p in found), found


def test_every_problem_of_a_launch_table_is_reported_at_once() -> None:
    found = problems('{ region = "x", image = "y", subnets = "z", provider = "gcp" }')
    keys = {p.split(":")[0] for p in found}
    assert {"targets.gpu.launch.region", "targets.gpu.launch.image", "targets.gpu.launch.subnets",
            "targets.gpu.launch.instance_type", "targets.gpu.launch.provider"} <= keys


def test_runs_on_and_launch_together_are_refused() -> None:
    """Which machine would the bench job run on? The config must say one thing."""
    with pytest.raises(ConfigError) as info:
        parse_config(config(GOOD) + 'runs_on = ["self-hosted", "gpu"]\n', Path("mlci.toml"))
    [problem] = info.value.problems
    assert problem.startswith("targets.gpu.runs_on: a target with launch runs on the machine it launches")


@pytest.mark.parametrize("label", ["mlci-4242-1-gpu", "MLCI-anything"])
def test_a_target_cannot_run_on_a_label_mlci_gives_the_machines_it_launches(label: str) -> None:
    """Another run's job, or a fork's, naming a launched machine's label could take that machine."""
    text = f'[[models]]\npath = "m.onnx"\n[targets.gpu]\ntvm = "host"\nruns_on = ["self-hosted", "{label}"]\n'
    with pytest.raises(ConfigError) as info:
        parse_config(text, Path("mlci.toml"))
    [problem] = info.value.problems
    assert problem.startswith(f"targets.gpu.runs_on: {label!r}") and "'mlci-'" in problem
