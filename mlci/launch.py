"""Ephemeral runners, the pure part: names, labels, tags, expiry, the start user data, the order of launch
attempts, which AWS errors mean "try elsewhere", what `reap` removes, the fork rule and the IAM policy.

No AWS, no GitHub, no environment here: `mlci.runners` does the calls, `mlci.commands.runner` reads the
environment. Everything an operator needs to trust about a runner (it powers itself off, it carries nothing
secret but its one-job registration, it is tagged so it can always be found) is decided in this module.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import shlex
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from mlci.config import LaunchConfig

NAME_PREFIX = "mlci-"
"""Every runner mlci registers is named and labelled with this prefix; `reap` touches no other runner."""
MANAGED_TAG = "mlci:managed"
"""Tag (value "true") on every instance mlci launches; the IAM policy lets mlci terminate only these."""
LAUNCH_TAG = "mlci:launch-id"
TARGET_TAG = "mlci:target"
RUN_TAG = "mlci:run"
EXPIRES_TAG = "mlci:expires-at"
RUNNER_TAG = "mlci:runner"
REPOSITORY_TAG = "mlci:repository"
"""OWNER/NAME of the repository whose run launched the instance: reap touches only its own repository's."""
BOOT_MARGIN_MIN = 10
"""Minutes a machine may take to boot before its dead-man timer starts: the expiry tag allows for them."""
DEFAULT_MAX_AGE_MIN = 6 * 60
"""An mlci instance whose expiry tag is missing or unreadable counts as expired this long after its launch."""
SPOT_INTERRUPTION = "Server.SpotInstanceTermination"
LIVE_STATES = ("pending", "running", "stopping", "stopped")
"""Instance states that cost money or may still run a job: what stop and reap terminate."""

_LAUNCH_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,47}")
_RUNNER_NAME = re.compile(re.escape(NAME_PREFIX) + r"(?P<launch>[A-Za-z0-9][A-Za-z0-9._-]{0,47})-(?P<created>\d{10})")
_JIT = re.compile(r"[A-Za-z0-9+/=]+")

CAPACITY_ERRORS = frozenset({
    "InsufficientInstanceCapacity", "InsufficientHostCapacity", "InsufficientReservedInstanceCapacity",
    "InsufficientCapacity", "InsufficientCapacityOnHost", "InsufficientFreeAddressesInSubnet",
    "SpotMaxPriceTooLow", "MaxSpotInstanceCountExceeded", "Unsupported", "VcpuLimitExceeded",
    "InstanceLimitExceeded", "SpotCapacityNotAvailable", "CapacityNotAvailable",
})
"""Error codes of RunInstances that say "not here, not now": the next subnet or market may still have room."""


def launch_id(run_id: str, attempt: str, target: str) -> str:
    """The id of one launched machine: this workflow run, this attempt, this target (a rerun launches anew)."""
    return f"{run_id}-{attempt}-{target}"


def launch_id_problem(launch_id: str) -> str | None:
    """What is wrong with a launch id (None when usable): it becomes a tag, a runner label and part of a name."""
    if _LAUNCH_ID.fullmatch(launch_id or ""):
        return None
    return (f"launch id {launch_id!r} is not usable: use 1 to 48 letters, digits, '.', '_' and '-', starting with a letter "
            "or digit (the workflow passes ${{ github.run_id }}-${{ github.run_attempt }}-TARGET)")


def runner_label(launch_id: str, key: str | None) -> str:
    """The one label a job's `runs-on` names: unique to the job, and unguessable, so no other job can ask for
    its machine first. The launch id is printed in logs; the label adds an HMAC of it under `key` (the runner
    token, a secret only the start job holds), and travels only as that job's output. Without a key it is the
    launch id alone."""
    if not key:
        return f"{NAME_PREFIX}{launch_id}"
    return f"{NAME_PREFIX}{launch_id}-{hmac.new(key.encode(), launch_id.encode(), hashlib.sha256).hexdigest()[:20]}"


