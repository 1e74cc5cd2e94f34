"""Ephemeral cloud runners: one EC2 instance per bench job, registered with GitHub as a just-in-time runner.

`start` registers a one-job runner, launches one instance for it (spot first across the subnets, then
on-demand of the same type and image), and waits until the runner is online; `stop` terminates whatever
carries the launch id and deletes the runner; `reap` removes what stop could not (expired instances, offline
runners). The decisions live in `mlci.launch`; this module does the calls. AWS credentials come from boto3's
usual chain; every boto3 client has bounded timeouts and retries. The GitHub token never appears in any
message (GitHubClient scrubs it) and the user data is never logged.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from mlci import launch as L
from mlci.config import LaunchConfig
from mlci.github import GitHubClient, GitHubError

Log = Callable[[str], None]

EC2_CONNECT_TIMEOUT_S = 10
EC2_READ_TIMEOUT_S = 30
EC2_MAX_ATTEMPTS = 5
GITHUB_DEADLINE_S = 120.0
"""What one phase of a command may spend on GitHub (the online wait has its own, longer, budget)."""


class RunnerError(Exception):
    """A runner could not be started, stopped or reaped; the message says what and what is left behind."""


class SpotReclaimed(RunnerError):
    """EC2 reclaimed a spot instance before its runner came online (start then tries on-demand)."""


def ec2_client(region: str, **kwargs: Any) -> Any:
    """A boto3 EC2 client with bounded connect/read timeouts and retries (endpoint from the usual AWS settings,
    AWS_ENDPOINT_URL_EC2 included)."""
    import boto3
    from botocore.config import Config

    config = Config(connect_timeout=EC2_CONNECT_TIMEOUT_S, read_timeout=EC2_READ_TIMEOUT_S,
                    retries={"max_attempts": EC2_MAX_ATTEMPTS, "mode": "standard"})
    return boto3.client("ec2", region_name=region, config=config, **kwargs)


def aws_error(exc: Exception) -> tuple[str, str]:
    """(code, message) of a botocore ClientError; ("", text) for anything else botocore raises."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        error = response.get("Error") or {}
        return str(error.get("Code") or ""), str(error.get("Message") or exc)
    return "", str(exc)


def _botocore_errors() -> tuple[type[Exception], ...]:
    from botocore.exceptions import BotoCoreError, ClientError

    return (ClientError, BotoCoreError)


# --- GitHub ---------------------------------------------------------------------------------------------------

class RunnerGitHub:
    """The repository's self-hosted runner endpoints. `client_for(deadline)` builds a GitHubClient whose calls
    together take at most `deadline` seconds (a fresh one per phase: cleanup after a timeout still gets time)."""

    def __init__(self, repository: str, client_for: Callable[[float], GitHubClient]) -> None:
        self.repository = repository
        self.client_for = client_for
        self._path = f"/repos/{repository}/actions/runners"

    def register(self, name: str, labels: list[str], group: int) -> tuple[dict, str]:
        """A just-in-time runner: (GitHub's runner object, the encoded JIT configuration the runner binary takes)."""
        body = {"name": name, "runner_group_id": group, "labels": labels, "work_folder": "_work"}
        _, payload, _ = self.client_for(GITHUB_DEADLINE_S).request("POST", f"{self._path}/generate-jitconfig", body)
        if not (isinstance(payload, dict) and isinstance(payload.get("runner"), dict)
                and isinstance(payload["runner"].get("id"), int) and isinstance(payload.get("encoded_jit_config"), str)):
            raise RunnerError(f"GitHub's answer to generate-jitconfig for {self.repository} has no runner id or configuration")
        return payload["runner"], payload["encoded_jit_config"]

    def get(self, runner_id: int, client: GitHubClient | None = None) -> dict | None:
        """The runner, or None when GitHub no longer knows it."""
        try:
            _, payload, _ = (client or self.client_for(GITHUB_DEADLINE_S)).request("GET", f"{self._path}/{runner_id}")
        except GitHubError as exc:
            if exc.status == 404:
                return None
            raise
        return payload if isinstance(payload, dict) else None

    def all(self, deadline: float = GITHUB_DEADLINE_S) -> Iterator[dict]:
        """Every runner of the repository (all pages)."""
        client = self.client_for(deadline)
        for page in client.paginate(f"{self._path}?per_page=100"):
            runners = page.get("runners") if isinstance(page, dict) else None
            for runner in runners if isinstance(runners, list) else []:
                if isinstance(runner, dict):
                    yield runner

    def delete(self, runner_id: int) -> bool:
        """Remove a runner; False when it was already gone."""
        try:
            self.client_for(GITHUB_DEADLINE_S).request("DELETE", f"{self._path}/{runner_id}")
        except GitHubError as exc:
            if exc.status == 404:
                return False
            raise
        return True


