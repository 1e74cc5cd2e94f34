"""Rendering the gate's Decision: snapshot tests of the PR comment and job summary, the sticky
comment's marker, escaping, size limits, the formatters, the terminal table. Decisions come from
`mlci.gate.decide` on synthetic Results.

Snapshots live in tests/snapshots/*.md; `MLCI_UPDATE_SNAPSHOTS=1 pytest tests/test_report.py`
rewrites them (review the diff before committing).
"""

from __future__ import annotations

import dataclasses
import os
import random
import re
from pathlib import Path

import jinja2.meta
import jinja2.nodes
import pytest
from rich.console import Console

from mlci.console import terminal_table
from mlci.formatting import (
    clip,
    escape_markdown,
    fenced,
    format_change,
    format_ms,
    format_percent,
    format_speedup,
)
from mlci.gate import Decision, decide
from mlci.report import (
    MAX_COMMENT_CHARS,
    ReportContext,
    ReportView,
    comment_marker,
    environment,
    render_comment,
    render_summary,
)
from mlci.results import (
    Baseline,
    CompileInfo,
    Fingerprint,
    GateSettings,
    GitInfo,
    History,
    KernelProfile,
    KernelTime,
    Latency,
    ModelResult,
    NumericsInfo,
    PeerInfo,
    Results,
    TargetInfo,
    TrendPoint,
    TuningInfo,
)
from mlci.stats import summarize
from mlci.templating import template_source

SNAPSHOTS = Path(__file__).parent / "snapshots"
HEAD = "4b825dc642cb6eb9a060e54bf8d69288fbee4904"
BASE = "9d1c0e3f2a7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d"
CONTEXT = ReportContext(repository="acme/vision", run_url="https://github.com/acme/vision/actions/runs/123", pr=42,
                        mlflow_url="http://127.0.0.1:5000")
MARKER = comment_marker(None)
JITTER = (0.0, 0.004, -0.003, 0.002, -0.001, 0.003, -0.004, 0.001, -0.002, 0.0015)


# --- builders -----------------------------------------------------------------


def samples(center: float, n: int = 20, shift: int = 0) -> list[float]:
    """Deterministic samples around `center`; `shift` rotates the jitter (the head's differs from the base's)."""
    return [round(center * (1 + JITTER[(i + shift) % len(JITTER)]), 6) for i in range(n)]


def noisy(center: float, n: int = 20, spread: float = 0.25, seed: int = 7) -> list[float]:
    rng = random.Random(seed)
    return [round(center * (1 + rng.uniform(-spread, spread)), 6) for _ in range(n)]


def latency(values: list[float]) -> Latency:
    return Latency(samples=list(values), **summarize(values).as_dict())


def model(
    name: str,
    *,
    base: float | list[float] | None = 1.0,
    head: float | list[float] | None = 1.0,
    status: str = "ok",
    error: str | None = None,
    base_status: str = "ok",
    ort: float | None = None,
    numerics: NumericsInfo | None = None,
    tuning: TuningInfo | None = None,
    history: History | None = None,
    mlflow_url: str | None = None,
    compile_info: CompileInfo | None = None,
) -> ModelResult:
    """A model x target result with an A/B baseline (base/head: a centre in ms or explicit samples)."""
    base_samples = samples(base) if isinstance(base, int | float) else base
    head_samples = samples(head, shift=3) if isinstance(head, int | float) else head
    ok = status == "ok"
    baseline = None
    if base_status != "none":
        both = ok and base_status == "ok" and base_samples and head_samples
        baseline = Baseline(
            commit=BASE,
            status=base_status,
            latency_ms=latency(base_samples) if both else None,  # paired with the head's latency_ms
            rounds=1,
        )
    return ModelResult(
        name=name,
        path=f"models/{name}.onnx",
        status=status,
        error=error,
        latency_ms=latency(head_samples) if ok and head_samples else None,
        peer=PeerInfo(onnxruntime_median_ms=ort) if ort else None,
        numerics=numerics if numerics is not None else (
            NumericsInfo(max_abs_err=2.4e-06, max_rel_err=1.1e-05, atol=1e-4, rtol=1e-3, passed=True) if ok else None),
        tuning=tuning if tuning is not None else (
            TuningInfo(trials_new=64, trials_cached=448, tasks=12, tasks_from_cache=10, seconds=81.5) if ok else None),
        compile=compile_info if compile_info is not None else (
            CompileInfo(seconds=4.2, kernels=14, kernels_tuned=12, kernels_default=2, build="tuned") if ok else None),
        mlflow_url=mlflow_url,
        base=baseline,
        history=history,
    )


FINGERPRINTS = {
    "cpu-x86": Fingerprint(cpu="AMD EPYC 7763 64-Core Processor", arch="x86_64", cores=4, gpu=None,
                           os="Linux 6.8.0-1017-azure", python="3.11.11", tvm="0.21.0", tvm_ffi="0.1.14.post0",
                           llvm="17", onnxruntime="1.20.1", threads=4, tvm_target={"kind": "llvm", "mcpu": "znver3"},
                           hash="3f9a0c1d2e4b5a6c"),
    "gpu-cuda": Fingerprint(cpu="Intel Xeon Platinum 8480+", arch="x86_64", cores=16, gpu="NVIDIA H100 80GB HBM3",
                            driver="550.54.15", os="Linux 6.8.0-1017-azure", python="3.11.11", tvm="0.21.0",
                            tvm_ffi="0.1.14.post0", llvm="17", onnxruntime="1.20.1",
                            threads=16, tvm_target={"kind": "cuda", "arch": "sm_90"}, hash="a1b2c3d4e5f60718"),
}


