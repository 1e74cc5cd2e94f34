"""`mlci runner`: one ephemeral EC2 runner per bench job, against a real moto_server (EC2 over HTTP) and the
OpenAPI-checked fake GitHub. What moto does not simulate (capacity errors, spot interruptions, refused
permissions) is injected with botocore event hooks on the very client the code uses."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError
from typer.testing import CliRunner

from mlci import launch as L
from mlci import runners
from mlci.cli import app
from mlci.config import LaunchConfig
from mlci.github import GitHubClient
from mlci.results import Status, read_results

from .github_server import FakeGitHub
from .servers import FAKE_AWS, MotoServer, moto_server

IMAGE = "ami-03cf127a"  # one of moto's stock images; others fail with InvalidAMIID.NotFound
TOKEN = "ghs_runnerTokenThatMustNeverBePrinted_0123456789"
REGION = "us-east-1"


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    saved = os.environ.get("MOTO_ENABLE_AMI_VALIDATION")
    os.environ["MOTO_ENABLE_AMI_VALIDATION"] = "true"  # the server process checks images as EC2 does
    try:
        with moto_server() as server:
            yield server
    finally:
        if saved is None:
            os.environ.pop("MOTO_ENABLE_AMI_VALIDATION", None)
        else:
            os.environ["MOTO_ENABLE_AMI_VALIDATION"] = saved


def client(moto: MotoServer, region: str = REGION) -> Any:
    return runners.ec2_client(region, endpoint_url=moto.url, aws_access_key_id="testing", aws_secret_access_key="testing")


@pytest.fixture(scope="module")
def subnets(moto: MotoServer) -> tuple[str, str]:
    ec2 = client(moto)
    vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
    return tuple(ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.0.{i}.0/24", AvailabilityZone=f"{REGION}{zone}")["Subnet"]["SubnetId"]
                 for i, zone in ((1, "a"), (2, "b")))  # type: ignore[return-value]


@pytest.fixture
def gh() -> Iterator[FakeGitHub]:
    with FakeGitHub(token=TOKEN) as server:
        server.online_after_polls = 2  # the runner connects on the second look
        yield server
    assert server.errors == []


def github(gh: FakeGitHub) -> runners.RunnerGitHub:
    return runners.RunnerGitHub(gh.repository, lambda d: GitHubClient(gh.url, TOKEN, deadline=d, backoff=0.01))


def spec(subnets: tuple[str, str], **changes: Any) -> LaunchConfig:
    return LaunchConfig(**{"region": REGION, "instance_type": "g5.xlarge", "image": IMAGE, "subnets": subnets, **changes})


def new_id() -> str:
    return f"4242{uuid.uuid4().hex[:6]}-1-gpu"


def instances(moto: MotoServer, launch_id: str, states: tuple[str, ...] = L.LIVE_STATES) -> list[dict]:
    return runners._managed_instances(client(moto), launch_id, states)


def user_data_of(moto: MotoServer, instance_id: str) -> str:
    value = client(moto).describe_instance_attribute(InstanceId=instance_id, Attribute="userData")["UserData"]["Value"]
    return base64.b64decode(value).decode()


class Faults:
    """A fault layer on one boto3 client: records RunInstances calls, answers some with an AWS error."""

    def __init__(self, ec2: Any) -> None:
        self.ec2 = ec2
        self.calls: list[dict] = []
        self.refuse_spot: str | None = None
        self.refuse_all: str | None = None
        self.refuse_terminate: str | None = None
        self.reclaimed: set[str] = set()
        events = ec2.meta.events
        events.register("before-parameter-build.ec2.RunInstances", self._run)  # params: the call's keyword arguments
        events.register("before-parameter-build.ec2.TerminateInstances", self._terminate)
        events.register("after-call.ec2.DescribeInstances", self._describe)

    def _run(self, params: dict, **_: Any) -> None:
        self.calls.append(params)
        spot = "InstanceMarketOptions" in params
        code = self.refuse_all or (self.refuse_spot if spot else None)
        if code:
            raise ClientError({"Error": {"Code": code, "Message": f"injected {code}"}}, "RunInstances")

    def _terminate(self, params: dict, **_: Any) -> None:
        if self.refuse_terminate:
            raise ClientError({"Error": {"Code": self.refuse_terminate, "Message": "You are not authorized"}}, "TerminateInstances")

    def _describe(self, parsed: dict, **_: Any) -> None:
        """EC2 reclaiming a spot instance: terminated, with the state reason EC2 gives then."""
        for reservation in parsed.get("Reservations", []):
            for inst in reservation.get("Instances", []):
                if inst["InstanceId"] in self.reclaimed:
                    inst["State"] = {"Code": 48, "Name": "terminated"}
                    inst["StateReason"] = {"Code": L.SPOT_INTERRUPTION,
                                           "Message": "Server.SpotInstanceTermination: Spot instance termination"}


def run_start(moto: MotoServer, gh: FakeGitHub, subnets: tuple[str, str], launch_id: str, ec2: Any = None,
              **kw: Any) -> runners.Started:
    kw.setdefault("online_timeout", 10)
    kw.setdefault("poll_interval", 0.02)
    return runners.start(runners.StartRequest(launch_id, "gpu", kw.pop("launch", spec(subnets)), "https://github.com/o/r/actions/runs/1"),
                         ec2 or client(moto), github(gh), **kw)


# --- start and stop ---------------------------------------------------------------------------------------------

def test_start_launches_one_tagged_self_terminating_instance_and_stop_leaves_nothing(moto, gh, subnets) -> None:
    launch_id = new_id()
    started = run_start(moto, gh, subnets, launch_id)
    assert started.label == f"mlci-{launch_id}" and started.market == "spot" and started.subnet == subnets[0]
    (runner,) = gh.runners.values()
    assert runner["status"] == "online" and started.label in L.label_names(runner)
    (inst,) = instances(moto, launch_id)
    tags = {t["Key"]: t["Value"] for t in inst["Tags"]}
    assert tags[L.MANAGED_TAG] == "true" and tags[L.LAUNCH_TAG] == launch_id and tags[L.RUN_TAG].endswith("/runs/1")
    expiry = L.parse_time(tags[L.EXPIRES_TAG])
    assert expiry is not None and timedelta(minutes=60) < expiry - datetime.now(UTC) <= timedelta(minutes=60 + L.BOOT_MARGIN_MIN)
    assert inst["MetadataOptions"]["HttpTokens"] == "required"
    assert inst["InstanceType"] == "g5.xlarge" and inst["ImageId"] == IMAGE and inst["InstanceLifecycle"] == "spot"
    behaviour = client(moto).describe_instance_attribute(InstanceId=inst["InstanceId"], Attribute="instanceInitiatedShutdownBehavior")
    assert behaviour["InstanceInitiatedShutdownBehavior"]["Value"] == "terminate"

    report = runners.stop(launch_id, "gpu", client(moto), github(gh))
    assert (report.outcome, report.problems) == ("stopped", [])
    assert instances(moto, launch_id) == [] and gh.runners == {}


def test_the_user_data_arms_the_dead_man_first_and_holds_no_secret_but_the_jit_config(moto, gh, subnets) -> None:
    launch_id = new_id()
    started = run_start(moto, gh, subnets, launch_id, launch=spec(subnets, max_minutes=45))
    script = user_data_of(moto, started.instance_id)
    commands = [line for line in script.splitlines() if line.strip() and not line.startswith("#")]
    assert commands[0].startswith("shutdown -h +45 ")
    assert gh.jit_configs[started.runner_id] in script
    assert TOKEN not in script and "set -x" not in script
    assert "--jitconfig" in script and "shutdown -h now" in script
    runners.stop(launch_id, "gpu", client(moto), github(gh))


def test_a_retried_start_of_the_same_launch_launches_one_instance_not_two(moto, gh, subnets) -> None:
    launch_id = new_id()
    first = run_start(moto, gh, subnets, launch_id)
    again = run_start(moto, gh, subnets, launch_id)
    assert again.resumed and again.instance_id == first.instance_id and again.runner_id == first.runner_id
    assert len(instances(moto, launch_id)) == 1 and len(gh.runners) == 1
    runners.stop(launch_id, "gpu", client(moto), github(gh))


def test_a_retry_after_a_start_that_died_before_launching_registers_afresh_and_stop_removes_both(moto, gh, subnets) -> None:
    launch_id = new_id()
    github(gh).register(L.runner_name(launch_id, time.time() - 60), [L.runner_label(launch_id, TOKEN)], 1)  # died right here
    started = run_start(moto, gh, subnets, launch_id)
    assert gh.runner_named(started.runner_name)["status"] == "online" and len(gh.runners) == 2
    assert len(instances(moto, launch_id)) == 1
    report = runners.stop(launch_id, "gpu", client(moto), github(gh))
    assert len(report.runners) == 2 and gh.runners == {}


def test_start_asks_github_for_the_runner_first_when_nothing_was_launched(moto, gh, subnets) -> None:
    launch_id = new_id()
    run_start(moto, gh, subnets, launch_id)
    assert (gh.requests[0].method, gh.requests[0].path) == ("POST", f"/repos/{gh.repository}/actions/runners/generate-jitconfig")
    runners.stop(launch_id, "gpu", client(moto), github(gh))


def test_each_launch_attempt_carries_its_own_repeatable_client_token(moto, gh, subnets) -> None:
    ec2 = client(moto)
    faults = Faults(ec2)
    faults.refuse_spot = "InsufficientInstanceCapacity"
    launch_id = new_id()
    started = run_start(moto, gh, subnets, launch_id, ec2=ec2)
    tokens = [c["ClientToken"] for c in faults.calls]
    expected = [L.client_token(launch_id, started.runner_id, a) for a in L.attempts(spec(subnets))][:3]
    assert tokens == expected and len(set(tokens)) == 3 and all(len(t) <= 64 for t in tokens)
    runners.stop(launch_id, "gpu", client(moto), github(gh))


def test_no_spot_capacity_in_any_subnet_falls_back_to_on_demand_of_the_same_type_and_image(moto, gh, subnets) -> None:
    ec2 = client(moto)
    faults = Faults(ec2)
    faults.refuse_spot = "InsufficientInstanceCapacity"
    launch_id = new_id()
    started = run_start(moto, gh, subnets, launch_id, ec2=ec2)
    assert [("InstanceMarketOptions" in c, c["SubnetId"]) for c in faults.calls] == [
        (True, subnets[0]), (True, subnets[1]), (False, subnets[0])]
    assert {(c["InstanceType"], c["ImageId"]) for c in faults.calls} == {("g5.xlarge", IMAGE)}
    assert started.market == "on-demand" and len(started.tried) == 2
    (inst,) = instances(moto, launch_id)
    assert "InstanceLifecycle" not in inst
    runners.stop(launch_id, "gpu", client(moto), github(gh))


@pytest.mark.parametrize("code", ["SpotMaxPriceTooLow", "MaxSpotInstanceCountExceeded", "Unsupported"])
def test_other_capacity_errors_fall_through_too(moto, gh, subnets, code) -> None:
    ec2 = client(moto)
    faults = Faults(ec2)
    faults.refuse_spot = code
    launch_id = new_id()
    assert run_start(moto, gh, subnets, launch_id, ec2=ec2).market == "on-demand"
    runners.stop(launch_id, "gpu", client(moto), github(gh))


def test_no_capacity_anywhere_fails_naming_every_attempt_and_leaves_nothing(moto, gh, subnets) -> None:
    ec2 = client(moto)
    faults = Faults(ec2)
    faults.refuse_all = "InsufficientInstanceCapacity"
    launch_id = new_id()
    with pytest.raises(runners.RunnerError) as info:
        run_start(moto, gh, subnets, launch_id, ec2=ec2)
    assert len(faults.calls) == 4 and str(info.value).count("InsufficientInstanceCapacity") == 4
    assert gh.runners == {} and instances(moto, launch_id) == []


def test_an_image_error_fails_at_once_without_trying_on_demand(moto, gh, subnets) -> None:
    ec2 = client(moto)
    faults = Faults(ec2)
    launch_id = new_id()
    with pytest.raises(runners.RunnerError) as info:
        run_start(moto, gh, subnets, launch_id, ec2=ec2, launch=spec(subnets, image="ami-0123456789abcdef0"))
    assert len(faults.calls) == 1
    assert "InvalidAMIID.NotFound" in str(info.value) and "ami-0123456789abcdef0" in str(info.value)
    assert gh.runners == {} and instances(moto, launch_id) == []


def test_a_permission_error_fails_at_once_and_says_which_policy(moto, gh, subnets) -> None:
    ec2 = client(moto)
    faults = Faults(ec2)
    faults.refuse_all = "UnauthorizedOperation"
    with pytest.raises(runners.RunnerError, match="mlci runner policy"):
        run_start(moto, gh, subnets, new_id(), ec2=ec2)
    assert len(faults.calls) == 1 and gh.runners == {}


def test_a_runner_that_never_comes_online_is_terminated_and_deleted(moto, gh, subnets) -> None:
    gh.online_after_polls = None
    launch_id = new_id()
    began = time.monotonic()
    with pytest.raises(runners.RunnerError, match="not online within 0.3 s"):
        run_start(moto, gh, subnets, launch_id, online_timeout=0.3, poll_interval=0.05)
    assert time.monotonic() - began < 5
    assert instances(moto, launch_id) == [] and gh.runners == {}
    (inst,) = instances(moto, launch_id, ("terminated", "shutting-down"))
    assert inst["State"]["Name"] in ("terminated", "shutting-down")


# --- stop -------------------------------------------------------------------------------------------------------

def test_a_spot_machine_reclaimed_while_it_boots_is_replaced_by_an_on_demand_one(moto, gh, subnets) -> None:
    """Before its runner is online, EC2 takes the spot instance back: start registers afresh and launches the same
    type on demand, instead of failing the target."""
    ec2 = client(moto)
    faults = Faults(ec2)

    def reclaim_spot(parsed: dict, **_: Any) -> None:
        for inst in parsed.get("Instances", []):
            if inst.get("InstanceLifecycle") == "spot" or len(faults.calls) == 1:
                faults.reclaimed.add(inst["InstanceId"])

    ec2.meta.events.register("after-call.ec2.RunInstances", reclaim_spot)
    launch_id = new_id()
    started = run_start(moto, gh, subnets, launch_id, ec2=ec2)
    assert [("InstanceMarketOptions" in call) for call in faults.calls] == [True, False]  # spot, then on-demand
    assert started.market == "on-demand" and started.instance_id not in faults.reclaimed
    (runner,) = gh.runners.values()  # the first registration is gone, the second is online
    assert runner["name"] == started.runner_name and runner["status"] == "online"
    runners.stop(launch_id, "gpu", client(moto), github(gh))
    assert instances(moto, launch_id) == [] and gh.runners == {}


def test_a_spot_interruption_is_reported_as_interrupted_not_as_a_failure(moto, gh, subnets, tmp_path, monkeypatch) -> None:
    launch_id = new_id()
    started = run_start(moto, gh, subnets, launch_id)
    ec2 = client(moto)
    faults = Faults(ec2)
    faults.reclaimed.add(started.instance_id)
    monkeypatch.setattr("mlci.commands.runner._ec2", lambda region: ec2)
    report, results_dir = tmp_path / "stop.json", tmp_path / "results"
    result = cli(["runner", "stop", "--config", str(write_config(tmp_path, subnets)), "--launch-id", launch_id,
                  "--target", "gpu", "--report", str(report), "--results-dir", str(results_dir)], gh, moto)
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert data["outcome"] == "interrupted" and data["launch_id"] == launch_id and data["target"] == "gpu"
    assert started.instance_id in data["reason"] and data["instances"][0]["state_reason"] == L.SPOT_INTERRUPTION
    assert "outcome=interrupted" in result.stdout and gh.runners == {}
    # The report job reads a results file that says so: every model interrupted, none failed or slower.
    results = read_results(results_dir / "gpu.json")
    assert results.interrupted == data["reason"] and results.target.name == "gpu"
    assert [(m.name, m.status) for m in results.models] == [("m", Status.INTERRUPTED)]


def test_stop_keeps_the_bench_jobs_own_results_file(moto, gh, subnets, tmp_path, monkeypatch) -> None:
    launch_id = new_id()
    started = run_start(moto, gh, subnets, launch_id)
    ec2 = client(moto)
    Faults(ec2).reclaimed.add(started.instance_id)
    monkeypatch.setattr("mlci.commands.runner._ec2", lambda region: ec2)
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "gpu.json").write_text("{}")
    result = cli(["runner", "stop", "--config", str(write_config(tmp_path, subnets)), "--launch-id", launch_id,
                  "--target", "gpu", "--results-dir", str(tmp_path / "results")], gh, moto)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "results" / "gpu.json").read_text() == "{}"


def test_a_normal_stop_writes_no_results_file(moto, gh, subnets, tmp_path) -> None:
    launch_id = new_id()
    run_start(moto, gh, subnets, launch_id)
    result = cli(["runner", "stop", "--config", str(write_config(tmp_path, subnets)), "--launch-id", launch_id,
                  "--target", "gpu", "--results-dir", str(tmp_path / "results")], gh, moto)
    assert result.exit_code == 0 and "outcome=stopped" in result.stdout
    assert not (tmp_path / "results").exists()


def test_stop_with_nothing_to_stop_says_so_and_exits_0(moto, gh, tmp_path) -> None:
    report = tmp_path / "stop.json"
    result = cli(["runner", "stop", "--launch-id", new_id(), "--target", "gpu", "--region", REGION, "--report", str(report)], gh, moto)
    assert result.exit_code == 0, result.output
    assert json.loads(report.read_text())["outcome"] == "nothing_to_stop"


def test_stop_fails_naming_the_instance_it_could_not_terminate(moto, gh, subnets, tmp_path, monkeypatch) -> None:
    launch_id = new_id()
    started = run_start(moto, gh, subnets, launch_id)
    ec2 = client(moto)
    Faults(ec2).refuse_terminate = "UnauthorizedOperation"
    monkeypatch.setattr("mlci.commands.runner._ec2", lambda region: ec2)
    report = tmp_path / "stop.json"
    result = cli(["runner", "stop", "--launch-id", launch_id, "--target", "gpu", "--region", REGION, "--report", str(report)],
                 gh, moto)
    assert result.exit_code == 1
    assert started.instance_id in result.stderr and "left behind" in result.stderr
    assert started.instance_id in json.loads(report.read_text())["problems"][0]
    runners.stop(launch_id, "gpu", client(moto), github(gh))


# --- the command line -------------------------------------------------------------------------------------------

def write_config(tmp_path: Path, subnets: tuple[str, str], **launch: Any) -> Path:
    table = {"provider": "aws", "region": REGION, "instance_type": "g5.xlarge", "image": IMAGE, "subnets": list(subnets),
             "max_minutes": 60, **launch}
    body = ", ".join(f"{k} = {json.dumps(v)}" for k, v in table.items())
    path = tmp_path / "mlci.toml"
    path.write_text(f'[[models]]\npath = "m.onnx"\n\n[targets.gpu]\ntvm = {{ kind = "cuda" }}\nlaunch = {{ {body} }}\n')
    return path


def cli_env(gh: FakeGitHub, moto: MotoServer, **extra: str) -> dict[str, str]:
    return {**FAKE_AWS, "AWS_ENDPOINT_URL_EC2": moto.url, "GITHUB_API_URL": gh.url, "GITHUB_REPOSITORY": gh.repository,
            "MLCI_RUNNER_TOKEN": TOKEN, "GITHUB_SERVER_URL": "https://github.com", "GITHUB_RUN_ID": "4242",
            "GITHUB_EVENT_NAME": "push", "GITHUB_EVENT_PATH": "", "GITHUB_OUTPUT": "", "GITHUB_ACTIONS": "true", **extra}


def cli(args: list[str], gh: FakeGitHub, moto: MotoServer, **extra: str) -> Any:
    return CliRunner().invoke(app, args, env=cli_env(gh, moto, **extra))


def test_cli_start_outputs_an_unguessable_label_it_never_prints_and_stop_cleans_up_without_showing_the_token(
        moto, gh, subnets, tmp_path) -> None:
    config, outputs, report = write_config(tmp_path, subnets), tmp_path / "outputs", tmp_path / "stop.json"
    outputs.touch()
    launch_id = new_id()
    start = cli(["runner", "start", "--config", str(config), "--target", "gpu", "--launch-id", launch_id,
                 "--online-timeout", "10", "--poll-interval", "0.02"], gh, moto, GITHUB_OUTPUT=str(outputs))
    assert start.exit_code == 0, start.output
    written = dict(line.split("=", 1) for line in outputs.read_text().splitlines())
    (inst,) = instances(moto, launch_id)
    label = written["label"]
    assert label == L.runner_label(launch_id, TOKEN) and label.startswith(f"mlci-{launch_id}-") and len(label) > len(
        f"mlci-{launch_id}-") + 16
    assert json.loads(written["labels"]) == {"gpu": label} and written["instance-id"] == inst["InstanceId"]
    assert label not in start.output  # a reader of the log cannot ask for the machine before the bench job does
    (runner,) = gh.runners.values()
    # its one custom label (GitHub adds its read-only defaults, self-hosted and the OS and architecture, to every runner)
    assert [x["name"] for x in runner["labels"] if x.get("type") == "custom"] == [label]
    assert L.runner_label(launch_id, "another-token") != label
    assert {t["Key"]: t["Value"] for t in inst["Tags"]}[L.RUN_TAG] == f"https://github.com/{gh.repository}/actions/runs/4242"

    stop = cli(["runner", "stop", "--config", str(config), "--target", "gpu", "--launch-id", launch_id, "--report", str(report)],
               gh, moto, GITHUB_OUTPUT=str(outputs))
    assert stop.exit_code == 0, stop.output
    assert json.loads(report.read_text())["outcome"] == "stopped"
    assert instances(moto, launch_id) == [] and gh.runners == {}
    secret = json.loads(base64.b64decode(next(iter(gh.jit_configs.values()))))[".credentials"]
    for text in (start.output, stop.output, outputs.read_text(), report.read_text()):
        assert TOKEN not in text and secret not in text and next(iter(gh.jit_configs.values())) not in text


def test_one_start_job_starts_every_target_and_one_that_cannot_start_holds_up_no_other(moto, gh, subnets, tmp_path) -> None:
    """Two launched targets in one start: the second's subnet does not exist. The first's machine comes online and
    its label is output; the second's registration is removed; the command fails naming the second target."""
    config = write_config(tmp_path, subnets)
    config.write_text(config.read_text() + config.read_text().split("[targets.gpu]", 1)[1].join(
        ["[targets.gpu2]", ""]).replace(subnets[0], "subnet-00000000deadbeef0").replace(subnets[1], "subnet-00000000deadbeef1"))
    outputs = tmp_path / "outputs"
    outputs.touch()
    run_id = f"77{uuid.uuid4().hex[:6]}"
    start = cli(["runner", "start", "--config", str(config), "--target", "gpu", "--target", "gpu2", "--online-timeout", "10",
                 "--poll-interval", "0.02"], gh, moto, GITHUB_OUTPUT=str(outputs), GITHUB_RUN_ID=run_id, GITHUB_RUN_ATTEMPT="1")
    assert start.exit_code == 1, start.output
    assert "1 of 2 machines did not start" in start.output and "gpu2:" in start.output
    written = dict(line.split("=", 1) for line in outputs.read_text().splitlines())
    assert json.loads(written["labels"]) == {"gpu": L.runner_label(f"{run_id}-1-gpu", TOKEN)}
    assert len(instances(moto, f"{run_id}-1-gpu")) == 1 and instances(moto, f"{run_id}-1-gpu2") == []
    assert [r["name"] for r in gh.runners.values()] == [L.runner_name(f"{run_id}-1-gpu", 0)[:-10] + r["name"][-10:]
                                                        for r in gh.runners.values()] and len(gh.runners) == 1
    runners.stop(f"{run_id}-1-gpu", "gpu", client(moto), github(gh))
    assert gh.runners == {}