def runner_name(launch_id: str, created: float) -> str:
    """The runner's name: the launch id and when it was registered (the runner API tells no age; reap needs one)."""
    return f"{NAME_PREFIX}{launch_id}-{int(created):010d}"


def parse_runner_name(name: str) -> tuple[str, int] | None:
    """(launch id, registration time) of a runner mlci named; None for any other runner."""
    m = _RUNNER_NAME.fullmatch(name)
    return (m.group("launch"), int(m.group("created"))) if m else None


def runner_belongs_to(runner: Mapping[str, Any], launch_id: str) -> bool:
    """Whether a runner (GitHub's runner object) was registered for this launch id, by its name."""
    parsed = parse_runner_name(str(runner.get("name", "")))
    return parsed is not None and parsed[0] == launch_id


def label_names(runner: Mapping[str, Any]) -> list[str]:
    labels = runner.get("labels")
    return [str(label.get("name")) for label in labels if isinstance(label, dict)] if isinstance(labels, list) else []


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str | None) -> datetime | None:
    """An ISO 8601 time as mlci writes it (or AWS does); None when missing or unreadable."""
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def expires_at(launched: datetime, max_minutes: int) -> datetime:
    """When an instance is overdue: its dead-man timer plus the time it may take to boot."""
    return launched + timedelta(minutes=max_minutes + BOOT_MARGIN_MIN)


def instance_tags(launch_id: str, target: str, run_url: str | None, expiry: datetime, runner: str,
                  repository: str | None = None) -> dict[str, str]:
    """The tags every instance gets at creation (the IAM policy allows tagging only then)."""
    tags = {
        "Name": runner,
        MANAGED_TAG: "true",
        LAUNCH_TAG: launch_id,
        TARGET_TAG: target,
        EXPIRES_TAG: iso(expiry),
        RUNNER_TAG: runner,
    }
    if run_url:
        tags[RUN_TAG] = run_url[:256]
    if repository:
        tags[REPOSITORY_TAG] = repository[:256]
    return tags


def user_data(jit_config: str, launch: LaunchConfig) -> str:
    """The boot script: arm the dead-man power-off first, run the runner for one job, power off.

    It holds the just-in-time runner configuration and nothing else secret. Nothing here echoes it
    (no `set -x`): cloud-init copies a script's output to the console log."""
    if not _JIT.fullmatch(jit_config):
        raise ValueError("the just-in-time runner configuration is not base64 text; refusing to put it in a script")
    directory, user = shlex.quote(launch.runner_dir), shlex.quote(launch.runner_user)
    return "\n".join([
        "#!/bin/bash",
        f"# mlci ephemeral runner: one job, then power off (dead-man: {launch.max_minutes} min).",
        f"shutdown -h +{launch.max_minutes} 'mlci: max_minutes reached' || poweroff --force --force",
        "trap 'shutdown -h now' EXIT",
        f"cd {directory} || exit 1",
        f"jit='{jit_config}'",
        f"if id -u {user} >/dev/null 2>&1; then",
        f"  chown -R {user} {directory}",
        f"  runuser -u {user} -- ./run.sh --jitconfig \"$jit\"",
        "else",
        "  RUNNER_ALLOW_RUNASROOT=1 ./run.sh --jitconfig \"$jit\"",
        "fi",
        "",
    ])


@dataclass(frozen=True)
class Attempt:
    market: str
    """"spot" or "on-demand"."""
    subnet: str


def attempts(launch: LaunchConfig) -> list[Attempt]:
    """Spot in every subnet first (when asked for), then on-demand in every subnet: same type, same image."""
    markets = ["spot", "on-demand"] if launch.spot else ["on-demand"]
    return [Attempt(market, subnet) for market in markets for subnet in launch.subnets]