def results(target: str, models: list[ModelResult], *, fail_on: str = "regression", base_ref: str = "main",
            removed: tuple[str, ...] = (), **git) -> Results:
    info = dict(commit=HEAD, branch="feature/faster-conv", base_commit=BASE, pr=42, repository="acme/vision",
                run_id="123", default_branch="main")
    info.update(git)
    fingerprint = FINGERPRINTS.get(target, Fingerprint(cpu="generic", tvm="0.21.0", tvm_target={"kind": "llvm"},
                                                       hash="0000000000000000"))
    return Results(
        git=GitInfo(**info),
        target=TargetInfo(name=target, tvm_target=fingerprint.tvm_target, fingerprint=fingerprint),
        models=models,
        base_ref=base_ref,
        removed_models=list(removed),
        gate=GateSettings(fail_on=fail_on, threshold=0.05, confidence=0.95),
        created_at="2025-01-01T00:00:00+00:00",
    )


def assert_snapshot(name: str, text: str) -> None:
    path = SNAPSHOTS / name
    if os.environ.get("MLCI_UPDATE_SNAPSHOTS") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return
    assert path.exists(), f"no snapshot {path}: run with MLCI_UPDATE_SNAPSHOTS=1 and review it"
    assert text == path.read_text(encoding="utf-8"), f"{name} changed: rerun with MLCI_UPDATE_SNAPSHOTS=1 if intended"