def test_cli_start_without_the_runner_token_is_a_usage_error_naming_it(moto, gh, subnets, tmp_path) -> None:
    result = cli(["runner", "start", "--config", str(write_config(tmp_path, subnets)), "--target", "gpu", "--launch-id", new_id()],
                 gh, moto, MLCI_RUNNER_TOKEN="", GITHUB_TOKEN="ghs_workflow_token_123456")
    assert result.exit_code == 2 and "MLCI_RUNNER_TOKEN" in result.stderr and "GITHUB_TOKEN cannot" in result.stderr
    assert gh.requests == []


@pytest.mark.parametrize("launch_id", ["", "../etc", "a b", "x" * 49, "-lead"])
def test_cli_rejects_an_unsafe_launch_id(moto, gh, subnets, tmp_path, launch_id) -> None:
    result = cli(["runner", "start", "--config", str(write_config(tmp_path, subnets)), "--target", "gpu", "--launch-id", launch_id],
                 gh, moto)
    assert result.exit_code == 2 and "launch id" in result.stderr


def test_cli_start_on_a_target_without_launch_table_names_it(moto, gh, tmp_path) -> None:
    config = tmp_path / "mlci.toml"
    config.write_text('[[models]]\npath = "m.onnx"\n[targets.cpu]\ntvm = "host"\n')
    result = cli(["runner", "start", "--config", str(config), "--target", "cpu", "--launch-id", new_id()], gh, moto)
    assert result.exit_code == 2 and "targets.cpu has no launch table" in result.stderr


