"""The build cache: an unchanged model is compiled once; anything its build depends on compiles it again."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from mlci.build_cache import BuildCache, build_key
from mlci.compile import BuildChoice, BuildReport
from mlci.config import ModelConfig
from mlci.pipeline import ModelSettings

from .conftest import save, tiny_mlp
from .test_tuning import _commit_naive_records, _pipeline


def _put(cache: BuildCache, tmp_path: Path, key: str, model: str, size: int) -> Path:
    library = tmp_path / f"{key}.so"
    library.write_bytes(b"\0" * size)
    return cache.put(key, model, library, BuildReport(kernels=["k"], tuned=["k"]), BuildChoice(1.0, 2.0), 3.0)


def test_an_entry_reads_back_as_filed(tmp_path: Path) -> None:
    cache = BuildCache(tmp_path / "builds")
    library = _put(cache, tmp_path, "k1", "m", 10)
    got = cache.get("k1")
    assert got is not None and got.library == library and library.read_bytes() == b"\0" * 10
    assert got.report == BuildReport(kernels=["k"], tuned=["k"])
    assert got.choice == BuildChoice(1.0, 2.0) and got.choice.kept == "tuned" and got.seconds == 3.0
    assert cache.get("k2") is None


def test_the_oldest_builds_go_past_the_per_model_and_total_limits(tmp_path: Path) -> None:
    cache = BuildCache(tmp_path / "builds", max_per_model=2, max_bytes=3000)
    for key in ("a1", "a2", "a3"):
        _put(cache, tmp_path, key, "a", 1000)
    assert [k for k in ("a1", "a2", "a3") if cache.get(k)] == ["a2", "a3"]  # two per model
    _put(cache, tmp_path, "b1", "b", 1000)
    assert [k for k in ("a2", "a3", "b1") if cache.get(k)] == ["a3", "b1"]  # three libraries and their notes > 3000 bytes
    _put(cache, tmp_path, "c1", "c", 5000)
    assert [k for k in ("a3", "b1", "c1") if cache.get(k)] == ["c1"]  # the build just filed stays, however large


def test_a_damaged_entry_is_built_again_with_a_warning(tmp_path: Path, caplog) -> None:
    cache = BuildCache(tmp_path / "builds")
    library = _put(cache, tmp_path, "k1", "m", 10)
    library.write_bytes(b"\0" * 4)  # truncated
    with caplog.at_level(logging.WARNING, logger="mlci"):
        assert cache.get("k1") is None
    assert "entry k1 cannot be read" in caplog.text and "building again" in caplog.text
    assert not library.parent.exists()


def test_the_key_covers_what_a_build_depends_on() -> None:
    base = dict(model="m", inputs=[("x", [1, 8], "float32")], target="llvm", threads=2,
                records={"k": {"trace": 1}}, keep_default=[])
    key = build_key(**base)
    assert build_key(**base) == key
    for change in ({"threads": 1}, {"records": {"k": {"trace": 2}}}, {"keep_default": ["k"]},
                   {"inputs": [("x", [4, 8], "float32")]}):
        assert build_key(**{**base, **change}) != key


@pytest.mark.slow
def test_an_unchanged_model_is_built_once_and_new_records_build_it_again(tmp_path: Path) -> None:
    """A run after the one that tuned loads the library that run built: same kernels, same numbers
    as ONNX Runtime. Records that change what a kernel runs build it again, and the never-worse
    choice is kept with the library."""
    cache_dir, logs = tmp_path / "cache", tmp_path / "logs"
    path = save(tiny_mlp((64, 128, 16)), tmp_path / "mlp.onnx")
    model = ModelConfig(name="mlp", path=path, dims={"batch": 1}, key="models[0]")
    settings = ModelSettings(trials=8, trials_per_round=4)

    tuned = _pipeline(cache_dir, logs)
    built = tuned.tune_and_build(tuned.load_and_import(model), settings)
    assert built.tuning.trials_new > 0 and not built.build_cached
    state = tuned.cache.state()

    again = _pipeline(cache_dir, logs)  # records read back from disk, not those tuning made in memory
    loaded = again.tune_and_build(again.load_and_import(model), settings)
    assert loaded.tuning.trials_new == 0
    assert loaded.build_cached and loaded.compile_info().build_cached
    assert loaded.build_report == built.build_report and loaded.build_choice == built.build_choice
    assert loaded.library == built.library
    assert again.cache.state() == state  # a hit changes nothing worth saving
    checked = again.check(loaded, settings)
    assert checked.numerics.passed, checked.numerics.message

    imported = again.load_and_import(model)
    _commit_naive_records(again, imported)  # claims to be faster than anything found: every kernel takes it
    rebuilt = again.tune_and_build(imported, settings)
    assert not rebuilt.build_cached and rebuilt.library != built.library
    assert rebuilt.build_choice is not None  # the naive build was timed against the defaults
    assert again.cache.state() != state

    third = _pipeline(cache_dir, logs)
    reloaded = third.tune_and_build(third.load_and_import(model), settings)
    assert reloaded.build_cached and reloaded.build_choice == rebuilt.build_choice
    assert reloaded.build_report == rebuilt.build_report