def client_token(launch_id: str, runner_id: int, attempt: Attempt) -> str:
    """RunInstances' idempotency token: a request repeated after a lost reply launches nothing new.

    It names the registration too: a launch for a new registration is a new request (its user data differs)."""
    digest = hashlib.sha256(f"{launch_id}\0{runner_id}\0{attempt.market}\0{attempt.subnet}".encode()).hexdigest()
    return f"mlci-{digest[:59]}"


def is_capacity_error(code: str) -> bool:
    """Whether RunInstances' error code means "no room here" (try the next subnet or market)."""
    return code in CAPACITY_ERRORS


# --- stop -----------------------------------------------------------------------------------------------------

def interruption(instances: Iterable[Mapping[str, Any]]) -> str | None:
    """The id of an instance EC2 reclaimed (spot interruption), from DescribeInstances' instance objects."""
    for instance in instances:
        if (instance.get("StateReason") or {}).get("Code") == SPOT_INTERRUPTION:
            return str(instance.get("InstanceId"))
    return None


# --- reap -----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Found:
    """One thing reap looked at, what it does with it and why."""

    kind: str  # "instance" or "runner"
    id: str
    name: str
    action: str  # "terminate", "delete" or "keep"
    reason: str


@dataclass
class ReapPlan:
    actions: list[Found] = field(default_factory=list)

    def todo(self, kind: str) -> list[Found]:
        return [f for f in self.actions if f.kind == kind and f.action != "keep"]


def plan_reap(instances: Iterable[Mapping[str, Any]], runners: Iterable[Mapping[str, Any]], now: datetime,
              grace: timedelta, repository: str | None = None) -> ReapPlan:
    """What reap terminates and deletes: mlci instances past their expiry plus `grace`, and mlci's offline,
    idle runners registered more than `grace` ago whose launch has no live instance. Busy runners and anything
    younger than `grace` are kept. With `repository`, only that repository's instances count (an account
    shared by several repositories: each reaps its own); `instances` should span every region, so that a
    runner whose machine boots in another region is not taken for stale."""
    plan = ReapPlan()
    live_launches: set[str] = set()
    for inst in instances:
        tags = {t.get("Key"): t.get("Value") for t in inst.get("Tags") or [] if isinstance(t, dict)}
        if tags.get(MANAGED_TAG) != "true":
            continue
        if repository is not None and str(tags.get(REPOSITORY_TAG) or "").casefold() != repository.casefold():
            continue
        state = (inst.get("State") or {}).get("Name")
        iid, launch = str(inst.get("InstanceId")), str(tags.get(LAUNCH_TAG) or "?")
        if state not in LIVE_STATES:
            continue
        launched = inst.get("LaunchTime")
        launched = launched if isinstance(launched, datetime) else parse_time(str(launched) if launched else None)
        expiry = parse_time(tags.get(EXPIRES_TAG))
        note = ""
        if expiry is None:
            expiry = (launched or now) + timedelta(minutes=DEFAULT_MAX_AGE_MIN)
            note = f" (no readable {EXPIRES_TAG} tag: counted as {DEFAULT_MAX_AGE_MIN} min after launch)"
        if launched is not None and now - launched < grace:
            plan.actions.append(Found("instance", iid, launch, "keep",
                                      f"launched {_ago(now - launched)} ago, within the grace period"))
            live_launches.add(launch)
        elif now > expiry + grace:
            plan.actions.append(Found("instance", iid, launch, "terminate", f"expired at {iso(expiry)}{note}"))
        else:
            plan.actions.append(Found("instance", iid, launch, "keep", f"expires at {iso(expiry)}{note}"))
            live_launches.add(launch)
    for runner in runners:
        name = str(runner.get("name", ""))
        if not name.startswith(NAME_PREFIX):
            continue
        rid = str(runner.get("id"))
        parsed = parse_runner_name(name)
        if runner.get("busy"):
            plan.actions.append(Found("runner", rid, name, "keep", "busy with a job"))
        elif runner.get("status") != "offline":
            plan.actions.append(Found("runner", rid, name, "keep", f"{runner.get('status')}"))
        elif parsed is None:
            plan.actions.append(Found("runner", rid, name, "keep", "not named by mlci (no registration time): left alone"))
        elif parsed[0] in live_launches:
            plan.actions.append(Found("runner", rid, name, "keep", "its instance is still live"))
        elif now - datetime.fromtimestamp(parsed[1], UTC) < grace:
            plan.actions.append(Found("runner", rid, name, "keep",
                                      f"registered {_ago(now - datetime.fromtimestamp(parsed[1], UTC))} ago, within the grace period"))
        else:
            plan.actions.append(Found("runner", rid, name, "delete", "offline, idle, no live instance"))
    return plan