def table_rows(text: str) -> list[str]:
    """The main table's body rows (the first table after the headline)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| model | target | base |"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(line)
    return rows


def cells_of(row: str) -> list[str]:
    """Split a Markdown table row on unescaped pipes."""
    return [c.strip() for c in re.split(r"(?<!\\)\|", row)[1:-1]]


# --- scenarios -----------------------------------------------------------------


def regression_decision() -> Decision:
    return decide([
        results("cpu-x86", [
            model("resnet50", base=4.1, head=4.12, ort=12.9, mlflow_url="http://127.0.0.1:5000/#/experiments/1/runs/abc"),
            model("mobilenet_v2", base=0.81, head=0.81, ort=1.7),
        ]),
        results("gpu-cuda", [
            model("resnet50", base=1.0, head=1.1, ort=3.4, mlflow_url="http://127.0.0.1:5000/#/experiments/1/runs/def"),
            model("mobilenet_v2", base=0.0912, head=0.0914, ort=0.31),
        ]),
    ])


def improvement_decision() -> Decision:
    return decide([results("cpu-x86", [
        model("bert-tiny", base=2.5, head=2.0, ort=3.9),
        model("yolov8n", base=35.2, head=35.3, ort=61.0),
    ])])


def failure_decision() -> Decision:
    return decide([
        results("cpu-x86", [
            model("resnet50", base=4.1, head=4.1, ort=12.9),
            model("squeezenet", status="numerics_failed",
                  error="output 0 'logits': 12 of 1000 values differ; worst at index 417: got 0.731, expected 0.512",
                  numerics=NumericsInfo(max_abs_err=0.219, max_rel_err=0.428, atol=1e-4, rtol=1e-3, passed=False)),
        ]),
        results("gpu-cuda", [
            model("resnet50", status="compile_failed",
                  error="Traceback (most recent call last):\n  File \"relax/transform.py\", line 88\n"
                        "tvm.error.InternalError: Check failed: (ana.CanProve(extent > 0)) is false: "
                        "loop extent must be positive"),
            model("squeezenet", base=0.42, head=0.42, ort=0.9),
        ]),
    ])


def inconclusive_decision() -> Decision:
    return decide([results("arm64", [
        model("whisper-tiny-encoder", base=noisy(18.0, seed=1), head=noisy(18.9, seed=2), ort=25.0),
        model("resnet50", base=9.0, head=9.02, ort=20.0),
    ])])


def priced(res: Results, price: float) -> Results:
    return dataclasses.replace(res, target=dataclasses.replace(res.target, price_per_hour=price))


def kernels(*rows: tuple[str, int, float]) -> KernelProfile:
    return KernelProfile([KernelTime(name, calls, us) for name, calls, us in rows], inferences=3)


def cost_decision() -> Decision:
    """Priced targets (AWS on-demand c7i.large and g5.xlarge): a regression whose kernels were profiled, an improvement."""
    slower = model("resnet50", base=1.0, head=1.25, ort=3.4)
    slower.profile = kernels(("fused_conv2d_add_relu", 16, 905.0), ("fused_conv2d1_add1", 4, 210.0),
                             ("fused_dense_add", 1, 41.5), ("fused_softmax_v2", 1, 12.0), ("fused_max_pool2d", 1, 30.0),
                             ("fused_transpose", 1, 5.0), ("fused_reshape", 1, 1.1))
    assert slower.base is not None
    slower.base.profile = kernels(("fused_conv2d_add_relu", 16, 700.0), ("fused_conv2d1_add1", 4, 200.0),
                                  ("fused_dense_add", 1, 40.0), ("fused_softmax", 1, 14.0), ("fused_max_pool2d", 1, 30.0),
                                  ("fused_transpose", 1, 5.0), ("fused_reshape", 1, 1.2))
    return decide([
        priced(results("cpu-x86", [model("bert-tiny", base=2.5, head=2.0, ort=3.9),
                                   model("resnet50", base=4.1, head=4.12, ort=12.9)]), 0.089),
        priced(results("gpu-cuda", [slower]), 1.006),
    ])


def trend(*points: tuple[str, float]) -> list[TrendPoint]:
    return [TrendPoint(commit=c, median=m, created_at=f"2025-01-0{i + 1}T00:00:00+00:00") for i, (c, m) in enumerate(points)]


# --- snapshots -------------------------------------------------------------------


def test_regression_comment_snapshot():
    decision = regression_decision()
    assert [c.verdict for c in decision.cells[:1]] == ["regression"]
    text = render_comment(decision, CONTEXT)
    assert text.startswith(MARKER + "\n")
    assert "### mlci FAIL: 1 regression on gpu-cuda" in text
    assert "| resnet50 | gpu-cuda | 1.00 ms | 1.10 ms | +10." in text
    assert "[**regression**](http://127.0.0.1:5000/#/experiments/1/runs/def)" in text
    assert f"[`4b825dc`](https://github.com/acme/vision/commit/{HEAD})" in text
    assert "**Fails the build**: 1 blocking cell (fail-on `regression`" in text
    assert "(Bonferroni over 4 compared cells)" in text
    assert "91.2 µs" in text
    assert_snapshot("regression.md", text)


def test_improvement_comment_snapshot():
    decision = improvement_decision()
    assert decision.cells[0].verdict == "improvement"
    text = render_comment(decision, CONTEXT)
    assert "### mlci PASS: 1 improvement on cpu-x86" in text
    assert "**Passes**" in text
    assert "| bert-tiny | cpu-x86 | 2.50 ms | 2.00 ms | -20.0% [" in text
    assert "| TVM by 1.9x | improvement |" in text
    assert_snapshot("improvement.md", text)


def test_failure_comment_snapshot():
    decision = failure_decision()
    text = render_comment(decision, CONTEXT)
    assert "### mlci FAIL: 2 failures on cpu-x86, gpu-cuda" in text
    rows = table_rows(text)
    assert cells_of(rows[0])[:2] == ["resnet50", "gpu-cuda"] and cells_of(rows[0])[-1] == "**failed**"
    assert cells_of(rows[1])[:2] == ["squeezenet", "cpu-x86"] and cells_of(rows[1])[-1] == "**failed**"
    assert "compile_failed (the base commit built)" in text
    assert "wrong numbers: output 0 'logits'" in text
    assert "| 0.219 | 0.428 | 0.0001 | 0.001 | **no** |" in text
    assert "tvm.error.InternalError" in text.split("<summary>Errors (2)</summary>")[1]
    assert_snapshot("failure.md", text)


def test_inconclusive_comment_snapshot():
    decision = inconclusive_decision()
    assert decision.cells[0].verdict == "inconclusive"
    text = render_comment(decision, CONTEXT)
    assert "### mlci PASS: No significant change; 1 inconclusive" in text
    assert "whisper-tiny-encoder** on arm64, inconclusive: too noisy to tell" in text
    assert_snapshot("inconclusive.md", text)


def test_cost_regression_comment_snapshot():
    """Priced targets: a cost column, the cost change next to the percent, and the kernels that grew."""
    decision = cost_decision()
    assert [c.verdict for c in decision.cells] == ["regression", "improvement", "unchanged"]
    text = render_comment(decision, CONTEXT)
    assert "| change [interval] | cost per 1M inferences | faster: TVM or ORT |" in text
    rows = {cells_of(r)[0] + "@" + cells_of(r)[1]: cells_of(r) for r in table_rows(text)}
    slower = rows["resnet50@gpu-cuda"]
    # 0.25 ms more per inference at $1.006/h: +$0.070 per million inferences
    assert slower[4].startswith("+25.") and slower[4].endswith(", +$0.070 per million inferences")
    assert slower[5] == "$0.35 (ORT $0.95)"
    assert rows["bert-tiny@cpu-x86"][4].endswith(", -$0.012 per million inferences")
    assert "per million" not in rows["resnet50@cpu-x86"][4]  # unchanged: no money talk
    assert "the machine busy with one inference at a time" in text
    kernels_part = text.split("<summary>Kernels that grew (1 cell)</summary>")[1].split("</details>")[0]
    assert "**resnet50** on gpu-cuda, regression" in kernels_part
    lines = [line for line in kernels_part.splitlines() if line.startswith("| fused")]
    assert lines[0] == "| fused_conv2d_add_relu | 16 | 700 µs | 905 µs | +205 µs | +29.3% |"
    assert lines[1] == "| fused_softmax_v2 | 1 | — | 12.0 µs | +12.0 µs | new |"
    assert len(lines) == 5 and "fused_softmax |" in lines[-1] and lines[-1].endswith("| gone |")
    assert "fused_max_pool2d" not in kernels_part  # unchanged kernels are not named
    assert_snapshot("cost-regression.md", text)


def test_kernels_go_last_when_the_comment_must_shrink():
    decision = cost_decision()
    full = render_comment(decision, CONTEXT)
    text = render_comment(decision, CONTEXT, max_chars=len(full.split("<summary>Environment")[0]) + 400)
    assert "<summary>Kernels that grew" in text and "<summary>Environment" not in text
    assert "Not shown, to fit GitHub's size limit: environment, tuning, numerics;" in text


def test_summary_is_the_comment_without_the_marker():
    decision = regression_decision()
    summary = render_summary(decision, CONTEXT)
    assert MARKER not in summary
    assert summary == render_comment(decision, CONTEXT).removeprefix(MARKER + "\n")
    assert_snapshot("regression-summary.md", summary)


# --- the sticky comment's marker ---------------------------------------------------


def with_config(decision: Decision, config: str | None) -> Decision:
    """The decision of the results of one config file (its path relative to the repository)."""
    return dataclasses.replace(decision, config=config)


def test_default_config_keeps_the_marker_existing_comments_carry():
    assert comment_marker(None) == comment_marker("mlci.toml") == "<!-- mlci:report -->"
    for config in (None, "mlci.toml"):
        assert render_comment(with_config(improvement_decision(), config), CONTEXT).startswith("<!-- mlci:report -->\n### ")


def test_marker_is_keyed_by_config():
    vision, speech = comment_marker("services/vision/mlci.toml"), comment_marker("services/speech/mlci.toml")
    assert vision == "<!-- mlci:report config=services/vision/mlci.toml -->"
    assert comment_marker("ci/mlci-gpu_v2.toml") == "<!-- mlci:report config=ci/mlci-gpu_v2.toml -->"
    markers = [MARKER, vision, speech, comment_marker("services/vision/mlci.toml.bak")]
    for a in markers:  # the comment is found by substring: no marker may contain another
        assert [b for b in markers if a in b] == [a]
    decision = with_config(regression_decision(), "services/vision/mlci.toml")
    text = render_comment(decision, CONTEXT)
    assert text.startswith(vision + "\n### mlci FAIL") and text.count("mlci:report") == 1
    summary = render_summary(decision, CONTEXT)
    assert "mlci:report" not in summary and summary == text.removeprefix(vision + "\n")
    assert render_comment(decision, CONTEXT, max_chars=len(vision) + 1).startswith(vision)
    with pytest.raises(ValueError):
        render_comment(decision, CONTEXT, max_chars=len(vision))


@pytest.mark.parametrize("config", [
    "a/--><img src=x onerror=alert(1)><!--/mlci.toml",
    "-->",
    "x--!>y",
    "ci/mlci.toml -- @octocat\n# heading\n--->",
    "---a---/mlci.toml-",
    "<>|`*",
])
def test_hostile_config_path_cannot_close_the_html_comment(config: str):
    marker = comment_marker(config)
    assert marker.startswith("<!-- mlci:report config=") and marker.endswith(" -->")
    inside = marker[len("<!--"):-len("-->")]
    assert "--" not in inside and not set(inside) & set("<>!@#\n`*|")  # HTML forbids "--" in a comment's text
    assert marker.count("-->") == 1
    markdown_it = pytest.importorskip("markdown_it")
    html = markdown_it.MarkdownIt("commonmark", {"html": True}).render(
        render_comment(with_config(improvement_decision(), config), CONTEXT))
    assert html.startswith(marker + "\n<h3>")  # the whole marker is one HTML comment, then the report
    assert "<img" not in html and "onerror" not in html.split("<h3>")[0].replace(marker, "")


# --- history, trends, fingerprints ------------------------------------------------


def test_trend_chart():
    history = History(commit="0a1b2c3d4e5f60718293a4b5c6d7e8f901234567", branch="main", run_id="r1",
                      latency_ms=latency(samples(1.0)),
                      trend=trend(("aaaaaaa1111111", 1.02), ("bbbbbbb2222222", 0.99), ("not-a-sha", 1.01),
                                  ("ccccccc3333333", None), ("0a1b2c3d4e5f6071", 1.0)))
    decision = decide([results("gpu-cuda", [model("resnet50", base=1.0, head=1.1, history=history)])])
    text = render_comment(decision, CONTEXT)
    chart = text.split("```mermaid\n")[1].split("```")[0]
    assert chart == (
        "xychart-beta\n"
        '    x-axis ["aaaaaaa", "bbbbbbb", "run 3", "0a1b2c3", "this PR"]\n'
        '    y-axis "ms"\n'
        "    line [1.02, 0.99, 1.01, 1, 1.101]\n"
    )
    assert "Latency trend on the default branch (1 chart)" in text
    # the history table: comparable, head vs the MLflow baseline
    link = "[`0a1b2c3`](https://github.com/acme/vision/commit/0a1b2c3d4e5f60718293a4b5c6d7e8f901234567)"
    assert f"| resnet50 | gpu-cuda | {link} (main) | yes | — | +10.0% |" in text
    assert_snapshot("trend.md", text)


def test_a_regressed_cell_links_its_trend_on_this_runs_mlflow_server_only():
    compare = "http://127.0.0.1:5000/#/compare-runs?runs=%5B%22r1%22%2C%20%22r2%22%5D&experiments=%5B%221%22%5D"
    with_trend = History(commit=BASE, branch="main", run_id="r2", trend=trend((BASE, 1.0), (HEAD, 1.01)),
                         trend_url=compare)
    elsewhere = dataclasses.replace(with_trend, trend_url="https://evil.example/#/compare-runs")
    decision = decide([results("cpu-x86", [
        model("slower", base=1.0, head=1.3, history=with_trend),
        model("faster", base=1.0, head=0.7, history=with_trend),
        model("phished", base=1.0, head=1.3, history=elsewhere),
    ])])
    rows: dict[str, str] = {}
    for line in render_comment(decision, CONTEXT).splitlines():  # the main table's rows come first
        if line.startswith(("| slower |", "| faster |", "| phished |")):
            rows.setdefault(line.split("|")[1].strip(), line)
    assert f"([trend]({compare}))" in rows["slower"]
    assert "trend" not in rows["faster"]  # only a regression sends the reviewer to its history
    assert "evil.example" not in rows["phished"] and "(trend)" in rows["phished"]  # another host: text, no link


def test_trend_needs_two_points_and_charts_are_capped():
    one_point = History(commit=BASE, branch="main", run_id="r", trend=trend((BASE, 1.0)))
    models = [model(f"m{i}", history=History(commit=BASE, branch="main", run_id=f"r{i}",
                                             trend=trend((BASE, 1.0), (HEAD, 1.01)))) for i in range(9)]
    decision = decide([results("cpu-x86", [model("single", history=one_point), *models], pr=None)])
    text = render_comment(decision, ReportContext(repository="acme/vision"))  # no PR: the head is labelled by its sha
    assert text.count("```mermaid") == 6
    assert "(6 charts, 3 more not shown)" in text
    assert '"4b825dc"]' in text
    assert "**single** on cpu-x86\n\n```mermaid" not in text


def test_fingerprint_mismatch_history_note():
    history = History(commit=BASE, branch="main", run_id="r1", fingerprint_match=False,
                      fingerprint_diff={"driver": ["535.104.05", "550.54.15"],
                                        "gpu": ["NVIDIA A100-SXM4-40GB", "NVIDIA H100 80GB HBM3"]},
                      latency_ms=latency(samples(1.3)), trend=trend((BASE, 1.3), ("c0ffee0", 1.31)))
    m = model("resnet50", base_status="none", head=1.0, history=history)
    decision = decide([results("gpu-cuda", [m])])
    cell = decision.cells[0]
    assert cell.verdict == "new" and not cell.blocking
    text = render_comment(decision, CONTEXT)
    top = text.split("<details>")[0]
    assert "- **resnet50** on gpu-cuda, new: no comparable baseline: the environment changed (driver 535.104.05 -&gt; 550.54.15" in top
    row = next(line for line in text.splitlines() if line.startswith("| resnet50 | gpu-cuda | [`9d1c0e3`]"))
    assert cells_of(row)[3:] == [
        "**no**", "driver: 535.104.05 -> 550.54.15; gpu: NVIDIA A100-SXM4-40GB -> NVIDIA H100 80GB HBM3", "—"]
    assert_snapshot("fingerprint-mismatch.md", text)


def test_environment_table_lists_every_target_fingerprint():
    text = render_comment(regression_decision(), CONTEXT)
    env = text.split("<summary>Environment (2 targets)</summary>")[1].split("</details>")[0]
    assert "| | cpu-x86 | gpu-cuda |" in env
    assert "| gpu | — | NVIDIA H100 80GB HBM3 |" in env
    assert "| driver | — | 550.54.15 |" in env
    assert '| tvm_target | {"kind":"llvm","mcpu":"znver3"} | {"arch":"sm_90","kind":"cuda"} |' in env


# --- escaping ----------------------------------------------------------------------

HOSTILE = "evil|name <img src=x onerror=alert(1)> @octocat [x](http://e) **b**"
HOSTILE_ERROR = "boom\n```\n</details>\n# heading\n| a | b |\n@octocat see #12\n````` five\nend"


def hostile_decision() -> Decision:
    return decide([results("gpu|<b>cuda</b>", [
        model(HOSTILE, base=1.0, head=1.2),
        model("ok_model", status="compile_failed", error=HOSTILE_ERROR),
    ], base_ref="release/*v2* <i>@team</i>")])


def test_escape_markdown():
    assert escape_markdown("resnet50_v2-opt.onnx") == "resnet50_v2-opt.onnx"
    assert escape_markdown("_x_ *y* `z` a|b [l](u) ~~s~~ $m$ \\") == \
        "\\_x\\_ \\*y\\* \\`z\\` a\\|b \\[l\\](u) \\~\\~s\\~\\~ \\$m\\$ \\\\"
    assert escape_markdown("<b>&amp;</b>") == "&lt;b&gt;&amp;amp;&lt;/b&gt;"
    assert escape_markdown("hi @octocat, see #12 and a@b.c; # alone @") == \
        "hi @\u200doctocat, see #\u200d12 and a@\u200db.c; # alone @"
    assert escape_markdown("two\nlines\r\n\tand  tabs\x1b[31m") == "two lines and tabs\\[31m"
    assert escape_markdown(None) == "—"


def test_hostile_names_and_errors_render_inert():
    text = render_comment(hostile_decision(), CONTEXT)
    # nothing renders as markup: no raw HTML, no link syntax, no mention, no emphasis
    assert "<img" not in text and "<b>" not in text
    assert "&lt;img src=x onerror=alert(1)&gt;" in text
    outside_code = text.split("<summary>Errors (1)</summary>")[0]
    assert "@octocat" not in outside_code and "@\u200doctocat" in outside_code  # code blocks ping nobody
    assert "[x](" not in text and "\\[x\\](http:\u200d//e)" in text  # nor an autolink
    assert "**b**" not in text and "\\*\\*b\\*\\*" in text
    # the pipe cannot break the table: every row has exactly 7 unescaped-pipe-separated cells
    rows = table_rows(text)
    assert len(rows) == 2
    for row in rows:
        assert len(cells_of(row)) == 7
    assert cells_of(rows[1])[0] == ("evil\\|name &lt;img src=x onerror=alert(1)&gt; @\u200doctocat "
                                    "\\[x\\](http:\u200d//e) \\*\\*b\\*\\*")
    assert cells_of(rows[0])[1] == "gpu\\|&lt;b&gt;cuda&lt;/b&gt;"
    assert "(release/\\*v2\\* &lt;i&gt;@\u200dteam&lt;/i&gt;)" in text
    # the error's reason line is one line; the full text sits in a fence longer than its longest backtick run
    reason = next(line for line in text.splitlines() if line.startswith("- **ok_model**"))
    assert "\\`\\`\\` &lt;/details&gt; # heading \\| a \\| b \\| @\u200doctocat see #\u200d12" in reason
    block = text.split("(compile_failed):\n\n")[1]
    assert block.startswith("``````text\nboom\n```\n</details>\n")
    assert "\n````` five\nend\n``````\n" in block
    # summary lines carry no user text; the block the error sits in is closed by our own </details>
    assert text.count("<details>") == text.count("</details>") - 1  # one </details> is inside the error fence
    assert_snapshot("hostile.md", text)


ALLOWED_TAGS = {"h3", "p", "strong", "code", "a", "table", "thead", "tbody", "tr", "th", "td", "ul", "li", "details",
                "summary", "pre", "hr"}


@pytest.mark.parametrize("build", ["hostile_decision", "regression_decision", "failure_decision", "big_decision"])
def test_rendered_html_has_only_our_markup(build):
    """Render like GitHub would (CommonMark + tables + raw HTML on): only the tags and links the template writes."""
    markdown_it = pytest.importorskip("markdown_it")
    md = markdown_it.MarkdownIt("commonmark", {"html": True}).enable(["table", "strikethrough"])
    html = md.render(render_comment(globals()[build](), CONTEXT))
    tags = set(re.findall(r"<([a-z0-9]+)[\s>/]", html))
    assert tags <= ALLOWED_TAGS, tags - ALLOWED_TAGS
    assert "<del>" not in html and "<em>" not in html
    for href in re.findall(r'<a href="([^"]*)"', html):
        assert href.startswith(("https://github.com/acme/vision/", "http://127.0.0.1:5000/", "https://mlflow.example.com/")), href
    header = html.split("<tbody>")[0]
    body = html.split("<tbody>")[1].split("</tbody>")[0]
    assert len(re.findall(r"<th[ >]", header)) == 7
    for row in body.split("</tr>")[:-1]:
        assert row.count("<td") == 7


def test_fenced_uses_a_longer_fence():
    assert fenced("plain") == "```text\nplain\n```"
    assert fenced("a ```` b").startswith("`````text\n")
    long = fenced("x" * 20_000)
    assert "characters omitted" in long and len(long) < 7_000


def test_links_only_to_safe_urls():
    decision = decide([results("cpu", [model("m", base=1.0, head=1.2, mlflow_url="javascript:alert(1)")])])
    text = render_comment(decision, ReportContext(repository="acme/vision", run_url="javascript:alert(2)"))
    assert "javascript:" not in text
    assert "| **regression** |" in text
    decision = decide([results("cpu", [model("m", base=1.0, head=1.2, mlflow_url="https://mlflow.example/runs/a b|(c)")])])
    text = render_comment(decision, ReportContext(repository="bad repo/name"))
    assert "[**regression**](https://mlflow.example/runs/a b" not in text
    assert "`4b825dc`" in text and "/commit/" not in text  # no link without a valid repository


# --- size limits --------------------------------------------------------------------

LONG_ERROR = ("Traceback (most recent call last):\n"
              + "  File \"/opt/tvm/python/tvm/relax/frontend/onnx.py\", line 1234, in convert\n" * 60
              + "tvm.error.InternalError: unsupported op 'GridSample' with mode='bicubic'")


def big_decision() -> Decision:
    """50 models x 4 targets, long names, long errors: 25 failures, 8 regressions, the rest unchanged."""
    runs = []
    for t, target in enumerate(("cpu-x86-avx512-skylake", "cpu-arm64-neoverse-v1", "gpu-cuda-sm90-h100", "gpu-rocm-gfx90a")):
        models = []
        for i in range(50):
            name = (f"organisation-team/computer-vision/detection/very-long-model-family-name/exported-from-pytorch-2.5/"
                    f"variant-{i:02d}-int8-dynamic-shapes-batch{i % 8 + 1}-opset17-simplified.onnx")
            url = f"https://mlflow.example.com/#/experiments/7/runs/{t:02d}{i:02d}c0ffee0123456789abcdef0123456789"
            if i % 10 == 3 or (t == 2 and i % 10 == 7):
                models.append(model(name, status="compile_failed", error=f"{LONG_ERROR} ({i})", mlflow_url=url))
            elif i % 25 == 5:
                models.append(model(name, base=1.0 + i / 100, head=(1.0 + i / 100) * 1.12, ort=3.0, mlflow_url=url))
            else:
                models.append(model(name, base=1.0 + i / 100, head=1.0 + i / 100, ort=3.0, mlflow_url=url,
                                    history=History(commit=BASE, branch="main", run_id=f"r{i}",
                                                    trend=trend((BASE, 1.0), (HEAD, 1.01)))))
        runs.append(results(target, models))
    return decide(runs)


BIG_CONTEXT = dataclasses.replace(CONTEXT, mlflow_url="https://mlflow.example.com")
"""big_decision's runs were logged to another MLflow server."""