# --- start ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StartRequest:
    launch_id: str
    target: str
    launch: LaunchConfig
    run_url: str | None = None
    label_key: str | None = field(default=None, repr=False)
    """The secret the runner label's nonce is derived from (see launch.runner_label)."""
    repository: str | None = None
    """OWNER/NAME, tagged on the instance (reap touches only its own repository's instances)."""


@dataclass
class Started:
    launch_id: str
    label: str
    runner_id: int
    runner_name: str
    instance_id: str
    market: str
    subnet: str
    resumed: bool = False
    """True when an earlier start of this launch id had launched the instance already."""
    tried: list[str] = field(default_factory=list)
    """Attempts that found no capacity, as "market in subnet: code"."""


def _managed_instances(ec2: Any, launch_id: str | None = None, states: tuple[str, ...] | None = None) -> list[dict]:
    """Instances tagged as mlci's (of one launch id, when given; in these states, when given), every page."""
    filters = [{"Name": f"tag:{L.MANAGED_TAG}", "Values": ["true"]}]
    if launch_id is not None:
        filters.append({"Name": f"tag:{L.LAUNCH_TAG}", "Values": [launch_id]})
    if states:
        filters.append({"Name": "instance-state-name", "Values": list(states)})
    found = []
    for page in ec2.get_paginator("describe_instances").paginate(Filters=filters):
        for reservation in page.get("Reservations", []):
            found.extend(reservation.get("Instances", []))
    return found


def _market(instance: dict) -> str:
    return "spot" if instance.get("InstanceLifecycle") == "spot" else "on-demand"


def _tag(instance: dict, key: str) -> str | None:
    return next((t.get("Value") for t in instance.get("Tags") or [] if t.get("Key") == key), None)


def start(request: StartRequest, ec2: Any, github: RunnerGitHub, *, online_timeout: float, poll_interval: float = 5.0,
          log: Log = lambda _: None, clock: Callable[[], float] = time.time, sleep: Callable[[float], None] = time.sleep,
          ) -> Started:
    """One runner for one job, online. A repeated start of the same launch id resumes the instance an earlier
    start launched instead of launching a second. On failure nothing is left running: the instance is
    terminated and the runner deleted before RunnerError is raised (`stop` covers a start killed mid-way)."""
    launch_id, label = request.launch_id, L.runner_label(request.launch_id, request.label_key)
    live = _managed_instances(ec2, launch_id, ("pending", "running"))
    # GitHub is asked about earlier registrations only when an earlier start launched: a runner registered by a
    # start that died before launching is offline with an unused configuration, and stop removes it with this one.
    mine = [r for r in github.all() if L.runner_belongs_to(r, launch_id)] if live else []
    if live:
        instance = live[0]
        runner = next((r for r in mine if r.get("name") == _tag(instance, L.RUNNER_TAG)), None)
        if runner is not None and len(live) == 1:
            log(f"resuming launch {launch_id}: instance {instance['InstanceId']} and runner {runner['name']} exist already")
            started = Started(launch_id, label, int(runner["id"]), str(runner["name"]), str(instance["InstanceId"]),
                              _market(instance),
                              str(instance.get("SubnetId")), resumed=True)
            _wait_online(started, ec2, github, online_timeout, poll_interval, log, clock, sleep)
            return started
    # Leftovers of an earlier start that cannot serve this one (a runner without its machine, or the reverse).
    _clean(ec2, github, launch_id, [i["InstanceId"] for i in live], mine, log)

    now = clock()
    name = L.runner_name(launch_id, now)
    runner, jit = github.register(name, [label], request.launch.runner_group_id)
    started = None
    try:
        started = _launch(request, ec2, runner, jit, now, log)
        try:
            _wait_online(started, ec2, github, online_timeout, poll_interval, log, clock, sleep)
        except SpotReclaimed as exc:
            # EC2 took the spot machine back while it booted: that is "no capacity", not a broken image. A fresh
            # registration (the first one's configuration may have been read) and on-demand of the same type.
            log(f"{exc}; starting on-demand instead")
            _terminate(ec2, [started.instance_id], log)  # gone already as EC2 tells it; never left running
            github.delete(int(runner["id"]))
            now = clock()
            runner, jit = github.register(L.runner_name(launch_id, now), [label], request.launch.runner_group_id)
            on_demand = dataclasses.replace(request, launch=dataclasses.replace(request.launch, spot=False))
            started = _launch(on_demand, ec2, runner, jit, now, log)
            _wait_online(started, ec2, github, online_timeout, poll_interval, log, clock, sleep)
        return started
    except BaseException as exc:
        # A RunInstances whose reply was lost may still have launched: look for the launch's tag too.
        doomed = {started.instance_id} if started else set()
        try:
            doomed |= {i["InstanceId"] for i in _managed_instances(ec2, launch_id, L.LIVE_STATES)}
        except _botocore_errors():
            pass
        problems = _clean(ec2, github, launch_id, sorted(doomed), [runner], log, quiet=True)
        if problems and isinstance(exc, RunnerError):
            raise RunnerError(f"{exc}; cleaning up failed too: {'; '.join(problems)}") from None
        raise