def _ago(delta: timedelta) -> str:
    seconds = max(0, int(delta.total_seconds()))
    return f"{seconds // 60} min {seconds % 60} s" if seconds >= 60 else f"{seconds} s"


# --- the IAM policy -------------------------------------------------------------------------------------------

def iam_policy(launches: Iterable[LaunchConfig] = ()) -> dict[str, Any]:
    """The least a role for `mlci runner` needs: launch only instances tagged mlci:managed=true at creation,
    tag only while creating, terminate only mlci's instances, read instances and images. Pass-role for an instance
    profile is left to the user (name the role they chose). Given the config's launch tables, launches are also
    confined to the instance types and images they name (a pull request's config cannot ask for another machine
    or a community image with this role)."""
    managed = f"aws:RequestTag/{MANAGED_TAG}"
    launches = list(launches)
    condition: dict[str, Any] = {"StringEquals": {managed: "true"}}
    images = ["arn:aws:ec2:*::image/*"]
    if launches:
        condition["StringEquals"]["ec2:InstanceType"] = sorted({launch.instance_type for launch in launches})
        images = sorted({f"arn:aws:ec2:{launch.region}::image/{launch.image}" for launch in launches})
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "MlciLaunchTaggedInstances",
                "Effect": "Allow",
                "Action": "ec2:RunInstances",
                "Resource": ["arn:aws:ec2:*:*:instance/*", "arn:aws:ec2:*:*:volume/*"],
                "Condition": condition,
            },
            {
                "Sid": "MlciLaunchFromImagesAndSubnets",
                "Effect": "Allow",
                "Action": "ec2:RunInstances",
                "Resource": [
                    *images, "arn:aws:ec2:*:*:subnet/*", "arn:aws:ec2:*:*:network-interface/*",
                    "arn:aws:ec2:*:*:security-group/*", "arn:aws:ec2:*:*:spot-instances-request/*",
                ],
            },
            {
                "Sid": "MlciTagOnlyWhenCreating",
                "Effect": "Allow",
                "Action": "ec2:CreateTags",
                "Resource": ["arn:aws:ec2:*:*:instance/*", "arn:aws:ec2:*:*:volume/*",
                             "arn:aws:ec2:*:*:spot-instances-request/*"],
                "Condition": {"StringEquals": {"ec2:CreateAction": "RunInstances"}},
            },
            {
                "Sid": "MlciTerminateOnlyItsOwn",
                "Effect": "Allow",
                "Action": "ec2:TerminateInstances",
                "Resource": "arn:aws:ec2:*:*:instance/*",
                "Condition": {"StringEquals": {f"aws:ResourceTag/{MANAGED_TAG}": "true"}},
            },
            {
                # The reads mlci makes (reap looks in every enabled region); not ec2:Describe*, which includes
                # DescribeInstanceAttribute and so the user data of a machine still booting (its just-in-time
                # runner configuration).
                "Sid": "MlciDescribe",
                "Effect": "Allow",
                "Action": ["ec2:DescribeInstances", "ec2:DescribeImages", "ec2:DescribeRegions"],
                "Resource": "*",
            },
        ],
    }