def test_big_matrix_truncates_and_keeps_every_blocking_cell():
    decision = big_decision()
    assert len(decision.cells) == 200
    blocking = decision.blocking
    assert len(blocking) == 33
    full = render_summary(decision, BIG_CONTEXT)
    assert len(full) > MAX_COMMENT_CHARS  # the summary keeps everything
    assert "rows not shown" not in full and "Not shown, to fit" not in full
    text = render_comment(decision, BIG_CONTEXT)
    assert len(text) <= MAX_COMMENT_CHARS
    assert text.startswith(MARKER + "\n### mlci FAIL: 25 failures on ")
    shown = {tuple(cells_of(row)[:2]) for row in table_rows(text)}
    for cell in blocking:
        assert (escape_markdown(cell.model), escape_markdown(cell.target)) in shown
    hidden = 200 - len(shown)
    assert hidden > 0
    assert f"… {hidden} more rows not shown ({hidden} unchanged): see the job summary of the [CI run](" in text
    assert "Not shown, to fit GitHub's size limit: environment, tuning, numerics, history, trends, errors" in text
    # the snapshot: the same degradation at a smaller limit, so that the file stays reviewable
    small = render_comment(decision, BIG_CONTEXT, max_chars=28_000)
    assert len(small) <= 28_000
    rows = table_rows(small)
    assert sum(1 for row in rows if cells_of(row)[-1].startswith("[**")) == 33 and len(rows) < 50
    assert_snapshot("big-matrix.md", small)


