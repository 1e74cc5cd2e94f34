"""`mlci runner start | stop | reap | policy`: one ephemeral EC2 runner per bench job.

The glue between the environment (GITHUB_*, MLCI_RUNNER_TOKEN, AWS credentials from boto3's chain), the
config's `[targets.NAME.launch]` table and `mlci.runners`. Exit codes: 0 done, 1 the runner could not be
started or cleaned up (the message names what is left), 2 usage, configuration or a refused fork, 3 internal.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

import typer

from mlci.config import DEFAULT_CONFIG_NAME, ConfigError, LaunchConfig, load_config

TOKEN_ENV = "MLCI_RUNNER_TOKEN"
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3
DEFAULT_ONLINE_TIMEOUT_S = 600.0
DEFAULT_GRACE_MIN = 15

runner_app = typer.Typer(
    name="runner",
    help="Ephemeral cloud runners: one EC2 instance per bench job, registered as a just-in-time GitHub runner.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


class UsageError(Exception):
    """Bad options, config or environment: exit 2."""


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


@contextmanager
def _exit_codes() -> Iterator[None]:
    from mlci.github import GitHubError
    from mlci.runners import RunnerError

    try:
        yield
    except (UsageError, ConfigError) as exc:
        _say(f"error: {exc}")
        raise typer.Exit(EXIT_USAGE) from None
    except (RunnerError, GitHubError) as exc:
        _say(f"error: {exc}")
        raise typer.Exit(EXIT_FAILED) from None
    except typer.Exit:
        raise
    except Exception as exc:  # botocore's credential and endpoint errors land here too
        from mlci.runners import aws_error

        code, message = aws_error(exc)
        if code or type(exc).__module__.startswith("botocore"):
            _say(f"error: AWS: {code + ': ' if code else ''}{message}")
            raise typer.Exit(EXIT_FAILED) from None
        import traceback

        _say("internal error (please report it):\n" + traceback.format_exc())
        raise typer.Exit(EXIT_INTERNAL) from None


def _env(environ: Mapping[str, str] | None = None) -> Mapping[str, str]:
    return os.environ if environ is None else environ


def _launch_of(config: Path, target: str) -> LaunchConfig:
    cfg = load_config(config)
    if target not in cfg.targets:
        raise UsageError(f"{config}: no target {target!r} (targets: {', '.join(cfg.targets)})")
    launch = cfg.targets[target].launch
    if launch is None:
        raise UsageError(f"{config}: targets.{target} has no launch table: say how to get its machine, e.g. "
                         'launch = { provider = "aws", region = "us-east-1", instance_type = "g5.xlarge", '
                         'image = "ami-...", subnets = ["subnet-..."] }')
    return launch


def _launch_id(value: str) -> str:
    from mlci.launch import launch_id_problem

    problem = launch_id_problem(value)
    if problem:
        raise UsageError(problem)
    return value


def _repository(value: str | None, env: Mapping[str, str]) -> str:
    repo = value or env.get("GITHUB_REPOSITORY") or ""
    parts = repo.split("/")
    if len(parts) != 2 or not all(parts):
        raise UsageError(f"--repo: expected OWNER/NAME (default: GITHUB_REPOSITORY), got {repo!r}")
    return repo


def _github(repo: str, env: Mapping[str, str], *, required: bool) -> Any:
    """The runner endpoints with MLCI_RUNNER_TOKEN (never GITHUB_TOKEN: a workflow's token cannot register runners)."""
    from mlci.github import GitHubClient
    from mlci.runners import RunnerGitHub

    token = env.get(TOKEN_ENV, "").strip()
    if not token:
        if required:
            raise UsageError(f"{TOKEN_ENV} is not set: a GitHub App installation token or fine-grained token with "
                             "repository 'Administration: write' registers the runner (GITHUB_TOKEN cannot)")
        return None
    api = (env.get("GITHUB_API_URL") or "https://api.github.com").rstrip("/")
    return RunnerGitHub(repo, lambda deadline: GitHubClient(api, token, deadline=deadline, timeout=20.0))


def _ec2(region: str) -> Any:
    from mlci.runners import ec2_client

    return ec2_client(region)


def _write_outputs(values: dict[str, str], env: Mapping[str, str]) -> None:
    from mlci.actions import write_outputs

    path = env.get("GITHUB_OUTPUT")
    if path:
        write_outputs(Path(path), values)


def _fork_refusal(fork: bool, env: Mapping[str, str]) -> str | None:
    """Why this run may not get a machine (None when it may): the run's trust tier (mlci.policy) says so."""
    from mlci.actions import GitHubContext

    if fork:
        return "--fork: the workflow says this run comes from a fork"
    trust = GitHubContext.from_env(env).trust
    return None if trust.may_launch else trust.reason


def _run_url(value: str | None, env: Mapping[str, str]) -> str | None:
    if value:
        return value
    server, repo, run = env.get("GITHUB_SERVER_URL", "https://github.com"), env.get("GITHUB_REPOSITORY"), env.get("GITHUB_RUN_ID")
    return f"{server.rstrip('/')}/{repo}/actions/runs/{run}" if repo and run else None


def _terminate_on_sigterm() -> None:
    """A cancelled workflow sends SIGTERM: turn it into SystemExit so start cleans up what it launched."""
    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    try:
        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (tests driving the CLI in a thread)
        pass


ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="Path to mlci.toml.")]
TargetOpt = Annotated[str, typer.Option("--target", "-t", help="The target whose launch table says what machine to start.")]
LaunchIdOpt = Annotated[str, typer.Option("--launch-id",
                                          help="Unique per job: ${{ github.run_id }}-${{ github.run_attempt }}-TARGET.")]