def fork_event(tmp_path: Path, head: str, base: str = "octo-org/widgets") -> str:
    path = tmp_path / "event.json"
    path.write_text(json.dumps({"pull_request": {"number": 7, "head": {"repo": {"full_name": head}},
                                                 "base": {"repo": {"full_name": base}}}}))
    return str(path)


@pytest.mark.parametrize("event_name", ["pull_request", "pull_request_target"])
def test_start_refuses_a_forks_pull_request(moto, gh, subnets, tmp_path, event_name) -> None:
    launch_id = new_id()
    result = cli(["runner", "start", "--config", str(write_config(tmp_path, subnets)), "--target", "gpu", "--launch-id", launch_id],
                 gh, moto, GITHUB_EVENT_NAME=event_name, GITHUB_EVENT_PATH=fork_event(tmp_path, "mallory/widgets"))
    assert result.exit_code == 2 and "fork" in result.stderr and "mallory/widgets" in result.stderr
    assert gh.requests == [] and instances(moto, launch_id) == []


def test_start_refuses_when_the_workflow_says_fork(moto, gh, subnets, tmp_path) -> None:
    result = cli(["runner", "start", "--config", str(write_config(tmp_path, subnets)), "--target", "gpu", "--launch-id", new_id(),
                  "--fork"], gh, moto)
    assert result.exit_code == 2 and "--fork" in result.stderr and gh.requests == []


