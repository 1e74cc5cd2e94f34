"""`mlci compare` against hostile results files: huge sample counts, impossible latencies, foreign links,
invisible characters. A results file comes from an untrusted run (a fork's pull request), so none of these
may cost the report job its memory, show a nonsense verdict, or make the comment say something it does not."""

from __future__ import annotations

import json
import math
import re
import tracemalloc
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from mlci import stats
from mlci.cli import app
from mlci.formatting import escape_markdown, fenced, reveal_invisible
from mlci.results import Baseline, Fingerprint, GitInfo, Latency, ModelResult, Results, TargetInfo, write_results
from mlci.stats import BOOTSTRAP_MAX_SAMPLES, median_ratio_ci, summarize, thin

BASE = "4b825dc642cb6eb9a060e54bf8d69288fbee4904"
HEAD = "9d1c0e3b7a51f2e4c8d6a0b3e5f7a9c1d3e5f7a9"
MLFLOW = "https://mlflow.acme.example"


def _latency(values: list[float]) -> Latency:
    return Latency(samples=list(values), **summarize(values).as_dict())


def _model(name: str, base: list[float], head: list[float], **kw) -> ModelResult:
    return ModelResult(name=name, path=f"models/{name}.onnx", latency_ms=_latency(head),
                       base=Baseline(commit=BASE, latency_ms=_latency(base), rounds=1), **kw)


def _results(target: str, models: list[ModelResult]) -> Results:
    return Results(git=GitInfo(commit=HEAD, base_commit=BASE, branch="feature", repository="acme/vision", pr=7),
                   target=TargetInfo(name=target, tvm_target={"kind": "llvm"}, fingerprint=Fingerprint(hash="fp")),
                   models=models)


def _steady(n: int = 20, centre: float = 2.0) -> list[float]:
    return [round(centre * (1 + 0.001 * ((i * 7) % 5 - 2)), 6) for i in range(n)]


def _compare(tmp_path: Path, *files: Path, env: dict[str, str] | None = None):
    out = tmp_path / "report"
    clean = {"GITHUB_ACTIONS": None, "GITHUB_REPOSITORY": None, "GITHUB_SERVER_URL": None, "MLFLOW_TRACKING_URI": None}
    result = CliRunner().invoke(app, ["compare", *map(str, files), "--no-github", "--report-dir", str(out)],
                                env={**clean, **(env or {})})
    return result, out


# --- the bootstrap's memory -----------------------------------------------------------------------------------


def _all_at_once(base: list[float], head: list[float], paired: bool, resamples: int = 2000, seed: int = 0,
                 confidence: float = 0.95) -> tuple[float, float, float]:
    """The bootstrap as first written: every resample index drawn in one array."""
    b, h = np.asarray(base), np.asarray(head)
    rng = np.random.default_rng(seed)
    if paired:
        log_ratio = np.log(h) - np.log(b)
        ratio = float(np.exp(np.median(log_ratio)))
        boot = np.exp(np.median(log_ratio[rng.integers(0, b.size, size=(resamples, b.size))], axis=1))
    else:
        ratio = float(np.median(h) / np.median(b))
        bi = rng.integers(0, b.size, size=(resamples, b.size))
        hi = rng.integers(0, h.size, size=(resamples, h.size))
        boot = np.median(h[hi], axis=1) / np.median(b[bi], axis=1)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(boot, [tail, 1.0 - tail])
    return ratio, float(min(low, ratio)), float(max(high, ratio))