RepoOpt = Annotated[str | None, typer.Option("--repo", help="OWNER/NAME the runner registers with (default: GITHUB_REPOSITORY).")]


@runner_app.command("start")
def start_command(
    target: Annotated[list[str], typer.Option("--target", "-t", help="A target whose launch table says what machine to "
                                              "start (repeatable: the machines start side by side).")],
    launch_id: Annotated[str | None, typer.Option(
        "--launch-id", help="With one target: its launch id (default: GITHUB_RUN_ID-GITHUB_RUN_ATTEMPT-TARGET).")] = None,
    config: ConfigOpt = Path(DEFAULT_CONFIG_NAME),
    repo: RepoOpt = None,
    run_url: Annotated[str | None, typer.Option("--run-url",
                                                help="Tagged on the instance (default: this workflow run's URL).")] = None,
    online_timeout: Annotated[float, typer.Option("--online-timeout", min=0.0,
                                                  help="Seconds to wait for the runner to come online.")] = DEFAULT_ONLINE_TIMEOUT_S,
    poll_interval: Annotated[float, typer.Option("--poll-interval", min=0.0, hidden=True)] = 5.0,
    fork: Annotated[bool, typer.Option("--fork", help="Refuse: the run is a fork's pull request (the workflow knows).")] = False,
) -> None:
    """Register a one-job runner per target, launch its instance and wait until it is online.

    Outputs `labels`, a JSON object target -> the runner label its bench job's runs-on names, holding only
    the targets whose machine is online: one target that cannot start never holds up the others (exit 1
    after all have been tried). The labels are never printed (see launch.runner_label)."""
    from concurrent.futures import ThreadPoolExecutor

    from mlci import runners
    from mlci.launch import launch_id as launch_id_of

    env = _env()
    with _exit_codes():
        if launch_id is not None and len(target) != 1:
            raise UsageError("--launch-id names one machine: give it with one --target")
        refusal = _fork_refusal(fork, env)
        if refusal:
            raise UsageError(f"refusing to start a runner for a fork's code ({refusal}): it would run on a machine "
                             "registered to this repository")
        ids = {name: _launch_id(launch_id if launch_id is not None else launch_id_of(
            env.get("GITHUB_RUN_ID") or "local", env.get("GITHUB_RUN_ATTEMPT") or "1", name)) for name in target}
        repository = _repository(repo, env)
        requests = [runners.StartRequest(ids[name], name, _launch_of(config, name), _run_url(run_url, env),
                                         label_key=env.get(TOKEN_ENV, "").strip(), repository=repository)
                    for name in target]
        github = _github(repository, env, required=True)
        _terminate_on_sigterm()

        cancelled = threading.Event()

        def wait(seconds: float) -> None:
            """The pause between polls; a cancelled start (SIGTERM) ends it, and start then cleans up."""
            if cancelled.wait(seconds):
                raise runners.RunnerError("cancelled")

        def start_one(request: runners.StartRequest) -> runners.Started:
            def say(text: str) -> None:
                _say(f"{request.target}: {text}" if len(requests) > 1 else text)

            return runners.start(request, _ec2(request.launch.region), github, online_timeout=online_timeout,
                                 poll_interval=poll_interval, log=say, sleep=wait)

        pool = ThreadPoolExecutor(max_workers=len(requests))
        futures = [(request, pool.submit(start_one, request)) for request in requests]
        try:
            for _, future in futures:
                future.exception()
        except BaseException:  # SIGTERM (a cancelled workflow) arrives here: every start cleans up before exiting
            cancelled.set()
            pool.shutdown(wait=True)
            raise
        pool.shutdown()
        started: dict[str, runners.Started] = {}
        failed: list[str] = []
        for request, future in futures:
            try:
                started[request.target] = future.result()
            except (runners.RunnerError, UsageError) as exc:
                failed.append(f"{request.target}: {exc}")
        values: dict[str, str] = {"labels": json.dumps({name: s.label for name, s in started.items()})}
        if len(requests) == 1 and started:
            [one] = started.values()
            values.update({"label": one.label, "instance-id": one.instance_id, "runner-name": one.runner_name,
                           "market": one.market})
        for name, one in started.items():
            print(f"{name}: instance-id={one.instance_id} runner-name={one.runner_name} market={one.market}")
        # The labels are outputs only, never printed: whoever reads this log must not be able to ask for a
        # machine before its bench job does (see launch.runner_label).
        _write_outputs(values, env)
        if failed:
            raise runners.RunnerError("; ".join(failed) if len(requests) == 1 else
                              f"{len(failed)} of {len(requests)} machines did not start (their bench jobs fail at "
                              f"once; the others run): " + "; ".join(failed))