def _launch(request: StartRequest, ec2: Any, runner: dict, jit: str, now: float, log: Log) -> Started:
    launch = request.launch
    launched = datetime.fromtimestamp(now, UTC)
    tags = L.instance_tags(request.launch_id, request.target, request.run_url,
                           L.expires_at(launched, launch.max_minutes), str(runner["name"]), request.repository)
    tag_list = [{"Key": k, "Value": v} for k, v in tags.items()]
    script = L.user_data(jit, launch)
    params: dict[str, Any] = {
        "ImageId": launch.image,
        "InstanceType": launch.instance_type,
        "MinCount": 1,
        "MaxCount": 1,
        "UserData": script,
        "InstanceInitiatedShutdownBehavior": "terminate",
        "MetadataOptions": {"HttpTokens": "required", "HttpEndpoint": "enabled", "HttpPutResponseHopLimit": 1},
        "TagSpecifications": [{"ResourceType": "instance", "Tags": tag_list}, {"ResourceType": "volume", "Tags": tag_list}],
    }
    if launch.instance_profile:
        key = "Arn" if launch.instance_profile.startswith("arn:") else "Name"
        params["IamInstanceProfile"] = {key: launch.instance_profile}
    if launch.volume_gb:
        params["BlockDeviceMappings"] = [{"DeviceName": _root_device(ec2, launch.image),
                                          "Ebs": {"VolumeSize": launch.volume_gb, "VolumeType": "gp3", "DeleteOnTermination": True}}]
    tried: list[str] = []
    for attempt in L.attempts(launch):
        call = dict(params, SubnetId=attempt.subnet, ClientToken=L.client_token(request.launch_id, int(runner["id"]), attempt))
        if launch.security_groups:
            call["SecurityGroupIds"] = list(launch.security_groups)
        if attempt.market == "spot":
            call["InstanceMarketOptions"] = {"MarketType": "spot", "SpotOptions": {
                "SpotInstanceType": "one-time", "InstanceInterruptionBehavior": "terminate"}}
        try:
            reply = ec2.run_instances(**call)
        except _botocore_errors() as exc:
            code, message = aws_error(exc)
            if L.is_capacity_error(code):
                tried.append(f"{attempt.market} in {attempt.subnet}: {code}")
                log(f"no {attempt.market} {launch.instance_type} in {attempt.subnet} ({code}); trying the next")
                continue
            raise RunnerError(_fatal_message(code, message, launch, attempt)) from None
        instance = reply["Instances"][0]
        log(f"launched {attempt.market} {launch.instance_type} {instance['InstanceId']} in {attempt.subnet}")
        return Started(request.launch_id, L.runner_label(request.launch_id, request.label_key), int(runner["id"]), str(runner["name"]),
                       str(instance["InstanceId"]), attempt.market, attempt.subnet, tried=tried)
    raise RunnerError(f"no capacity for {launch.instance_type} ({launch.image}) in {launch.region}: "
                      + "; ".join(tried) + ". Add subnets in other availability zones, or retry later")