def test_details_are_dropped_before_rows():
    decision = regression_decision()
    full = render_comment(decision, CONTEXT)
    without_details = len(full.split("<details>")[0]) + 400
    text = render_comment(decision, CONTEXT, max_chars=len(full) - 1)
    assert len(text) < len(full)
    # no errors or trends to drop here: tuning goes next; every row stays
    assert "Not shown, to fit GitHub's size limit: tuning; see the job summary of the [CI run](" in text
    assert "<summary>Tuning" not in text and "<summary>Numerics" in text
    assert len(table_rows(text)) == 4
    text = render_comment(decision, CONTEXT, max_chars=without_details)
    assert "<details>" not in text and len(table_rows(text)) == 4
    assert "Not shown, to fit GitHub's size limit: environment, tuning, numerics;" in text


def test_tiny_max_chars():
    decision = big_decision()
    text = render_comment(decision, CONTEXT, max_chars=600)
    assert len(text) <= 600
    assert text.startswith(MARKER + "\n### mlci FAIL: ")
    assert "rows not shown" in text
    tiny = render_comment(decision, CONTEXT, max_chars=60)
    assert len(tiny) <= 60 and tiny.startswith(MARKER)
    with pytest.raises(ValueError):
        render_comment(decision, CONTEXT, max_chars=10)