@runner_app.command("stop")
def stop_command(
    launch_id: LaunchIdOpt,
    target: TargetOpt,
    config: ConfigOpt = Path(DEFAULT_CONFIG_NAME),
    repo: RepoOpt = None,
    region: Annotated[str | None, typer.Option("--region", help="AWS region (default: the target's launch table's).")] = None,
    report: Annotated[Path | None, typer.Option("--report", help="Write the outcome as JSON here.")] = None,
    results_dir: Annotated[Path | None, typer.Option(
        "--results-dir", help="On a spot interruption, write TARGET.json here: a results file whose models are "
                              "`interrupted` (the report job shows them as such; an existing file is kept).")] = None,
) -> None:
    """Terminate the launch's instances and delete its runner; exit 0 unless something is left behind."""
    from mlci import runners

    env = _env()
    with _exit_codes():
        launch_id = _launch_id(launch_id)
        region = region or _launch_of(config, target).region
        github = _github(_repository(repo, env), env, required=False)
        result = runners.stop(launch_id, target, _ec2(region), github, log=_say)
        text = json.dumps(result.as_json(), indent=2)
        if report is not None:
            report.parent.mkdir(parents=True, exist_ok=True)
            report.write_text(text + "\n", encoding="utf-8")
        if result.outcome == "interrupted" and results_dir is not None:
            written = write_interrupted_results(config, target, result.reason, results_dir)
            _say(f"results: {written}" if written else f"results: {results_dir / (target + '.json')} exists; kept")
        print(f"outcome={result.outcome}")
        _say(result.reason)
        _write_outputs({"outcome": result.outcome}, env)
        if result.problems:
            raise runners.RunnerError("left behind: " + "; ".join(result.problems))


