"""The `mlci` command line. Thin: parse, call the library, choose the exit code.

Exit codes: 0 pass, 1 gate failed (`compare`; for `run`: a model failed),
2 usage or configuration error, 3 internal error.
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from mlci import __version__
from mlci.config import DEFAULT_CONFIG_NAME, ConfigError, load_config

EXIT_OK, EXIT_GATE, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3

app = typer.Typer(
    name="mlci",
    help="Compile, tune, verify and benchmark ONNX models with Apache TVM on every commit.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True, soft_wrap=True)  # messages name paths: never break them across lines


@contextlib.contextmanager
def _exit_codes(*usage_errors: type[Exception]) -> Iterator[None]:
    """The command's own usage errors exit 2 with their message; anything unexpected exits 3
    with the traceback (Ctrl-C passes through)."""
    try:
        yield
    except usage_errors as exc:
        err.print(f"[red]error:[/red] {escape(str(exc))}")
        raise typer.Exit(EXIT_USAGE) from None
    except (KeyboardInterrupt, typer.Exit):
        raise
    except Exception:
        err.print("[red]internal error[/red] (please report it):")
        err.print(escape(traceback.format_exc()))
        raise typer.Exit(EXIT_INTERNAL) from None


def _github_outputs(values: dict[str, str]) -> None:
    """Step outputs for the action, when running inside GitHub Actions."""
    from mlci.actions import GitHubContext, write_outputs

    ctx = GitHubContext.from_env()
    if ctx.in_actions and ctx.output is not None:
        write_outputs(ctx.output, values)


def _version_callback(value: bool) -> None:
    if value:
        out.print(f"mlci {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", callback=_version_callback, is_eager=True)] = False,
) -> None:
    """mlci keeps ML models fast and portable as they change."""


@app.command()
def run(
    config: Annotated[Path, typer.Option("--config", "-c", help="Path to mlci.toml.")] = Path(DEFAULT_CONFIG_NAME),
    target: Annotated[str | None, typer.Option("--target", "-t", help="Target name from [targets] (default: the first).")] = None,
    model: Annotated[list[str] | None, typer.Option("--model", "-m", help="Only this model (repeatable).")] = None,
    trials: Annotated[int | None, typer.Option(min=0, help="Tuning trials per model (overrides the config).")] = None,
    tune_seconds: Annotated[float | None, typer.Option(min=0.001, help="Tuning wall-clock cap per model, seconds.")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Results file (default: .mlci/results/TARGET.json).")] = None,
    tracking_uri: Annotated[
        str | None,
        typer.Option(help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, the config, or .mlci/mlflow.db)."),
    ] = None,
    no_tracking: Annotated[bool, typer.Option("--no-tracking", help="Do not log to MLflow.")] = False,
    allow_failures: Annotated[
        bool,
        typer.Option("--allow-failures", help="Exit 0 when a model fails: leave the verdict to `mlci compare` "
                                               "(the workflow's report job)."),
    ] = False,
    base: Annotated[
        str | None,
        typer.Option(help="Git ref to A/B against: its merge-base's models are built and measured interleaved "
                          "with the head (default: the pull request's base, else [gate].base)."),
    ] = None,
    progressive: Annotated[
        bool | None,
        typer.Option("--progressive/--no-progressive",
                     help="Search the trial budget anew on this run, where the most is left to gain, so the cache "
                          "converges over commits (default: only on pushes and schedules to the default branch "
                          "in GitHub Actions)."),
    ] = None,
) -> None:
    """Compile, tune, check and benchmark every model of the config on one target."""
    from mlci.commands.run import RunOptions, execute, run_outputs
    from mlci.console import RunReporter, failure_lines, results_table
    from mlci.tracking import without_credentials

    with _exit_codes(ConfigError):
        cfg = load_config(config)
        options = RunOptions(
            target=target, models=model or [], trials=trials, tune_seconds=tune_seconds,
            output=output, tracking=not no_tracking, tracking_uri=tracking_uri, base=base,
            progressive=progressive,
        )
        with RunReporter(err) as reporter:
            outcome = execute(cfg, options, reporter)

    out.print(results_table(outcome.results))
    for line in failure_lines(outcome.results):
        out.print(line)
    out.print(f"results: {escape(str(outcome.results_path))}")
    if outcome.tracking_error:
        err.print(f"[yellow]warning:[/yellow] {escape(outcome.tracking_error)} (results kept in the file above)")
    elif not no_tracking:
        shown = without_credentials(tracking_uri or cfg.tracking_uri())
        out.print(f"MLflow: {escape(shown)} (experiment {escape(cfg.tracking.experiment)})")
    failed = [m.name for m in outcome.results.models if not m.ok]
    _github_outputs(run_outputs(outcome))
    if failed:
        err.print(f"[red]{len(failed)} model(s) failed:[/red] {escape(', '.join(failed))}")
        if not allow_failures:
            raise typer.Exit(EXIT_GATE)


@app.command()
def compare(
    paths: Annotated[
        list[Path] | None,
        typer.Argument(help="Results files or directories (searched for *.json). Default: .mlci/results."),
    ] = None,
    fail_on: Annotated[
        str | None,
        typer.Option(help="regression (regressions and failures fail), failure (only failures), never. "
                          "Default: the config's [gate].fail_on recorded by `mlci run`."),
    ] = None,
    threshold: Annotated[
        float | None, typer.Option(min=0.0, max=1.0, help="Relative change that counts, e.g. 0.05 (overrides the config).")
    ] = None,
    report_dir: Annotated[Path, typer.Option(help="Where comment.md, summary.md and decision.json are written.")] = Path(
        ".mlci/report"
    ),
    github: Annotated[
        bool | None,
        typer.Option("--github/--no-github", help="Post the PR comment, commit status and outputs "
                                                  "(default: when running in GitHub Actions)."),
    ] = None,
    comment: Annotated[bool, typer.Option("--comment/--no-comment", help="Post or update the sticky PR comment.")] = True,
    expect_target: Annotated[
        list[str] | None,
        typer.Option("--expect-target", help="A target that must have results (repeatable); one without fails the gate."),
    ] = None,
    report_only: Annotated[
        bool,
        typer.Option("--report-only", help="Report the verdict (comment, status, summary) but exit 0 on a failed gate: "
                                           "for the fork-safe comment workflow, whose PR run already failed."),
    ] = False,
) -> None:
    """Decide pass or fail from the results of every target job; report it (terminal, PR comment, job summary)."""
    from mlci.commands.compare import CompareOptions, CompareUsageError, execute
    from mlci.config import FAIL_ON
    from mlci.console import terminal_table

    if fail_on is not None and fail_on not in FAIL_ON:
        err.print(f"[red]error:[/red] --fail-on must be one of {', '.join(FAIL_ON)}, not {escape(fail_on)!r}")
        raise typer.Exit(EXIT_USAGE)
    options = CompareOptions(
        paths=paths or [Path(".mlci/results")], fail_on=fail_on, threshold=threshold,
        report_dir=report_dir, github=github, comment=comment, report_only=report_only,
        expect_targets=expect_target or [],
    )
    with _exit_codes(CompareUsageError):
        outcome = execute(options, print_line=lambda line: print(line, flush=True))

    decision = outcome.decision
    out.print(terminal_table(decision))
    for problem in decision.problems:
        err.print(f"[red]error:[/red] {escape(problem)}")
    for note in outcome.notes:
        err.print(f"note: {escape(note)}")
    out.print(f"report: {escape(str(outcome.comment_path))}")
    if decision.failed:
        err.print(f"[red]gate failed[/red] (fail-on {decision.fail_on}): {escape(decision.headline)}")
        if not report_only:
            raise typer.Exit(EXIT_GATE)
        return
    out.print(f"[green]gate passed[/green] (fail-on {decision.fail_on}): {escape(decision.headline)}")


@app.command()
def init(
    root: Annotated[Path, typer.Option("--root", help="The repository to set up.")] = Path("."),
    model: Annotated[
        list[Path] | None,
        typer.Option("--model", "-m", metavar="PATH", help="Configure only this ONNX file (repeatable; relative to --root). "
                                           "Default: every *.onnx of the repository that git does not ignore."),
    ] = None,
    branch: Annotated[
        str | None,
        typer.Option(help="Default branch the workflows run on (default: origin's HEAD, else the current branch, else main)."),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite mlci.toml and the workflow files if they exist.")] = False,
) -> None:
    """Write mlci.toml for the repository's ONNX models and the starter GitHub workflows."""
    import shlex

    from mlci.commands.init import InitError, execute

    with _exit_codes(InitError):
        outcome = execute(root, force=force, models=model, branch=branch)

    for warning in outcome.warnings:
        err.print(f"[yellow]warning:[/yellow] {escape(warning)}", soft_wrap=True)
    for path in outcome.written:
        note = ""
        if path == DEFAULT_CONFIG_NAME:
            names = ", ".join(m.name for m in outcome.models)
            note = f" ({len(outcome.models)} model(s): {names})" if outcome.models else " (no models: add them)"
        out.print(f"wrote {escape(path)}{escape(note)}", soft_wrap=True, highlight=False)
    if len(outcome.written) > 1:
        out.print(f"The workflows treat {escape(repr(outcome.branch))} as the default branch (--branch to change it).",
                  soft_wrap=True, highlight=False)
    if outcome.guessed:
        names = ", ".join(m.name for m in outcome.guessed)
        out.print(f"Sizes of dynamic dimensions were guessed for {escape(names)}: edit the lines marked "
                  "'# guessed' in mlci.toml to the shapes you want benchmarked.", soft_wrap=True, highlight=False)

    resolved, cwd = outcome.root.resolve(), Path.cwd().resolve()
    here = resolved.relative_to(cwd) if resolved.is_relative_to(cwd) else resolved
    config = here / DEFAULT_CONFIG_NAME
    lines = ["", "Next steps:"]
    if here != Path("."):
        lines.append(f"  (the git commands run in {shlex.quote(str(here))})")
    lines += [
        "  1. Check the config on this machine (compiles, tunes and benchmarks every model):",
        "       mlci run" + ("" if here == Path(".") else f" -c {shlex.quote(str(config))}"),
    ]
    step = 2
    if not outcome.gitignore_lists_state:
        lines.append(f"  {step}. Add .mlci/ to .gitignore: mlci keeps its tuning cache, results and MLflow store there.")
        step += 1
    lines += [
        f"  {step}. Commit:",
        "       git add " + " ".join(shlex.quote(p) for p in outcome.written),
        '       git commit -m "Add mlci"',
        f"  {step + 1}. MLflow history (optional), under Settings > Secrets and variables > Actions of the repository:",
        "       variable MLFLOW_TRACKING_URI: an MLflow server URL. Without it each run uses a throwaway sqlite store",
        "         and the gate relies on A/B against the PR base only.",
        "       secrets MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or MLFLOW_TRACKING_TOKEN:",
        "         if the server needs authentication.",
        "       secrets AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, and variable MLFLOW_S3_ENDPOINT_URL:",
        "         when the server keeps its artifacts on S3.",
        f"  {step + 2}. A tuning cache every runner shares (optional): variable MLCI_CACHE_URL (s3://bucket/prefix),",
        "       with the AWS roles in variables MLCI_AWS_ROLE (default branch) and MLCI_AWS_PR_ROLE (pull requests);",
        "       see the README, \"Sharing the tuning cache on S3\".",
        f"  {step + 3}. GPU and Arm targets (examples in mlci.toml) need runners with the labels given in their runs_on.",
    ]
    for line in lines:
        out.print(escape(line), soft_wrap=True, highlight=False)