def _fatal_message(code: str, message: str, launch: LaunchConfig, attempt: L.Attempt) -> str:
    hint = ""
    if code.startswith("InvalidAMIID") or "image" in message.lower():
        hint = f" (check the image {launch.image} exists in {launch.region} and this account may launch it)"
    elif code in ("UnauthorizedOperation", "AuthFailure") or "not authorized" in message.lower():
        hint = (" (the role needs the policy `mlci runner policy` prints; RunInstances is allowed only with the tag "
                f"{L.MANAGED_TAG}=true)")
    elif code.startswith("InvalidSubnet") or code.startswith("InvalidGroup"):
        hint = f" (check subnets and security groups of the launch table exist in {launch.region})"
    return f"EC2 refused to launch {launch.instance_type} in {attempt.subnet}: {code or 'error'}: {message}{hint}"


def _root_device(ec2: Any, image: str) -> str:
    images = ec2.describe_images(ImageIds=[image]).get("Images") or []
    device = images[0].get("RootDeviceName") if images else None
    if not device:
        raise RunnerError(f"image {image}: EC2 does not say its root device, needed for volume_gb")
    return str(device)


def _wait_online(started: Started, ec2: Any, github: RunnerGitHub, timeout: float, interval: float, log: Log,
                 clock: Callable[[], float], sleep: Callable[[float], None]) -> None:
    """Poll the runner until GitHub says it is online; fail early when its instance is gone."""
    deadline = clock() + timeout
    client = github.client_for(timeout + GITHUB_DEADLINE_S)
    while True:
        runner = github.get(started.runner_id, client)
        if runner is None:
            raise RunnerError(f"runner {started.runner_name} vanished from GitHub before it came online")
        if runner.get("status") == "online":
            log(f"runner {started.runner_name} is online on {started.instance_id}")
            return
        described = ec2.describe_instances(InstanceIds=[started.instance_id])
        instances = [i for r in described.get("Reservations", []) for i in r.get("Instances", [])]
        state = (instances[0].get("State") or {}).get("Name") if instances else "gone"
        if state not in ("pending", "running"):
            reason = (instances[0].get("StateReason") or {}).get("Message", "") if instances else ""
            if instances and L.interruption(instances) and started.market == "spot":
                raise SpotReclaimed(f"spot instance {started.instance_id} was reclaimed before its runner came online")
            raise RunnerError(f"instance {started.instance_id} is {state} before its runner came online"
                              + (f" ({reason})" if reason else ""))
        if clock() >= deadline:
            raise RunnerError(f"runner {started.runner_name} was not online within {timeout:g} s "
                              f"(instance {started.instance_id} is {state}); check the image has the runner in its runner_dir")
        sleep(min(interval, max(0.0, deadline - clock())))


def _terminate(ec2: Any, instance_ids: list[str], log: Log, why: str = "") -> list[str]:
    """Terminate these instances; returns the problem, named, when EC2 refused (nothing when there is none)."""
    if not instance_ids:
        return []
    try:
        ec2.terminate_instances(InstanceIds=instance_ids)
    except _botocore_errors() as exc:
        code, message = aws_error(exc)
        return [f"instance(s) {', '.join(instance_ids)} not terminated: {code or 'error'}: {message}"]
    log(f"terminated {', '.join(instance_ids)}{why}")
    return []


def _clean(ec2: Any, github: RunnerGitHub | None, launch_id: str, instance_ids: list[str], runners: list[dict], log: Log,
           *, quiet: bool = False) -> list[str]:
    """Terminate these instances and delete these runners; returns what could not be cleaned, named."""
    problems = _terminate(ec2, instance_ids, log, f" (launch {launch_id})")
    for runner in runners if github is not None else []:
        try:
            if github.delete(int(runner["id"])):
                log(f"deleted runner {runner.get('name')}")
        except GitHubError as exc:
            problems.append(f"runner {runner.get('name')} (id {runner.get('id')}) not deleted: {exc}")
    if problems and not quiet:
        raise RunnerError("; ".join(problems))
    return problems


# --- stop -----------------------------------------------------------------------------------------------------

@dataclass
class StopReport:
    launch_id: str
    target: str | None
    outcome: str  # "stopped", "interrupted" or "nothing_to_stop"
    instances: list[dict]
    runners: list[str]
    reason: str
    problems: list[str] = field(default_factory=list)
    """What could not be cleaned up (an orphan remains): non-empty means stop failed."""

    def as_json(self) -> dict[str, Any]:
        return {"launch_id": self.launch_id, "target": self.target, "outcome": self.outcome, "instances": self.instances,
                "runners": self.runners, "reason": self.reason, "problems": self.problems}


