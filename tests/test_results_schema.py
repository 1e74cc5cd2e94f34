"""The results file as untrusted input: `read_results` checks every value against the
dataclasses' type hints and names the file and the JSON path of each bad value."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from mlci.cli import app
from mlci.gate import decide
from mlci.results import (
    MIGRATIONS,
    SCHEMA,
    SCHEMA_VERSION,
    Baseline,
    CompileInfo,
    CostInfo,
    Execution,
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
    ResultsError,
    Status,
    TargetInfo,
    TrendPoint,
    TuningInfo,
    read_results,
    schema_outline,
    schema_version,
    write_results,
)
from mlci.stats import summarize


def lat(samples: list[float]) -> Latency:
    return Latency(samples=list(samples), **summarize(list(samples)).as_dict())


def good() -> Results:
    """Every dataclass and every kind of field the writer produces."""
    return Results(
        git=GitInfo(commit="h" * 40, branch="feature", base_commit="b" * 40, pr=7, repository="o/r", run_id="1",
                    default_branch="main"),
        target=TargetInfo(name="cpu", tvm_target={"kind": "llvm", "num-cores": 2}, fingerprint=Fingerprint(hash="f", cpu="x"),
                          price_per_hour=0.36),
        models=[
            ModelResult(
                name="mlp", path="m.onnx", sha256="00", status="ok",
                compile=CompileInfo(seconds=1.5, import_seconds=0.5, kernels=3),
                tuning=TuningInfo(trials_new=3, trials_cached=1, tasks=3, tasks_from_cache=1, seconds=2.5,
                                  trials_valid_new=3, trials_budget=4, seconds_budget=600.0),
                numerics=NumericsInfo(max_abs_err=1e-6, max_rel_err=1e-5, atol=1e-4, rtol=1e-3, passed=True),
                latency_ms=lat([1.0, 1.1, 1.2, 1.05, 1.15]),
                peer=PeerInfo(onnxruntime_median_ms=2.0, onnxruntime_samples=[2.0, 2.1], speedup=1.8),
                threshold=0.05,
                base=Baseline(commit="b" * 40, path="m.onnx", sha256="01", latency_ms=lat([1.0, 1.1, 1.0, 1.2, 1]),
                              rounds=2, same_model=False,
                              profile=KernelProfile([KernelTime("fused_matmul_add_relu", 1, 410.5)], inferences=3)),
                history=History(commit="c" * 40, branch="main", run_id="r1", created_at="2024-01-01T00:00:00+00:00",
                                fingerprint="g", fingerprint_match=False, fingerprint_diff={"cpu": ["y", "x"]},
                                latency_ms=lat([1.0, 1.2]), trend=[TrendPoint(commit="c", median=1.1)]),
                cost=CostInfo(per_million_usd=0.11, onnxruntime_per_million_usd=0.2),
                profile=KernelProfile([KernelTime("fused_matmul_add_relu", 1, 520.25), KernelTime("fused_add", 2, 3.0)],
                                      inferences=3),
            ),
            ModelResult(name="lstm", path="l.onnx", status="import_failed", error="unsupported: LSTM",
                        base=Baseline(commit="b" * 40, status="missing")),
        ],
        base_ref="origin/main",
        removed_models=["old"],
        config="models/mlci.toml",
        gate=GateSettings(threshold=0.05, fail_on="regression"),
    )


def write_json(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_a_real_results_file_round_trips(tmp_path: Path) -> None:
    original = good()
    path = write_results(original, tmp_path / "cpu.json")
    assert read_results(path) == original


def test_no_samples_summarise_to_null_and_read_back(tmp_path: Path) -> None:
    """summarize([]) is all NaN, which json_safe writes as null: a file mlci wrote must read."""
    results = good()
    results.models[1].latency_ms = lat([])
    back = read_results(write_results(results, tmp_path / "cpu.json"))
    assert back.models[1].latency_ms == Latency(samples=[], median=None, mean=None, std=None, min=None, p90=None, n=0)


def test_unknown_keys_are_ignored_at_every_depth(tmp_path: Path) -> None:
    original = good()
    data = original.to_dict()
    data["new_top_level"] = {"anything": [1, 2]}
    data["git"]["new"] = 1
    data["target"]["new"] = None
    data["models"][0]["new"] = "x"
    data["models"][0]["latency_ms"]["p99"] = 1.3
    data["models"][0]["base"]["new"] = []
    data["models"][0]["history"]["new"] = {}
    data["models"][0]["history"]["latency_ms"]["new"] = 0
    assert read_results(write_json(tmp_path / "cpu.json", data)) == original


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """A mutation setting the value at a dotted path (numeric parts index lists)."""
    *parents, last = path.split(".")

    def mutate(data: dict[str, Any]) -> None:
        node: Any = data
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return mutate


def _drop(path: str) -> Callable[[dict[str, Any]], None]:
    *parents, last = path.split(".")

    def mutate(data: dict[str, Any]) -> None:
        node: Any = data
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        del node[last]
    return mutate


HOSTILE = [
    (_set("models.0.latency_ms.samples.3", "x"), "models[0].latency_ms.samples[3]: expected a number, got 'x'"),
    (_set("git.pr", "7; rm"), "git.pr: expected an integer, got '7; rm'"),
    (_set("git.pr", True), "git.pr: expected an integer, got True"),
    (_set("models.0.name", {"$ne": 1}), "models[0].name: expected a string, got an object"),
    (_set("models.1.status", "great"), "models[1].status: unknown status 'great'"),
    (_set("models.0.base.status", "fine"), "models[0].base.status: unknown status 'fine'"),
    (_set("models.0.status", 1), "models[0].status: expected one of ok, import_failed, compile_failed, tune_failed, "
                                 "numerics_failed, run_failed, interrupted, got 1"),
    (_set("models.0.latency_ms.median", True), "models[0].latency_ms.median: expected a number, got True"),
    (_set("models.0.latency_ms.samples.0", None), "models[0].latency_ms.samples[0]: expected a number, got null"),
    (_set("models.0.latency_ms.samples.0", 10**400), "models[0].latency_ms.samples[0]: expected a number"),
    (_set("models.0.latency_ms.samples", "1,2"), "models[0].latency_ms.samples: expected a list, got '1,2'"),
    (_set("models.0.latency_ms.n", 2.5), "models[0].latency_ms.n: expected an integer, got 2.5"),
    (_set("models.0.base.same_model", "yes"), "models[0].base.same_model: expected true or false, got 'yes'"),
    (_set("models.0.base.latency_ms", []), "models[0].base.latency_ms: expected an object, got a list"),
    (_set("models.0.history.trend", {"a": 1}), "models[0].history.trend: expected a list, got an object"),
    (_set("models.0.history.trend.0", "c"), "models[0].history.trend[0]: expected an object, got 'c'"),
    (_set("models.0.history.fingerprint_diff.cpu", "x"), "models[0].history.fingerprint_diff.cpu: expected a list"),
    (_set("models.0.history.fingerprint_diff", {"a b": 1}), "models[0].history.fingerprint_diff['a b']: expected a list"),
    (_set("models.0.threshold", "0.05"), "models[0].threshold: expected a number, got '0.05'"),
    (_set("models.0.threshold", -0.1), "models[0].threshold: expected a fraction between 0 and 1, got -0.1"),
    (_set("models.0.peer", [2.0]), "models[0].peer: expected an object, got a list"),
    (_drop("models.0.tuning.trials_new"), "models[0].tuning.trials_new: missing"),
    (_set("models.0.numerics.passed", "yes"), "models[0].numerics.passed: expected true or false, got 'yes'"),
    (_set("models.0.compile.seconds", "1.5"), "models[0].compile.seconds: expected a number, got '1.5'"),
    (_set("target.fingerprint.cores", "2"), "target.fingerprint.cores: expected an integer, got '2'"),
    (_set("models.0.history.trend.0.median", "fast"), "models[0].history.trend[0].median: expected a number, got 'fast'"),
    (_set("target.tvm_target", ["llvm"]), "target.tvm_target: expected an object, got a list"),
    (_set("removed_models.0", 1), "removed_models[0]: expected a string, got 1"),
    (_set("models", {"mlp": {}}), "models: expected a list, got an object"),
    (_set("models.0", "mlp"), "models[0]: expected an object, got 'mlp'"),
    (_set("git", "main"), "git: expected an object, got 'main'"),
    (_drop("git"), "git: missing"),
    (_drop("created_at"), "created_at: missing"),
    (_drop("models.0.latency_ms.median"), "models[0].latency_ms.median: missing"),
    (_drop("models.0.history.run_id"), "models[0].history.run_id: missing"),
    (_set("schema", ["mlci.results/1"]), "unsupported results schema a list"),
    (_set("schema_version", 6), "results schema version 6 is newer than this mlci reads (5): upgrade mlci"),
    (_set("schema_version", "2"), "unsupported results schema 'mlci.results' version '2'"),
    (_drop("schema_version"), "unsupported results schema 'mlci.results' (this mlci reads 'mlci.results' up to version 5)"),
    (_set("target.price_per_hour", "0.36"), "target.price_per_hour: expected a number, got '0.36'"),
    (_set("target.price_per_hour", 0), "target.price_per_hour: expected a price greater than 0, got 0"),
    (_set("models.0.cost.per_million_usd", -0.5), "models[0].cost.per_million_usd: expected a cost of at least 0, got -0.5"),
    (_set("models.0.profile.kernels", {"fused": 1}), "models[0].profile.kernels: expected a list, got an object"),
    (_set("models.0.base.profile.kernels.0.calls", "1"),
     "models[0].base.profile.kernels[0].calls: expected an integer, got '1'"),
    (_set("models.0.profile.kernels.0.total_us", -3.0),
     "models[0].profile.kernels[0]: expected calls and total_us of at least 0, got 1 and -3.0"),
    # consistent types, but values `mlci run` never writes and `mlci compare` would trip over
    (_set("gate.fail_on", 5), "gate.fail_on: expected one of regression, failure, never, got 5"),
    (_set("gate.fail_on", "sometimes"), "gate.fail_on: unknown fail_on 'sometimes' (expected one of regression, failure, never)"),
    (_set("gate.threshold", "5%"), "gate.threshold: expected a number, got '5%'"),
    (_set("gate.threshold", 5), "gate.threshold: expected a fraction between 0 and 1, got 5"),
    (_set("gate.confidence", 1), "gate.confidence: expected a fraction between 0 and 1, got 1"),
    (_set("models.0.base.latency_ms.n", 1), "models[0].base.latency_ms.n: 1, but there are 5 samples"),
    (lambda d: d["models"][0]["latency_ms"].update(samples=[], n=0),
     "models[0].latency_ms.samples: an ok model needs at least one sample"),
    (_set("models.0.history.fingerprint_diff.cpu", ["y"]),
     "models[0].history.fingerprint_diff.cpu: expected [baseline, this run]"),
]


@pytest.mark.parametrize(("mutate", "expected"), HOSTILE, ids=[h[1].split(":")[0] for h in HOSTILE])
def test_hostile_values_name_the_file_and_the_json_path(tmp_path: Path, mutate, expected: str) -> None:
    data = good().to_dict()
    mutate(data)
    path = write_json(tmp_path / "cpu.json", data)
    with pytest.raises(ResultsError) as info:
        read_results(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert expected in message


def test_a_long_string_is_still_a_string(tmp_path: Path) -> None:
    data = good().to_dict()
    data["target"]["name"] = "x" * 10_000
    assert read_results(write_json(tmp_path / "cpu.json", data)).target.name == "x" * 10_000


def test_nan_and_infinity_literals_are_refused(tmp_path: Path) -> None:
    data = good().to_dict()
    data["models"][0]["latency_ms"]["samples"][1] = float("nan")
    data["models"][0]["latency_ms"]["mean"] = float("inf")
    path = tmp_path / "cpu.json"
    path.write_text(json.dumps(data))  # Python writes NaN and Infinity; mlci never does
    with pytest.raises(ResultsError) as info:
        read_results(path)
    assert "models[0].latency_ms.samples[1]: expected a number, got nan" in str(info.value)
    assert "models[0].latency_ms.mean: expected a number, got inf" in str(info.value)


def test_problems_are_collected_up_to_a_limit(tmp_path: Path) -> None:
    data = good().to_dict()
    data["models"][0]["latency_ms"]["samples"] = ["x"] * 5000
    data["git"]["pr"] = "7"
    with pytest.raises(ResultsError) as info:
        read_results(write_json(tmp_path / "cpu.json", data))
    message = str(info.value)
    assert "git.pr: expected an integer, got '7'" in message
    assert "models[0].latency_ms.samples[0]: expected a number" in message
    assert message.count("expected") == 10 and message.endswith("and 4991 more")
    assert len(message) < 2000


@pytest.mark.parametrize("body", ["[1, 2]", '"mlci.results/1"', "null", "3"])
def test_a_non_object_top_level_is_refused(tmp_path: Path, body: str) -> None:
    path = tmp_path / "cpu.json"
    path.write_text(body)
    with pytest.raises(ResultsError, match=r"expected a JSON object at the top level") as info:
        read_results(path)
    assert str(info.value).startswith(f"{path}: ")


@pytest.mark.parametrize("body", ["{", "[" * 100_000, b"\xff\xfe{}"])
def test_unparseable_files_are_refused(tmp_path: Path, body: str | bytes) -> None:
    path = tmp_path / "cpu.json"
    path.write_bytes(body if isinstance(body, bytes) else body.encode())
    with pytest.raises(ResultsError, match="cannot read results") as info:
        read_results(path)
    assert str(info.value).startswith(f"{path}: ")


def test_a_file_over_64_mib_is_refused_unread(tmp_path: Path) -> None:
    path = tmp_path / "huge.json"
    with path.open("w") as f:
        f.write("{")
        f.truncate(65 * 2**20)  # sparse: no need to write 65 MiB
    with pytest.raises(ResultsError, match="over 64 MiB") as info:
        read_results(path)
    assert str(info.value).startswith(f"{path}: ")


def test_compare_reports_a_hostile_file_and_fails_the_gate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for name in ("GITHUB_ACTIONS", "GITHUB_TOKEN", "GITHUB_EVENT_PATH"):
        monkeypatch.delenv(name, raising=False)
    results_dir, report_dir = tmp_path / "results", tmp_path / "report"
    args = ["compare", str(results_dir), "--no-github", "--report-dir", str(report_dir)]
    passing = good()
    passing.models = passing.models[:1]  # the failed lstm would fail the gate on its own
    write_results(passing, results_dir / "cpu.json")
    alone = CliRunner().invoke(app, args)
    assert alone.exit_code == 0, alone.output

    hostile = good().to_dict()
    hostile["target"]["name"] = "gpu"
    hostile["git"]["pr"] = "7; rm -rf /"
    hostile["models"][0]["latency_ms"]["samples"][3] = "x"
    hostile["models"][0]["name"] = {"<script>": 1}
    hostile_path = write_json(results_dir / "gpu.json", hostile)

    result = CliRunner().invoke(app, args)

    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)  # a crash would exit 3
    decision = json.loads((report_dir / "decision.json").read_text())
    assert decision["failed"] is True
    [problem] = decision["problems"]
    assert problem.startswith(f"{hostile_path}: ")
    assert "git.pr: expected an integer, got '7; rm -rf /'" in problem
    assert "models[0].name: expected a string, got an object" in problem
    assert "models[0].latency_ms.samples[3]: expected a number, got 'x'" in problem
    assert {c["target"] for c in decision["cells"]} == {"cpu"}
    assert "<script>" not in (report_dir / "comment.md").read_text()


# --- versions: older files keep loading, the README describes the code -------------------

GOLDEN = Path(__file__).parent / "data" / "results"
"""Results files written by earlier mlci releases, each named vN-*.json for its schema version."""


def golden_files() -> list[Path]:
    return sorted(GOLDEN.glob("v*.json"))


def test_every_earlier_schema_version_has_a_golden_file() -> None:
    versions = {int(p.name[1:].split("-", 1)[0]) for p in golden_files()}
    assert versions == set(range(1, SCHEMA_VERSION)) == set(MIGRATIONS)


@pytest.mark.parametrize("path", golden_files(), ids=lambda p: p.name)
def test_a_results_file_of_an_earlier_version_still_loads(path: Path, tmp_path: Path) -> None:
    raw = json.loads(path.read_text())
    assert schema_version(raw) < SCHEMA_VERSION
    results = read_results(path)
    assert results.schema == SCHEMA and results.schema_version == SCHEMA_VERSION
    assert [m.name for m in results.models] == [m["name"] for m in raw["models"]]
    for model, old in zip(results.models, raw["models"]):
        assert model.status == old["status"] and isinstance(model.status, Status)
        if model.ok:  # typed sections, not dicts, with the values the old file held
            assert isinstance(model.tuning, TuningInfo) and model.tuning.trials_new == old["tuning"]["trials_new"]
            assert isinstance(model.numerics, NumericsInfo) and model.numerics.passed is True
            assert isinstance(model.peer, PeerInfo)
            assert model.peer.onnxruntime_median_ms == old["peer"]["onnxruntime_median_ms"]
            assert model.latency_ms is not None and model.latency_ms.samples == old["latency_ms"]["samples"]
        else:  # stages a failed model never reached were {} and are now null
            assert model.error == old["error"]
            assert model.peer is None and model.latency_ms is None
    assert results.target.fingerprint.hash == raw["target"]["fingerprint"]["hash"]
    decide([results])  # the gate takes it
    again = read_results(write_results(results, tmp_path / "cpu.json"))  # and it is written as the current version
    assert again == results and json.loads((tmp_path / "cpu.json").read_text())["schema_version"] == SCHEMA_VERSION


def test_a_version_2_file_loads_without_price_costs_or_kernel_profiles() -> None:
    """Version 3 added the target's price, each model's cost and the kernel profiles; a file written before has none."""
    path = GOLDEN / "v2-ab-with-history.json"
    raw = json.loads(path.read_text())
    assert raw["schema_version"] == 2 and "price_per_hour" not in raw["target"] and "cost" not in raw["models"][0]
    results = read_results(path)
    assert results.schema_version == SCHEMA_VERSION == 5
    assert results.target.price_per_hour is None
    assert [(m.cost, m.profile) for m in results.models] == [(None, None), (None, None)]
    assert results.models[0].base is not None and results.models[0].base.profile is None
    cell = next(c for c in decide([results]).cells if c.model == "mlp")
    assert cell.head_cost is None and cell.cost_change is None and cell.kernels == ()


def test_the_readme_schema_section_is_generated_from_the_code() -> None:
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    start, end = "<!-- results-schema: start -->\n```text\n", "```\n<!-- results-schema: end -->"
    assert start in readme and end in readme
    documented = readme.split(start, 1)[1].split(end, 1)[0]
    assert documented == schema_outline() + "\n", (
        "README.md's results schema is out of date: replace the text between the results-schema markers "
        "with the output of `python -m mlci.results`"
    )


def test_a_version_3_file_is_a_native_run_that_finished() -> None:
    """Version 4 added how a target was exercised and interrupted runs; a version 3 file was always native."""
    results = read_results(GOLDEN / "v3-priced.json")
    assert results.target.execution == Execution.NATIVE and results.target.execution_note is None
    assert results.interrupted is None and results.target.price_per_hour == 0.5
    assert all(m.numerics is None or m.numerics.emulated is False for m in results.models)


def test_a_version_4_file_compared_every_output_with_onnx_runtime() -> None:
    """Version 5 added numerics with no reference (ONNX Runtime cannot run the model); a version 4
    file's numerics always had one, and its errors are numbers."""
    results = read_results(GOLDEN / "v4-native.json")
    checked = [m.numerics for m in results.models if m.numerics]
    assert checked and all(n.no_reference is None and n.max_abs_err is not None for n in checked)
