"""`mlci compare`: read the results of every matrix job, decide, render, deliver.

Everything is written to disk (comment, summary, decision JSON) before GitHub is
contacted, and GitHub trouble never changes the verdict: the exit code is the
gate's alone.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlci import gate, report
from mlci.actions import Annotation, GitHubContext
from mlci.delivery import deliver
from mlci.results import Results, ResultsError, json_safe, read_results


class CompareUsageError(Exception):
    """Nothing to compare (no results files found or none readable)."""


@dataclass
class CompareOptions:
    paths: list[Path]
    fail_on: str | None = None
    threshold: float | None = None
    report_dir: Path = Path(".mlci/report")
    github: bool | None = None
    """Deliver to GitHub (comment, status, outputs); None: only inside GitHub Actions."""
    comment: bool = True
    status: bool = True
    expect_targets: list[str] = field(default_factory=list)
    """Targets whose bench job must have left a results file (the workflow's plan); a missing one fails the gate."""
    report_only: bool = False
    """Report the verdict everywhere but exit 0 (the fork-safe comment stage: the PR's own run already failed)."""
    mlflow_uri: str | None = None
    """The MLflow tracking server the runs were logged to; None: MLFLOW_TRACKING_URI. Run links in the
    report go only there (or to GitHub): the URLs in a results file are the untrusted run's word."""


@dataclass
class CompareOutcome:
    decision: gate.Decision
    comment_path: Path
    summary_path: Path
    notes: list[str] = field(default_factory=list)


def find_results(paths: list[Path]) -> list[Path]:
    """Files as given; directories searched recursively for *.json (artifact downloads nest)."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found += sorted(p for p in path.rglob("*.json") if p.is_file())
        elif path.is_file():
            found.append(path)
    return found


def load_results(paths: list[Path]) -> tuple[list[Results], list[str]]:
    """Every readable results file, and one message per unreadable or refused one naming it."""
    missing = [p for p in paths if not p.exists()]
    files = find_results(paths)
    if not files:
        where = ", ".join(str(p) for p in paths)
        raise CompareUsageError(f"no results files found in {where} (run `mlci run` first)")
    loaded, problems = [], [f"{p}: no such file or directory" for p in missing]
    for path in files:
        try:
            results = read_results(path)
        except ResultsError as exc:
            problems.append(str(exc))
            continue
        implausible = gate.latency_problem(results)
        if implausible:  # zero or negative latencies would be compared as +nan%: refused like an unreadable file
            problems.append(f"{path}: refusing results whose latencies are not all positive, finite "
                            f"numbers of milliseconds: {implausible}")
            continue
        loaded.append(results)
    if not loaded:
        raise CompareUsageError("no readable results file:\n  " + "\n  ".join(problems))
    return loaded, problems


def missing_targets(results: list[Results], expected: list[str]) -> list[str]:
    """A bench job that crashed or was cancelled leaves no results file: that must not read as a pass."""
    have = {r.target.name for r in results}
    return [
        f"target {name}: no results file (its bench job failed or was cancelled before writing one; see that job's log)"
        for name in expected if name not in have
    ]


def annotations(decision: gate.Decision) -> list[Annotation]:
    out = []
    for cell in decision.cells:
        title = f"mlci: {cell.model} on {cell.target}: {cell.verdict}"
        if cell.blocking:
            out.append(Annotation("error", title, cell.reason))
        elif cell.verdict in ("failed", "inconclusive"):
            out.append(Annotation("warning", title, cell.reason))
    for problem in decision.problems:
        out.append(Annotation("error", "mlci: unreadable results file", problem))
    return out


def outputs(decision: gate.Decision, report_path: Path) -> dict[str, str]:
    counts = decision.counts
    return {
        "verdict": decision.verdict,
        "headline": decision.headline,
        "regressions": str(counts["regression"]),
        "failures": str(counts["failed"]),
        "improvements": str(counts["improvement"]),
        "inconclusive": str(counts["inconclusive"]),
        "cells": str(len(decision.cells)),
        "report-path": str(report_path),
    }


def decision_json(decision: gate.Decision) -> dict[str, Any]:
    import dataclasses

    return json_safe({
        "verdict": decision.verdict,
        "failed": decision.failed,
        "headline": decision.headline,
        "fail_on": decision.fail_on,
        "counts": decision.counts,
        "problems": list(decision.problems),
        "cells": [dataclasses.asdict(c) for c in decision.cells],
    })


def execute(options: CompareOptions, print_line: Any = print) -> CompareOutcome:
    results, problems = load_results(options.paths)
    problems += missing_targets(results, options.expect_targets)
    decision = gate.decide(results, fail_on=options.fail_on, threshold=options.threshold, problems=problems)
    ctx = GitHubContext.from_env()
    context = report.ReportContext(
        repository=ctx.repository or decision.git.repository,
        server_url=ctx.server_url,
        run_url=ctx.run_url,
        pr=decision.git.pr,
        mlflow_url=options.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI"),
    )
    out = options.report_dir
    out.mkdir(parents=True, exist_ok=True)
    comment_path = out / "comment.md"
    summary_path = out / "summary.md"
    comment_path.write_text(report.render_comment(decision, context), encoding="utf-8")
    summary = report.render_summary(decision, context)
    summary_path.write_text(summary, encoding="utf-8")
    (out / "decision.json").write_text(json.dumps(decision_json(decision), indent=2) + "\n", encoding="utf-8")
    outcome = CompareOutcome(decision, comment_path, summary_path)

    to_github = options.github if options.github is not None else ctx.in_actions
    if to_github:
        delivery = deliver(
            ctx,
            comment=comment_path.read_text(encoding="utf-8"),
            marker=report.decision_marker(decision),  # the comment's first line: the same sticky comment next time
            summary=summary,
            outputs=outputs(decision, comment_path),
            annotations=annotations(decision),
            state="failure" if decision.failed else "success",
            description=decision.headline,
            post_comment=options.comment,
            set_status=options.status,
            claimed_pr=decision.git.pr,
            print_line=print_line,
        )
        outcome.notes = list(delivery.notes)
    return outcome