# --- policies, known failures, unreadable results ------------------------------------


def test_policy_known_failure_removed_and_problems():
    decision = decide([results("cpu-x86", [
        model("resnet50", base=1.0, head=1.2),
        model("legacy", status="import_failed", error="no converter for LSTM", base_status="import_failed"),
    ], fail_on="never", removed=("dropped-model",))], problems=["results/gpu.json: unsupported results schema 'v0' <x>"])
    text = render_comment(decision, CONTEXT)
    assert "### mlci WARN: 1 regression on cpu-x86; 1 still failing as at the base" in text
    assert "**Passes** (fail-on `never`: report only)" in text
    assert "| legacy | cpu-x86 | — | — | — | — | failed (known) |" in text
    assert "| resnet50 | cpu-x86 | 1.00 ms | 1.20 ms | +20." in text and "| regression |" in text
    assert "| dropped-model | cpu-x86 | — | — | — | — | removed |" in text
    assert "- results/gpu.json: unsupported results schema 'v0' &lt;x&gt;" in text
    failing = decide([results("cpu-x86", [model("resnet50")])], problems=["results/gpu.json: truncated"])
    text = render_comment(failing, CONTEXT)
    assert "### mlci FAIL: " in text and "**Fails the build**: 1 missing or unreadable results file (fail-on `regression`" in text
    console = Console(record=True, width=160)
    console.print(terminal_table(failing))
    assert "gate: fails the build: 1 missing or unreadable results file (fail-on: regression)" in console.export_text()