@app.command()
def doctor(
    no_tune: Annotated[bool, typer.Option("--no-tune", help="Skip the tuning proof (a few trials).")] = False,
    ops: Annotated[list[Path] | None, typer.Option(
        "--ops", metavar="MODEL.onnx",
        help="Instead of the machine checks: list the model's operators and which TVM can import "
             "(repeatable). Exits 1 when one is unsupported.")] = None,
) -> None:
    """Versions, the detected host target, CUDA and GPU, and a quick proof that tuning works."""
    from rich.table import Table

    from mlci.commands.doctor import run_checks

    if ops:
        _doctor_ops(ops)
        return

    with err.status("checking (the tuning proof takes about a minute)..."):
        checks = run_checks(tune=not no_tune)
    table = Table(title="mlci doctor", title_justify="left")
    table.add_column("check")
    table.add_column("result")
    for check in checks:
        mark = "[green]ok[/green]" if check.ok else "[red]FAIL[/red]"
        table.add_row(check.name, f"{mark} {escape(check.value)}")
    out.print(table)
    if not all(c.ok for c in checks):
        raise typer.Exit(EXIT_GATE)


def _doctor_ops(paths: list[Path]) -> None:
    from rich.table import Table

    from mlci.commands.doctor import OperatorsError, model_operators

    unsupported = False
    for path in paths:
        try:
            uses = model_operators(path)
        except OperatorsError as exc:
            err.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False)
            raise typer.Exit(EXIT_USAGE) from None
        table = Table(title=f"operators of {escape(str(path))}", title_justify="left")
        table.add_column("operator")
        table.add_column("nodes", justify="right")
        table.add_column("converted by")
        for use in uses:
            by = {"tvm": "TVM", "mlci": "mlci"}.get(use.provider or "", "[red]unsupported[/red]")
            table.add_row(escape(use.op), str(use.nodes), by)
        out.print(table)
        missing = [u.op for u in uses if u.provider is None]
        unsupported = unsupported or bool(missing)
        summary = (f"{len(uses) - len(missing)} of {len(uses)} operators supported"
                   + (f"; unsupported: {', '.join(missing)}" if missing else ""))
        out.print(escape(summary), highlight=False)
    if unsupported:
        raise typer.Exit(EXIT_GATE)