@pytest.mark.parametrize("n", [1, 10, 60, 600])
def test_the_bootstrap_in_chunks_gives_the_same_interval_as_all_at_once(n: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stats, "BOOTSTRAP_CHUNK", 7_000)  # many chunks, at sizes that stay quick
    rng = np.random.default_rng(n)
    base = list(rng.uniform(1.0, 1.2, n))
    head = list(rng.uniform(1.05, 1.3, n))
    for paired in (True, False):
        got = median_ratio_ci(base, head, paired=paired)
        assert (got.ratio, got.low, got.high) == _all_at_once(base, head, paired)
    short = head[: max(1, n // 3)]  # unpaired with unequal counts: base's draws come first, as before
    got = median_ratio_ci(base, short, paired=False, seed=5)
    assert (got.ratio, got.low, got.high) == _all_at_once(base, short, False, seed=5)


def test_a_results_file_with_300k_samples_is_compared_in_bounded_memory() -> None:
    """2000 resamples x 300,000 pairs at once took 4.5 GiB of indices; thinned and chunked it stays small."""
    rng = np.random.default_rng(1)
    base = list(rng.uniform(1.0, 1.1, 300_000))
    head = [b * 1.2 for b in base]
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        paired = median_ratio_ci(base, head, paired=True)
        unpaired = median_ratio_ci(base, head, paired=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 200 * 2**20, f"peak {peak / 2**20:.0f} MiB"
    assert paired.ratio == pytest.approx(1.2) and paired.low > 1.19
    assert 1.15 < unpaired.low <= unpaired.ratio <= unpaired.high < 1.25


def test_thinning_keeps_every_kth_sample_and_pairs_aligned() -> None:
    values = list(range(1, 50_001))
    kept = thin(values)
    assert len(kept) <= BOOTSTRAP_MAX_SAMPLES and kept[:3] == [1, 4, 7]  # ceil(50000 / 20000) = 3
    assert thin(values[:BOOTSTRAP_MAX_SAMPLES]) == values[:BOOTSTRAP_MAX_SAMPLES]  # normal sizes untouched
    with pytest.raises(ValueError, match="positive and finite"):
        median_ratio_ci([1.0, 0.0], [1.0, 1.0], paired=True)


# --- impossible latencies ----------------------------------------------------------------------------------------


def _write_raw(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data))  # json.dumps writes NaN and Infinity as such, as a hostile file may
    return path


@pytest.mark.parametrize("bad", [0.0, -1.5, math.nan, math.inf])
def test_a_results_file_with_impossible_latencies_is_refused_naming_file_model_and_key(tmp_path: Path, bad: float) -> None:
    data = _results("cpu", [_model("resnet", _steady(), _steady())]).to_dict()
    data["models"][0]["latency_ms"]["samples"] = [bad] * 20
    data["models"][0]["base"]["latency_ms"]["samples"] = [bad] * 20
    bad_file = _write_raw(tmp_path / "cpu.json", data)

    result, out = _compare(tmp_path, bad_file)
    assert result.exit_code == 2, result.output  # the only results file: nothing to compare (usage error)
    printed = " ".join(result.output.split())  # the terminal wraps long lines
    assert "nan%" not in printed
    assert str(bad_file) in printed and "models[0].latency_ms.samples[0]" in printed.replace(" ('resnet')", "")
    if math.isfinite(bad):  # NaN and infinity are no JSON numbers: the reader refuses them first
        assert f"models[0] ('resnet').latency_ms.samples[0] is {bad!r}; " in printed and "; and 35 more" in printed  # 40 samples
    assert not (out / "comment.md").exists()


def test_an_impossible_file_beside_good_ones_fails_the_gate_and_is_listed(tmp_path: Path) -> None:
    good = write_results(_results("cpu", [_model("resnet", _steady(), _steady())]), tmp_path / "cpu.json")
    data = _results("gpu", [_model("resnet", _steady(), _steady())]).to_dict()
    data["models"][0]["latency_ms"]["median"] = 0
    data["models"][0]["base"]["latency_ms"]["samples"][3] = -2.0
    bad = _write_raw(tmp_path / "gpu.json", data)

    result, out = _compare(tmp_path, good, bad)
    assert result.exit_code == 1, result.output  # the gate cannot vouch for what it could not read
    printed = " ".join(result.output.split())  # the terminal wraps long lines
    assert f"error: {bad}: refusing results whose latencies are not all positive, finite numbers of milliseconds: " \
           "models[0] ('resnet').latency_ms.median is 0; models[0] ('resnet').base.latency_ms.samples[3] is -2.0" in printed
    comment = (out / "comment.md").read_text()
    assert "nan%" not in comment
    assert f"- {bad}: refusing results whose latencies are not all positive" in comment
    assert "| resnet | cpu |" in comment and "| resnet | gpu |" not in comment


# --- links ------------------------------------------------------------------------------------------------------


def test_the_verdict_links_only_to_this_runs_mlflow_server(tmp_path: Path) -> None:
    ours = f"{MLFLOW}/#/experiments/1/runs/abc"
    files = [
        write_results(_results("cpu", [_model("resnet", _steady(), _steady(), mlflow_url=ours)]), tmp_path / "cpu.json"),
        write_results(_results("gpu", [_model("resnet", _steady(), _steady(),
                                              mlflow_url="https://phish.example/#/experiments/1/runs/abc")]),
                      tmp_path / "gpu.json"),
    ]
    result, out = _compare(tmp_path, *files, env={"MLFLOW_TRACKING_URI": MLFLOW})
    assert result.exit_code == 0, result.output
    comment = (out / "comment.md").read_text()
    assert f"[unchanged]({ours})" in comment
    assert "phish.example" not in comment
    assert "| resnet | gpu | 2.00 ms | 2.00 ms |" in comment

    result, out = _compare(tmp_path, *files)  # no MLflow server named: no run links at all
    assert "/runs/abc" not in (out / "comment.md").read_text()


AUTOLINK = re.compile(r"(?i)(?:^|[\s*_~(])(?:https?://|www\.)")
"""Where GitHub's autolinking would start a link (after a line start, a space or one of ``*_~(``)."""


def test_bare_urls_in_names_and_errors_do_not_become_links(tmp_path: Path) -> None:
    hostile = "resnet (see https://phish.example/login or www.phish.example)"
    failing = ModelResult(name="vit", path="models/vit.onnx", status="compile_failed",
                          error="download the fix from https://phish.example/patch.sh")
    files = [write_results(_results("cpu", [_model(hostile, _steady(), _steady()), failing]), tmp_path / "cpu.json")]
    result, out = _compare(tmp_path, *files)
    comment = (out / "comment.md").read_text()
    outside_code = re.sub(r"```text\n.*?\n```", "", comment, flags=re.S)  # code blocks never autolink
    outside_code = re.sub(r"\]\(https://github\.com/acme/vision/[^)\s]*\)", "]", outside_code)  # our commit links
    assert "phish.example" in outside_code
    assert not AUTOLINK.search(outside_code), AUTOLINK.search(outside_code)
    assert "https:\u200d//phish.example/login" in outside_code and "www\u200d.phish.example" in outside_code


# --- invisible characters -----------------------------------------------------------------------------------------

BIDI = "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f\u061c"


def test_bidi_controls_in_names_and_errors_are_shown_not_obeyed(tmp_path: Path) -> None:
    name = "safe\u202e\u2066lmth.exe\u2069"
    failing = ModelResult(name="vit", path="models/vit.onnx", status="compile_failed",
                          error="fine\u202eenif\u200b then \u2067hidden\u2069")
    target = "cpu\u200f"
    files = [write_results(_results(target, [_model(name, _steady(), _steady()), failing]), tmp_path / "cpu.json")]
    result, out = _compare(tmp_path, *files)
    assert result.exit_code == 1, result.output  # the compile failure
    for text in ((out / "comment.md").read_text(), (out / "summary.md").read_text()):
        assert not any(unicodedata.category(ch) == "Cf" and ch != "\u200d" for ch in text)
        assert "safe&lt;U+202E&gt;&lt;U+2066&gt;lmth.exe&lt;U+2069&gt;" in text  # in a table cell
        assert "fine<U+202E>enif<U+200B> then <U+2067>hidden<U+2069>" in text  # in the error's code block
        assert "cpu&lt;U+200F&gt;" in text


def test_every_format_character_is_revealed() -> None:
    """The escape covers Unicode's whole Cf category (bidi controls, zero-width and tag characters)."""
    import sys

    every = "".join(chr(c) for c in range(sys.maxunicode + 1) if unicodedata.category(chr(c)) == "Cf")
    assert BIDI in every or all(ch in every for ch in BIDI)
    revealed = reveal_invisible(every)
    assert not any(unicodedata.category(ch) == "Cf" for ch in revealed)
    assert revealed.count("<U+") == len(every)
    assert "\u202e" not in escape_markdown("a\u202eb") and "\u202e" not in fenced("a\u202eb")
    assert escape_markdown("plain ascii_name-1.onnx") == "plain ascii_name-1.onnx"