def test_start_refuses_a_forks_workflow_run_and_lets_a_same_repository_pull_request_through(moto, gh, subnets, tmp_path) -> None:
    run = tmp_path / "run.json"
    run.write_text(json.dumps({"workflow_run": {"head_repository": {"full_name": "mallory/widgets"},
                                                "repository": {"full_name": "octo-org/widgets"}}}))
    config = write_config(tmp_path, subnets)
    refused = cli(["runner", "start", "--config", str(config), "--target", "gpu", "--launch-id", new_id()], gh, moto,
                  GITHUB_EVENT_NAME="workflow_run", GITHUB_EVENT_PATH=str(run))
    assert refused.exit_code == 2 and "mallory/widgets" in refused.stderr and gh.requests == []
    launch_id = new_id()
    same = cli(["runner", "start", "--config", str(config), "--target", "gpu", "--launch-id", launch_id, "--online-timeout",
                "10", "--poll-interval", "0.02"], gh, moto, GITHUB_EVENT_NAME="pull_request",
               GITHUB_EVENT_PATH=fork_event(tmp_path, "Octo-Org/widgets"))
    assert same.exit_code == 0, same.output
    runners.stop(launch_id, "gpu", client(moto), github(gh))


def test_a_start_killed_after_the_launch_is_cleaned_up_by_stop(moto, gh, subnets, tmp_path) -> None:
    gh.online_after_polls = None  # the runner never connects: start waits until killed
    config, launch_id = write_config(tmp_path, subnets), new_id()
    env = {**os.environ, **cli_env(gh, moto)}
    proc = subprocess.Popen([sys.executable, "-m", "mlci.cli", "runner", "start", "--config", str(config), "--target", "gpu",
                             "--launch-id", launch_id, "--online-timeout", "60", "--poll-interval", "0.05"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not instances(moto, launch_id) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert instances(moto, launch_id), proc.communicate(timeout=5)
    finally:
        proc.send_signal(signal.SIGKILL)  # no chance to clean up
        out, err = proc.communicate(timeout=10)
    assert b"label" not in out + err and len(gh.runners) == 1
    stop = cli(["runner", "stop", "--config", str(config), "--target", "gpu", "--launch-id", launch_id], gh, moto)
    assert stop.exit_code == 0, stop.output
    assert "outcome=stopped" in stop.stdout
    assert instances(moto, launch_id) == [] and gh.runners == {}
    assert TOKEN.encode() not in out + err


def test_a_start_cancelled_with_sigterm_cleans_up_itself(moto, gh, subnets, tmp_path) -> None:
    gh.online_after_polls = None
    config, launch_id = write_config(tmp_path, subnets), new_id()
    proc = subprocess.Popen([sys.executable, "-m", "mlci.cli", "runner", "start", "--config", str(config), "--target", "gpu",
                             "--launch-id", launch_id, "--online-timeout", "60", "--poll-interval", "0.05"],
                            env={**os.environ, **cli_env(gh, moto)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not instances(moto, launch_id) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert instances(moto, launch_id) and len(gh.runners) == 1  # launched, waiting for the runner
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    assert proc.returncode != 0
    assert instances(moto, launch_id) == [] and gh.runners == {}


# --- reap -------------------------------------------------------------------------------------------------------

def seed_instance(moto: MotoServer, subnet: str | None, launch_id: str, expires: datetime, repository: str | None = None,
                  region: str = REGION) -> str:
    tags = L.instance_tags(launch_id, "gpu", None, expires, L.runner_name(launch_id, time.time()), repository)
    where = {"SubnetId": subnet} if subnet else {}
    reply = client(moto, region).run_instances(ImageId=IMAGE if region == REGION else _image(moto, region),
                                               InstanceType="g5.xlarge", MinCount=1, MaxCount=1, **where,
                                               TagSpecifications=[{"ResourceType": "instance",
                                                                   "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}])
    return reply["Instances"][0]["InstanceId"]


def _image(moto: MotoServer, region: str) -> str:
    return client(moto, region).describe_images(Owners=["amazon"])["Images"][0]["ImageId"]


def reap_in(moto: MotoServer, gh: FakeGitHub, regions: tuple[str, ...] = (REGION,), **kw: Any) -> tuple[L.ReapPlan, list[str]]:
    plan, _, problems = runners.reap(lambda region: client(moto, region), list(regions), github(gh), **kw)
    return plan, problems


def test_reap_removes_the_expired_and_the_stale_and_keeps_the_busy_and_the_young(moto, gh, subnets) -> None:
    now = datetime.now(UTC) + timedelta(hours=2)  # reap runs two hours from now: everything launched now is old then
    grace = timedelta(minutes=15)
    expired = seed_instance(moto, subnets[0], new_id(), now - timedelta(minutes=30))
    in_grace = seed_instance(moto, subnets[0], new_id(), now - timedelta(minutes=5))
    in_time = seed_instance(moto, subnets[1], new_id(), now + timedelta(hours=1))
    stale = gh.add_runner(L.runner_name(new_id(), (now - timedelta(hours=1)).timestamp()), status="offline")
    young = gh.add_runner(L.runner_name(new_id(), (now - timedelta(minutes=3)).timestamp()), status="offline")
    busy = gh.add_runner(L.runner_name(new_id(), (now - timedelta(hours=3)).timestamp()), status="online", busy=True)
    other = gh.add_runner("build-box-1", status="offline")

    plan, problems = reap_in(moto, gh, grace=grace, dry_run=True, now=now)
    actions = {f.id: f.action for f in plan.actions}
    assert actions[expired] == "terminate" and actions[in_grace] == "keep" and actions[in_time] == "keep"
    assert actions[str(stale["id"])] == "delete" and actions[str(young["id"])] == "keep" and actions[str(busy["id"])] == "keep"
    assert str(other["id"]) not in actions
    live = {i["InstanceId"] for i in client(moto).describe_instances(InstanceIds=[expired])["Reservations"][0]["Instances"]
            if i["State"]["Name"] == "running" or i["State"]["Name"] == "pending"}
    assert live == {expired} and len(gh.runners) == 4  # a dry run changes nothing

    plan, problems = reap_in(moto, gh, grace=grace, dry_run=False, now=now)
    assert problems == []
    state = {i["InstanceId"]: i["State"]["Name"] for r in client(moto).describe_instances(
        InstanceIds=[expired, in_grace, in_time])["Reservations"] for i in r["Instances"]}
    assert state[expired] in ("terminated", "shutting-down")
    assert state[in_grace] in ("pending", "running") and state[in_time] in ("pending", "running")
    assert set(gh.runners) == {young["id"], busy["id"], other["id"]}
    client(moto).terminate_instances(InstanceIds=[in_grace, in_time])


def test_reap_looks_in_every_region_and_touches_only_this_repositorys_instances(moto, gh, subnets, tmp_path) -> None:
    """An expired instance in a region no config names is reaped; another repository's expired instance in the same
    account is left alone; a runner whose machine is live in the second region is not taken for stale."""
    past = datetime.now(UTC) - timedelta(hours=3)
    ours_far = seed_instance(moto, None, new_id(), past, gh.repository, region="eu-west-1")
    theirs = seed_instance(moto, subnets[0], new_id(), past, "someone-else/other-repo")
    booting = new_id()
    seed_instance(moto, None, booting, datetime.now(UTC) + timedelta(hours=1), gh.repository, region="eu-west-1")
    waiting = gh.add_runner(L.runner_name(booting, time.time() - 3600), status="offline")
    config = write_config(tmp_path, subnets)  # names only us-east-1
    result = cli(["runner", "reap", "--config", str(config), "--grace-minutes", "0"], gh, moto)
    assert result.exit_code == 0, result.output
    assert f"terminate instance {ours_far} (" in result.stdout and ", eu-west-1)" in result.stdout
    assert theirs not in result.stdout and waiting["id"] in gh.runners
    states = {i["InstanceId"]: i["State"]["Name"] for r in client(moto, "eu-west-1").describe_instances()["Reservations"]
              for i in r["Instances"]}
    assert states[ours_far] in ("terminated", "shutting-down")
    [theirs_now] = [i for r in client(moto).describe_instances(InstanceIds=[theirs])["Reservations"] for i in r["Instances"]]
    assert theirs_now["State"]["Name"] in ("pending", "running")
    client(moto).terminate_instances(InstanceIds=[theirs])
    client(moto, "eu-west-1").terminate_instances(InstanceIds=[i for i, state in states.items() if state in ("pending", "running")])
    del gh.runners[waiting["id"]]


def test_cli_reap_dry_run_lists_what_it_would_do(moto, gh, subnets, tmp_path) -> None:
    gh.add_runner(L.runner_name(new_id(), time.time() - 7200), status="offline")
    result = cli(["runner", "reap", "--config", str(write_config(tmp_path, subnets)), "--dry-run"], gh, moto)
    assert result.exit_code == 0, result.output
    assert "would delete runner" in result.stdout and len(gh.runners) == 1


def test_reap_keeps_an_offline_runner_whose_instance_is_live() -> None:
    now = datetime.now(UTC)
    launch_id = "77-1-gpu"
    inst = {"InstanceId": "i-1", "State": {"Name": "running"}, "LaunchTime": now - timedelta(hours=1),
            "Tags": [{"Key": k, "Value": v}
                     for k, v in L.instance_tags(launch_id, "gpu", None, now + timedelta(hours=1), "n").items()]}
    runner = {"id": 5, "name": L.runner_name(launch_id, (now - timedelta(hours=1)).timestamp()), "status": "offline", "busy": False}
    plan = L.plan_reap([inst], [runner], now, timedelta(minutes=15))
    assert [(f.kind, f.action) for f in plan.actions] == [("instance", "keep"), ("runner", "keep")]


def test_an_instance_without_a_readable_expiry_counts_as_expired_after_the_default_age() -> None:
    now = datetime.now(UTC)
    tags = [{"Key": L.MANAGED_TAG, "Value": "true"}, {"Key": L.EXPIRES_TAG, "Value": "soon"}]
    old = {"InstanceId": "i-old", "State": {"Name": "running"}, "LaunchTime": now - timedelta(hours=7), "Tags": tags}
    new = {"InstanceId": "i-new", "State": {"Name": "running"}, "LaunchTime": now - timedelta(hours=1), "Tags": tags}
    plan = L.plan_reap([old, new], [], now, timedelta(minutes=15))
    assert [(f.id, f.action) for f in plan.actions] == [("i-old", "terminate"), ("i-new", "keep")]


# --- policy -----------------------------------------------------------------------------------------------------

def test_the_policy_lets_mlci_launch_and_terminate_only_what_it_tagged() -> None:
    result = CliRunner().invoke(app, ["runner", "policy"])
    assert result.exit_code == 0
    statements = {s["Sid"]: s for s in json.loads(result.stdout)["Statement"]}
    assert statements["MlciLaunchTaggedInstances"]["Condition"] == {"StringEquals": {"aws:RequestTag/mlci:managed": "true"}}
    assert statements["MlciTerminateOnlyItsOwn"]["Condition"] == {"StringEquals": {"aws:ResourceTag/mlci:managed": "true"}}
    assert statements["MlciTagOnlyWhenCreating"]["Condition"] == {"StringEquals": {"ec2:CreateAction": "RunInstances"}}
    actions = {a for s in statements.values() for a in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"])}
    assert actions == {"ec2:RunInstances", "ec2:CreateTags", "ec2:TerminateInstances", "ec2:DescribeInstances",
                       "ec2:DescribeImages", "ec2:DescribeRegions"}
    # No wildcard: ec2:Describe* would include DescribeInstanceAttribute, which reads a booting machine's
    # user data (its unused just-in-time runner configuration).
    assert not any("*" in action or "Attribute" in action for action in actions)


def test_the_policy_for_a_config_allows_only_its_instance_types_and_images(tmp_path: Path, subnets) -> None:
    """Given the default branch's config, the printed policy confines RunInstances to the machine types and images
    its launch tables name: a pull request's config asking for a p5.48xlarge or a community image is refused by IAM."""
    config = write_config(tmp_path, subnets)
    result = CliRunner().invoke(app, ["runner", "policy", "--config", str(config)])
    assert result.exit_code == 0, result.output
    statements = {s["Sid"]: s for s in json.loads(result.stdout)["Statement"]}
    launch = statements["MlciLaunchTaggedInstances"]["Condition"]["StringEquals"]
    assert launch == {"aws:RequestTag/mlci:managed": "true", "ec2:InstanceType": ["g5.xlarge"]}
    images = [r for r in statements["MlciLaunchFromImagesAndSubnets"]["Resource"] if ":image/" in r]
    assert images == [f"arn:aws:ec2:{REGION}::image/{IMAGE}"]
    unconfined = {s["Sid"]: s for s in json.loads(CliRunner().invoke(app, ["runner", "policy"]).stdout)["Statement"]}
    assert "ec2:InstanceType" not in unconfined["MlciLaunchTaggedInstances"]["Condition"]["StringEquals"]
    (tmp_path / "none.toml").write_text('[targets.cpu]\n[[models]]\npath = "m.onnx"\n')
    assert CliRunner().invoke(app, ["runner", "policy", "--config", str(tmp_path / "none.toml")]).exit_code == 2