@app.command()
def matrix(
    config: Annotated[Path, typer.Option("--config", "-c", help="Path to mlci.toml.")] = Path(DEFAULT_CONFIG_NAME),
    target: Annotated[list[str] | None, typer.Option("--target", "-t", help="Only this target (repeatable).")] = None,
    shards: Annotated[
        int,
        typer.Option(min=0, help="Also output `shard-matrix`: one `mlci tune --shard K/N` job per target and "
                                 "K in 1..N (0: none)."),
    ] = 0,
    fork_self_hosted: Annotated[bool, typer.Option(
        "--fork-self-hosted", help="Let a fork's pull request run on self-hosted runners too (never on launched ones)."),
    ] = False,
    job_minutes: Annotated[int | None, typer.Option(
        "--job-minutes", min=1, help="The bench jobs' timeout-minutes: warn where a launched machine's max_minutes "
                                     "is shorter."),
    ] = None,
) -> None:
    """Print the target matrix as JSON (the plan job's `strategy.matrix`): each target with its `runs-on` labels.

    In GitHub Actions, outputs this run's trust tier (`trust`, with `trust-reason`), the AWS role its jobs
    assume (`role`: default-branch, pull-request or none), whether it may use the S3 cache URL
    (`cache`) and launch machines (`launch`), the repository's `default-branch`, and the plan:
    `matrix` (targets on existing runners), `launch-matrix` (targets whose machine `mlci runner start`
    launches for this run), `targets` (every target expected to report), `hosted-targets`,
    `launch-targets` and `shard-matrix`."""
    import json

    from mlci.actions import Annotation, GitHubContext, format_annotation
    from mlci.commands.matrix import MatrixError, build_matrix, build_shard_matrix, short_dead_man, split_launched
    from mlci.policy import Tier

    trust = GitHubContext.from_env().trust
    with _exit_codes(ConfigError, MatrixError):
        cfg = load_config(config)
        plan = build_matrix(cfg, only=target or None, run_id=os.environ.get("GITHUB_RUN_ID") or "local",
                            attempt=os.environ.get("GITHUB_RUN_ATTEMPT") or "1", trust=trust,
                            fork_self_hosted=fork_self_hosted)
        shard_plan = build_shard_matrix(cfg, shards, only=target or None, trust=trust, fork_self_hosted=fork_self_hosted)
    print(json.dumps(plan.matrix(), separators=(",", ":")))
    err.print(f"trust: {trust.tier} ({trust.reason})", markup=False, highlight=False)
    for name, why in plan.left_out.items():
        err.print(f"target {name} does not run for this {trust.tier} run: {why}", markup=False, highlight=False)
    for line in short_dead_man(cfg, plan, job_minutes):  # in Actions, an annotation on the run; else a plain line
        shown = format_annotation(Annotation("warning", "mlci", line)) if trust.tier is not Tier.LOCAL else f"warning: {line}"
        err.print(shown, markup=False, highlight=False)
    hosted, launched = split_launched(plan)
    _github_outputs({"matrix": json.dumps(hosted, separators=(",", ":")),
                     "launch-matrix": json.dumps(launched, separators=(",", ":")),
                     "targets": " ".join(entry["target"] for entry in plan.include),
                     "hosted-targets": " ".join(entry["target"] for entry in hosted["include"]),
                     "launch-targets": " ".join(entry["target"] for entry in launched["include"]),
                     "shard-matrix": json.dumps(shard_plan, separators=(",", ":")), "shards": str(shards),
                     "trust": str(trust.tier), "trust-reason": trust.reason, "role": str(trust.role),
                     "cache": "true" if trust.uses_cache_url else "false",
                     "launch": "true" if trust.may_launch else "false",
                     "default-branch": trust.default_branch or ""})