def stop(launch_id: str, target: str | None, ec2: Any, github: RunnerGitHub | None, *, log: Log = lambda _: None) -> StopReport:
    """Terminate every instance carrying the launch id and delete its runner. A spot interruption is an outcome,
    not a failure; only what could not be cleaned up is (`problems`)."""
    problems: list[str] = []
    try:
        found = _managed_instances(ec2, launch_id)
    except _botocore_errors() as exc:
        code, message = aws_error(exc)
        found = []
        problems.append(f"could not list the instances of launch {launch_id}: {code or 'error'}: {message}")
    interrupted = L.interruption(found)
    live = [i["InstanceId"] for i in found if (i.get("State") or {}).get("Name") in L.LIVE_STATES]
    problems += _terminate(ec2, live, log, f" (launch {launch_id})")
    runners: list[str] = []
    if github is None:
        log("no GitHub token: runners not checked (reap removes any left)")
    else:
        try:
            mine = [r for r in github.all() if L.runner_belongs_to(r, launch_id)]
        except GitHubError as exc:
            mine = []
            problems.append(f"could not list the runners of {github.repository}: {exc}")
        runners = [str(r.get("name")) for r in mine]
        problems += _clean(ec2, github, launch_id, [], mine, log, quiet=True)
    instances = [{"id": i.get("InstanceId"), "state": (i.get("State") or {}).get("Name"),
                  "market": _market(i),
                  "state_reason": (i.get("StateReason") or {}).get("Code")} for i in found]
    if interrupted:
        outcome = "interrupted"
        reason = (f"EC2 reclaimed spot instance {interrupted} ({L.SPOT_INTERRUPTION}): "
                  "the job lost its machine, not a failure of the model")
    elif found or runners:
        outcome = "stopped"
        reason = (f"terminated {', '.join(live)}" if live else "instance(s) had already powered off") + (
            f"; removed runner(s) {', '.join(runners)}" if runners else "")
    else:
        outcome, reason = "nothing_to_stop", f"no instance or runner carries launch id {launch_id}"
    return StopReport(launch_id, target, outcome, instances, runners, reason, problems)


# --- reap -----------------------------------------------------------------------------------------------------

def enabled_regions(ec2: Any) -> list[str]:
    """Every region this account may use (DescribeRegions), so reap finds instances in regions no config names."""
    return sorted(str(r["RegionName"]) for r in ec2.describe_regions().get("Regions", []) if r.get("RegionName"))


def reap(ec2_for: Callable[[str], Any], regions: list[str], github: RunnerGitHub, *, grace: timedelta, dry_run: bool,
         repository: str | None = None, now: datetime | None = None,
         log: Log = lambda _: None) -> tuple[L.ReapPlan, dict[str, str], list[str]]:
    """Terminate expired mlci instances of `repository` in every region of `regions`, and delete stale mlci
    runners (see `launch.plan_reap`), judged against the live instances of all regions together. Returns the
    plan, instance id -> region, and what failed (a region that cannot be read is one problem, not the end)."""
    now = now or datetime.now(UTC)
    instances: list[dict] = []
    region_of: dict[str, str] = {}
    problems: list[str] = []
    clients: dict[str, Any] = {}
    for region in regions:
        try:
            clients[region] = ec2_for(region)
            found = _managed_instances(clients[region], states=L.LIVE_STATES)
        except _botocore_errors() as exc:
            code, message = aws_error(exc)
            problems.append(f"region {region} not read: {code + ': ' if code else ''}{message}")
            continue
        instances += found
        region_of.update({str(i.get("InstanceId")): region for i in found})
    plan = L.plan_reap(instances, list(github.all()), now, grace, repository)
    if dry_run:
        return plan, region_of, problems
    for region in regions:
        doomed = [f.id for f in plan.todo("instance") if region_of.get(f.id) == region]
        if doomed:
            problems += _terminate(clients[region], doomed, log)
    for found in plan.todo("runner"):
        try:
            github.delete(int(found.id))
            log(f"deleted runner {found.name}")
        except GitHubError as exc:
            problems.append(f"runner {found.name} (id {found.id}) not deleted: {exc}")
    return plan, region_of, problems
