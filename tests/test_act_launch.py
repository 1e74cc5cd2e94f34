"""A target with `launch` under act: the reusable workflow starts its machine, runs its bench job on
the machine's one-job runner, and stops it afterwards, even when the bench job fails.

The consumer repository has one target whose `launch` table asks for an EC2 machine. EC2 is a real
moto_server; GitHub is the local server that validates every call against GitHub's OpenAPI description
(its runners come online when first asked); the bench job runs on this host under the runner label the
plan job gave the target. The bench job fails (the model file is missing), as a broken job on a real
machine would: the stop job must still terminate the instance and delete the runner."""

from __future__ import annotations

import re
import shutil

import pytest

from mlci.launch import runner_label

from .conftest import git, new_git_repo
from .github_server import FakeGitHub
from .servers import FAKE_AWS, moto_server
from .test_act_e2e import MAIN_ROLE, ROOT, push_event, roles_asked, run_act, tail, world  # noqa: F401 - world is a fixture

pytestmark = pytest.mark.slow

LAUNCH_ID = "1-1-gpu"  # act's run id and attempt are 1
RUNNER_ROLE = "arn:aws:iam::123456789012:role/mlci-runners"
IMAGE = "ami-03cf127a"  # one of moto's stock images
CONFIG = f"""\
[tuning]
trials = 0

[targets.gpu]
tvm = "host"
launch = {{ region = "us-east-1", instance_type = "g5.xlarge", image = "{IMAGE}", subnets = ["SUBNET"], max_minutes = 30 }}

[[models]]
name = "net"
path = "models/missing.onnx"
"""


def ec2_client(url: str):  # noqa: ANN201 - a boto3 client
    import boto3

    return boto3.client("ec2", region_name="us-east-1", endpoint_url=url, aws_access_key_id=FAKE_AWS["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=FAKE_AWS["AWS_SECRET_ACCESS_KEY"])


@pytest.fixture(scope="module")
def launched_run(world: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:  # noqa: F811 - the imported fixture
    gh: FakeGitHub = world["gh"]
    gh.online_after_polls = 1  # the machine's runner connects as soon as start asks
    with moto_server() as moto:
        ec2 = ec2_client(moto.url)
        vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
        subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.0.1.0/24")["Subnet"]["SubnetId"]
        root = tmp_path_factory.mktemp("gadgets")
        new_git_repo(root)
        git(root, "remote", "add", "origin", "https://github.com/octo-org/widgets.git")
        (root / ".github" / "workflows").mkdir(parents=True)
        shutil.copyfile(ROOT / "workflows" / "mlci.yml", root / ".github" / "workflows" / "mlci.yml")
        (root / "mlci.toml").write_text(CONFIG.replace("SUBNET", subnet))
        git(root, "add", "-A")
        git(root, "commit", "-qm", "a launched target")
        done = run_act(root, world, "main", "launch", event=("push", push_event(root)),
                       platforms=(runner_label(LAUNCH_ID, gh.token),), secrets={"MLCI_RUNNER_TOKEN": gh.token},
                       variables={"MLCI_RUNNER_ROLE": RUNNER_ROLE}, env_extra={"AWS_ENDPOINT_URL_EC2": moto.url})
        instances = [i for r in ec2.describe_instances()["Reservations"] for i in r["Instances"]]
    calls = [(r.method, r.path) for r in gh.requests if "/actions/runners" in r.path]
    return {"done": done, "log": done.stdout + done.stderr, "instances": instances, "calls": calls}


def job_lines(log: str, job: str) -> list[int]:
    """Indices of the log lines act wrote for one job (its lines start with [mlci/JOB])."""
    return [i for i, line in enumerate(log.splitlines()) if re.match(rf"\[[^\]]*/{re.escape(job)}\s*\]", line)]


def test_start_then_bench_on_the_launched_machine_then_stop(launched_run: dict, world: dict) -> None:  # noqa: F811
    log, done = launched_run["log"], launched_run["done"]
    assert world["gh"].errors == [], world["gh"].errors
    start, bench, stop = job_lines(log, "start"), job_lines(log, "bench (gpu)"), job_lines(log, "stop (gpu)")
    assert start and bench and stop, tail(done, 150)
    assert max(start) < min(bench) and max(bench) < min(stop), tail(done, 150)  # one after the other
    # The bench job ran on the label only this machine's runner carries (act maps no other label to this host),
    # which no step printed: it is an HMAC under the runner token, passed as start's output.
    label = runner_label(LAUNCH_ID, world["gh"].token)
    assert not any(label in line for i in start + bench for line in [log.splitlines()[i]] if "::set-output::" not in line)
    assert not any("No machine started" in log.splitlines()[i] for i in bench), tail(done, 150)
    # start and stop, and only they, assumed the runner role (GitHub OIDC); bench the tuning cache's
    roles = set(roles_asked(world, "launch"))
    assert {job for job, role in roles if role == RUNNER_ROLE} == {"start", "stop"}, roles
    assert {role for job, role in roles if job == "bench-launched"} == {MAIN_ROLE}, roles
    # GitHub saw: a just-in-time runner registered, asked after until online, deleted by stop
    calls = launched_run["calls"]
    assert calls[0] == ("POST", "/repos/octo-org/widgets/actions/runners/generate-jitconfig"), calls
    assert calls[-1][0] == "DELETE", calls
    assert world["gh"].runners == {}


def test_stop_runs_when_the_bench_job_fails_and_leaves_no_machine(launched_run: dict) -> None:
    log, done = launched_run["log"], launched_run["done"]
    assert done.returncode != 0  # the bench job failed (no model file), and so the run
    assert any("Job failed" in log.splitlines()[i] for i in job_lines(log, "bench (gpu)")), tail(done, 150)
    assert any("Job succeeded" in log.splitlines()[i] for i in job_lines(log, "stop (gpu)")), tail(done, 150)
    [instance] = launched_run["instances"]  # one machine was launched, and it is gone
    assert instance["State"]["Name"] in ("terminated", "shutting-down")
    tags = {t["Key"]: t["Value"] for t in instance.get("Tags", [])}
    assert tags["mlci:launch-id"] == LAUNCH_ID and tags["mlci:managed"] == "true"