@app.command()
def tune(
    shard: Annotated[str, typer.Option("--shard", help="This job's share of the kernels: K/N, shard K of N "
                                                       "(N > 1 needs a shared tuning cache: [cache] url).")],
    config: Annotated[Path, typer.Option("--config", "-c", help="Path to mlci.toml.")] = Path(DEFAULT_CONFIG_NAME),
    target: Annotated[str | None, typer.Option("--target", "-t", help="Target name from [targets] (default: the first).")] = None,
    model: Annotated[list[str] | None, typer.Option("--model", "-m", help="Only this model (repeatable).")] = None,
    trials: Annotated[int | None, typer.Option(min=0, help="Tuning trials per model (overrides the config).")] = None,
    tune_seconds: Annotated[float | None, typer.Option(min=0.001, help="Tuning wall-clock cap per model, seconds.")] = None,
) -> None:
    """Tune shard K of N of every model's kernels into the shared tuning cache (no build, no benchmark):
    N jobs together search each kernel of the run once, and `mlci run` then searches none of them."""
    from mlci.commands.tune import Shard, ShardError, TuneOptions, execute, shard_table, tune_outputs
    from mlci.console import RunReporter

    with _exit_codes(ConfigError, ShardError):
        options = TuneOptions(shard=Shard.parse(shard), target=target, models=model or [], trials=trials,
                              tune_seconds=tune_seconds)
        cfg = load_config(config)
        with RunReporter(err) as reporter:
            outcome = execute(cfg, options, reporter)

    out.print(shard_table(outcome))
    searched = sum(k.searched for k in outcome.kernels)
    out.print(f"shard {outcome.shard}: {len(outcome.kernels)} of {outcome.kernels_in_run} kernel(s), "
              f"{searched} trial(s) searched in {outcome.seconds:.1f} s", highlight=False)
    if outcome.remote_url:
        out.print(f"tuning cache on S3: {outcome.pulled} kernel(s) taken, {outcome.pushed or 0} entries written "
                  f"to {escape(outcome.remote_url)}", highlight=False)
    if outcome.remote_error:
        err.print(f"[yellow]warning:[/yellow] the shared tuning cache failed ({escape(outcome.remote_error)}): "
                  "this shard's records stayed on this runner")
    out.print(f"report: {escape(str(outcome.report_path))}")
    _github_outputs(tune_outputs(outcome))
    failed = [m for m in outcome.models if not m.ok]
    for m in failed:
        err.print(f"[red]{escape(m.name)}: {escape(m.status)}[/red]: {escape(m.error or '')}")
    if failed:
        err.print(f"[red]{len(failed)} model(s) failed:[/red] {escape(', '.join(m.name for m in failed))}")
        raise typer.Exit(EXIT_GATE)