# --- formatting, templates, terminal -------------------------------------------------


def test_formatters():
    assert [format_ms(v) for v in (None, float("nan"), 0.0123, 0.9996, 1.0, 4.126, 12.34, 123.4, 999.7, 1234.0)] == [
        "—", "—", "12.3 µs", "1.00 ms", "1.00 ms", "4.13 ms", "12.3 ms", "123 ms", "1.00 s", "1.23 s"]
    assert [format_speedup(v) for v in (None, 0.456, 3.14, 12.4)] == ["—", "0.46x", "3.1x", "12x"]
    assert [format_percent(v) for v in (0.95, 0.99875, 0.9999375)] == ["95%", "99.875%", "99.9938%"]
    assert clip("short\n text") == "short text"
    clipped = clip("Traceback: " + "noise " * 100 + "ValueError: the real cause")
    assert len(clipped) == 300 and clipped.startswith("Traceback: noise") and clipped.endswith("ValueError: the real cause")
    cell = regression_decision().cells[0]
    assert re.fullmatch(r"\+10\.\d% \[\+\d+\.\d%, \+\d+\.\d%\]", format_change(cell))


def test_every_template_the_package_ships_compiles_and_the_ones_mlci_renders_are_there():
    """Jinja compiles a template when it is loaded, so a syntax error in any of them fails here (not in a PR
    comment months later), including the history page and the config `mlci init` writes."""
    import jinja2

    import templates

    env = environment()
    folder = Path(templates.__file__).parent
    shipped = sorted(p.name for p in folder.glob("*.j2"))
    assert set(shipped) >= {"comment.md.j2", "summary.md.j2", "_macros.md.j2", "history.html.j2", "mlci.toml.j2"}
    for name in shipped:  # each renders with its own filters; the syntax is checked for all of them
        jinja2.Environment().parse((folder / name).read_text(encoding="utf-8"), name=name)
    for name in ("comment.md.j2", "summary.md.j2", "_macros.md.j2"):
        env.get_template(name)  # the report's templates compile with the report's filters
    with pytest.raises(Exception, match="nope"):
        env.get_template("nope.j2")


def test_templates_read_only_the_view_model():
    """Every name the Markdown templates read is a ReportView field or a global, and every field is read."""
    env = environment()
    read: set[str] = set()
    for name in ("comment.md.j2", "summary.md.j2", "_macros.md.j2"):
        tree = env.parse(template_source(name))
        targets = [node.target for node in tree.find_all(jinja2.nodes.Assign)]
        names = [n for target in targets for n in (target, *target.find_all(jinja2.nodes.Name))]
        assigned = {n.name for n in names if isinstance(n, jinja2.nodes.Name)}  # {% set %} inside the macros
        read |= jinja2.meta.find_undeclared_variables(tree) - assigned
    fields = {f.name for f in dataclasses.fields(ReportView)}
    assert read - set(env.globals) == fields