@runner_app.command("reap")
def reap_command(
    config: ConfigOpt = Path(DEFAULT_CONFIG_NAME),
    region: Annotated[list[str] | None, typer.Option("--region", help="AWS region (repeatable; default: every region "
                                                                      "the account has enabled).")] = None,
    repo: RepoOpt = None,
    grace_minutes: Annotated[float, typer.Option("--grace-minutes", min=0.0, help="Leave alone what is younger or "
                                                  "expired less than this long ago.")] = DEFAULT_GRACE_MIN,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List what would be done; change nothing.")] = False,
) -> None:
    """Terminate this repository's expired mlci instances in every region and delete stale mlci runners (a
    scheduled workflow runs this). Instances are told apart by their mlci:repository tag."""
    from mlci import runners

    env = _env()
    with _exit_codes():
        repository = _repository(repo, env)
        regions = list(region or [])
        if not regions:
            cfg = load_config(config) if config.exists() else None
            named = sorted({t.launch.region for t in cfg.targets.values() if t.launch is not None}) if cfg else []
            regions = runners.enabled_regions(_ec2(named[0] if named else "us-east-1"))
        github = _github(repository, env, required=True)
        plan, region_of, problems = runners.reap(_ec2, regions, github, grace=timedelta(minutes=grace_minutes),
                                                 dry_run=dry_run, repository=repository, log=_say)
        for found in plan.actions:
            verb = f"would {found.action}" if dry_run and found.action != "keep" else found.action
            where = region_of.get(found.id, "?") if found.kind == "instance" else "github"
            print(f"{verb} {found.kind} {found.id} ({found.name}, {where}): {found.reason}")
        if problems:
            raise runners.RunnerError("; ".join(problems))


def write_interrupted_results(config: Path, target: str, reason: str, results_dir: Path) -> Path | None:
    """TARGET.json in `results_dir` saying the target's machine went away: every model `interrupted`, neither a
    regression nor a failure. None when the bench job's own results file is there already (it stands)."""
    from mlci.config import relative_to_root
    from mlci.gitinfo import detect_git, toplevel
    from mlci.results import Fingerprint, ModelResult, Results, Status, TargetInfo, write_results

    path = results_dir / f"{target}.json"
    if path.exists():
        return None
    cfg = load_config(config)
    if target not in cfg.targets:
        raise UsageError(f"{config}: no target {target!r} (targets: {', '.join(cfg.targets)})")
    tvm = cfg.targets[target].tvm
    top = toplevel(cfg.root) or cfg.root
    results = Results(
        git=detect_git(cfg.root),
        target=TargetInfo(name=target, tvm_target=dict(tvm) if isinstance(tvm, dict) else {}, fingerprint=Fingerprint(),
                          price_per_hour=cfg.targets[target].price_per_hour),
        models=[ModelResult(name=m.name, path=str(relative_to_root(m.path, top).as_posix()), status=Status.INTERRUPTED,
                            error=reason, threshold=m.threshold) for m in cfg.models],
        config=str(relative_to_root(cfg.path, top).as_posix()),
        interrupted=reason,
    )
    return write_results(results, path)


@runner_app.command("policy")
def policy_command(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="Also confine launches to the instance types "
                                                "and images this config's launch tables name.")] = None,
) -> None:
    """Print the IAM policy for the role `mlci runner` assumes (GitHub OIDC): launch, tag and terminate only mlci's."""
    from mlci.launch import iam_policy

    with _exit_codes():
        launches = [t.launch for t in load_config(config).targets.values() if t.launch is not None] if config else []
        if config and not launches:
            raise UsageError(f"{config}: no target has a launch table")
    print(json.dumps(iam_policy(launches), indent=2))