@app.command("cache-key")
def cache_key(
    config: Annotated[Path, typer.Option("--config", "-c", help="Path to mlci.toml.")] = Path(DEFAULT_CONFIG_NAME),
    target: Annotated[str | None, typer.Option("--target", "-t", help="Target name from [targets] (default: the first).")] = None,
) -> None:
    """Print the tuning cache's directory and Actions cache keys for a target on this machine (used by the action)."""
    from mlci.commands.cache_key import cache_plan

    with _exit_codes(ConfigError):
        plan = cache_plan(load_config(config), target)
    for name, value in plan.outputs().items():
        print(f"{name}: {value}" if "\n" not in value else f"{name}:\n  " + value.replace("\n", "\n  "))
    _github_outputs(plan.outputs())


@app.command()
def sync(
    results: Annotated[list[Path], typer.Argument(help="Results files of `mlci run` (e.g. .mlci/results/cpu.json).")],
    tracking_uri: Annotated[
        str | None, typer.Option(help="MLflow tracking URI to log to (default: MLFLOW_TRACKING_URI or mlci.toml's, "
                                      "when it is the server the run tried).")
    ] = None,
    register: Annotated[
        bool, typer.Option("--register", help="Register the builds as model versions, as `mlci run` would have.")
    ] = False,
    config: Annotated[Path, typer.Option("--config", "-c", help="mlci.toml (its [tracking] uri).")] = Path(
        DEFAULT_CONFIG_NAME),
) -> None:
    """Log to MLflow the runs that `mlci run` could not (kept beside each results file); safe to repeat."""
    from mlci.commands.sync import sync as sync_results

    configured = os.environ.get("MLFLOW_TRACKING_URI") or None
    if configured is None and config.is_file():
        with _exit_codes(ConfigError):
            configured = load_config(config).tracking.uri or None
    failed = False
    for outcome in sync_results(results, tracking_uri, configured_uri=configured, register=register):
        if outcome.error:
            failed = True
            err.print(f"[red]error:[/red] {escape(outcome.error)}")
        elif outcome.runs:
            out.print(f"{escape(str(outcome.results))}: {outcome.runs} MLflow run(s) logged")
        else:
            out.print(f"{escape(str(outcome.results))}: nothing pending")
    if failed:
        raise typer.Exit(1)