def test_empty_decision():
    text = render_comment(decide([]), ReportContext())
    assert text.startswith(MARKER + "\n### mlci PASS: Nothing compared")
    assert "No model was measured." in text and "no cell compared" in text


def test_terminal_table():
    decision = failure_decision()
    console = Console(record=True, width=160)
    console.print(terminal_table(decision))
    out = console.export_text()
    assert "mlci FAIL: 2 failures on cpu-x86, gpu-cuda" in out
    for text in ("model", "target", "change [interval]", "faster", "verdict", "squeezenet", "resnet50",
                 "failed *", "4.10 ms", "+0.0% [", "3.1x", "unchanged", "fails the build: 2 blocking cells"):
        assert text in out, text
    # user text is not console markup
    console = Console(record=True, width=160)
    console.print(terminal_table(hostile_decision()))
    assert "gpu|<b>cuda</b>" in console.export_text() or "gpu|<b>cuda</b>".replace("|", "") in console.export_text()
    console = Console(record=True, width=160)
    console.print(terminal_table(decide([results("[bold]x[/bold]", [model("[red]m[/red]")])])))
    out = console.export_text()
    assert "[red]m[/red]" in out and "[bold]x[/bold]" in out


def test_the_comment_names_the_backend_to_ship_on_each_target() -> None:
    """Per model x target, the faster of tuned TVM and ONNX Runtime, and by how much."""
    decision = decide([
        results("cpu-x86", [model("bert-tiny", base=1.0, head=1.0, ort=4.0), model("yolov8n", base=35.0, head=35.0, ort=14.0)]),
        results("gpu-cuda", [model("yolov8n", base=4.0, head=4.0, ort=12.0)]),
    ])
    comment = render_comment(decision, CONTEXT)
    assert "| faster: TVM or ORT |" in comment
    rows = {(c.model, c.target): next(line for line in comment.splitlines() if line.startswith(f"| {c.model} | {c.target} |"))
            for c in decision.cells}  # the first such line is the main table's
    assert "| TVM by 4.0x |" in rows[("bert-tiny", "cpu-x86")]
    assert "| ORT by 2.5x |" in rows[("yolov8n", "cpu-x86")]  # ship ONNX Runtime on this CPU ...
    assert "| TVM by 3.0x |" in rows[("yolov8n", "gpu-cuda")]  # ... and the tuned model on this GPU
    assert "ORT by 2.5x" in "".join(str(c) for c in terminal_table(decision).columns[5].cells)


def test_the_comment_shows_how_many_kernels_run_a_tuned_schedule() -> None:
    """A fallback to untuned code is visible: kernels with a tuned schedule out of all, per model."""
    decision = decide([results("cpu-x86", [
        model("resnet50", compile_info=CompileInfo(seconds=9.0, kernels=40, kernels_tuned=31, kernels_default=9)),
        model("mlp", compile_info=CompileInfo(seconds=0.4, kernels=3, kernels_tuned=3, build="default",
                                              tuned_build_ms=0.05, default_build_ms=0.03)),
    ])])
    comment = render_comment(decision, CONTEXT)
    assert "| kernels tuned |" in comment
    tuning_rows = {line.split("|")[1].strip(): line for line in comment.splitlines()
                   if line.startswith(("| resnet50 |", "| mlp |")) and "| 81.5 |" in line}  # the tuning table's
    assert "| 31/40 |" in tuning_rows["resnet50"]
    assert "| 3/3 (default build) |" in tuning_rows["mlp"]


def test_the_tuning_table_says_how_many_kernels_came_from_the_s3_cache() -> None:
    """Kernels another runner searched are visible: a column appears once any shown cell pulled from S3."""
    pulled = TuningInfo(trials_new=0, trials_cached=64, tasks=12, tasks_from_cache=12, seconds=0.4,
                        kernels_from_remote=9)
    local_only = render_comment(decide([results("cpu-x86", [model("resnet50")])]), CONTEXT)
    assert "kernels from S3" not in local_only
    comment = render_comment(decide([results("cpu-x86", [model("resnet50", tuning=pulled), model("mlp")])]), CONTEXT)
    header = next(line for line in comment.splitlines() if line.startswith("| model | target | kernels tuned |"))
    column = header.split("|").index(" kernels from S3 ")
    rows = {line.split("|")[1].strip(): line.split("|") for line in comment.splitlines()
            if line.startswith(("| resnet50 |", "| mlp |")) and len(line.split("|")) == len(header.split("|"))}
    assert rows["resnet50"][column].strip() == "9" and rows["mlp"][column].strip() == "0"


def test_the_comment_says_which_numerics_checks_prove_nothing() -> None:
    vacuous = NumericsInfo(max_abs_err=0.0, max_rel_err=0.0, atol=1e-4, rtol=1e-3, passed=True, input_sets=2,
                           vacuous="the check proves nothing: over 2 different input sets, ...")
    decision = decide([results("cpu-x86", [model("zoo", numerics=vacuous), model("resnet50")])])
    comment = render_comment(decision, CONTEXT)
    assert "Numerics vs ONNX Runtime (2 cells, 1 vacuous)" in comment
    rows = {line.split("|")[1].strip(): line for line in comment.splitlines() if "| 0.0001 |" in line}
    assert rows["zoo"].rstrip().endswith("yes, **vacuous** |") and "vacuous" not in rows["resnet50"]
    assert "a build that ignored its inputs would pass too" in comment
    plain = render_comment(decide([results("cpu-x86", [model("resnet50")])]), CONTEXT)
    assert "vacuous" not in plain.lower()