@app.command()
def history(
    config: Annotated[Path, typer.Option("--config", "-c", help="Path to mlci.toml.")] = Path(DEFAULT_CONFIG_NAME),
    model: Annotated[str | None, typer.Option("--model", "-m", help="Only this model.")] = None,
    target: Annotated[str | None, typer.Option("--target", "-t", help="Only this target.")] = None,
    branch: Annotated[
        str | None, typer.Option(help="The branch whose commits to show (default: origin's HEAD, else main).")
    ] = None,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, help="The newest N commits of each model x target.")] = 30,
    output_format: Annotated[str, typer.Option("--format", help="table, json or html (a self-contained report).")] = "table",
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write to this file instead of stdout.")] = None,
    tracking_uri: Annotated[
        str | None,
        typer.Option(help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, the config, or .mlci/mlflow.db)."),
    ] = None,
) -> None:
    """Each model x target over a branch's commits, from MLflow: medians, change vs the previous commit by the
    gate's rule, environment changes; as a table, JSON or an HTML report with charts."""
    from mlci.commands.history import (
        HistoryOptions,
        HistoryUsageError,
        execute,
        notes_of_rows,
        table_text,
        tables,
        to_html,
        to_json,
        write_output,
    )
    from mlci.history import HistoryStoreError

    with _exit_codes(ConfigError, HistoryUsageError, HistoryStoreError):
        cfg = load_config(config)
        outcome = execute(cfg, HistoryOptions(model=model, target=target, branch=branch, limit=limit,
                                              format=output_format, tracking_uri=tracking_uri))
        render = {"json": to_json, "html": to_html, "table": table_text}[output_format]
        text = render(outcome) if output is not None or output_format != "table" else None
        if output is not None:
            write_output(output, text)
    for note in outcome.notes:
        err.print(escape(note), highlight=False)
    if output is not None:
        err.print(f"wrote {escape(str(output))}", highlight=False)
    elif text is not None:
        sys.stdout.write(text)
    else:
        for table in tables(outcome):
            out.print(table)
        for line in notes_of_rows(outcome):
            out.print(escape(line), highlight=False, soft_wrap=True)


def _add_runner_commands() -> None:
    """`mlci runner start|stop|reap|policy` (ephemeral EC2 runners): a sub-app of its own."""
    from mlci.commands.runner import runner_app

    app.add_typer(runner_app, name="runner")


_add_runner_commands()


def entrypoint() -> None:
    """Ctrl-C and SIGTERM end every command within seconds, with 130 and 143 (`mlci.interrupt`)."""
    from mlci import interrupt

    with interrupt.handled():
        app()


if __name__ == "__main__":
    entrypoint()
