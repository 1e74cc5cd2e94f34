"""Timing each kernel of a build, for a cell the run measured slower: real TVM builds of a tiny
MLP and of the same MLP with a 16x wider hidden layer (default schedules, no tuning)."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from mlci import compile as tvm_compile
from mlci import measure
from mlci.config import ModelConfig
from mlci.models import prepare_model
from mlci.pipeline import profile_pair

from .conftest import save, tiny_mlp


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory) -> tuple[measure.TvmModel, measure.TvmModel, dict, list[str]]:
    """(narrow, wide) loaded on the CPU, with inputs both take."""
    import tvm

    root = tmp_path_factory.mktemp("profile")
    models = []
    for width in (256, 4096):
        path = root / f"mlp{width}.onnx"
        save(tiny_mlp((64, width, 64)), path)
        prepared = prepare_model(ModelConfig(name=f"mlp{width}", path=path, dims={"batch": 1}))
        executable, _ = tvm_compile.build(tvm_compile.import_relax(prepared), tvm.target.Target("llvm"),
                                          tvm_compile.empty_database())
        models.append(measure.TvmModel(executable, tvm.cpu()))
    names = [s.name for s in prepared.inputs]
    return models[0], models[1], measure.make_inputs(prepared.inputs, 0), names


def test_each_kernel_gets_its_calls_and_time_per_inference_and_the_wider_layer_grows(builds) -> None:
    narrow, wide, inputs, names = builds
    base, head = measure.profile_kernels([narrow, wide], inputs, names, inferences=5)
    assert base.inferences == head.inferences == 5
    before = {k.name: k for k in base.kernels}
    after = {k.name: k for k in head.kernels}
    assert set(before) == set(after) and len(before) == 2  # one kernel per layer, named alike in both builds
    assert not any(name.startswith("vm.builtin.") for name in after)  # the VM's own calls are no kernels
    assert all(k.calls == 1 and k.total_us > 0 for k in [*base.kernels, *head.kernels])
    assert [k.total_us for k in head.kernels] == sorted((k.total_us for k in head.kernels), reverse=True)
    grew = [name for name in after if after[name].total_us > before[name].total_us]
    assert grew, (base, head)  # 16x the multiply-adds


def test_profiling_stops_at_its_time_cap(builds) -> None:
    narrow, _, inputs, names = builds
    [profile] = measure.profile_kernels([narrow], inputs, names, inferences=100_000, max_seconds=0.05)
    assert 1 <= profile.inferences < 100_000


def test_a_failed_profile_is_one_warning_and_no_kernels(builds, caplog: pytest.LogCaptureFixture) -> None:
    narrow, wide, _, names = builds
    wrong = {names[0]: np.zeros((1, 32), np.float32)}  # the model takes (1, 64): the VM refuses the call
    with caplog.at_level(logging.WARNING, logger="mlci"):
        assert profile_pair(wide, narrow, wrong, names, "mlp") == (None, None)
    [record] = caplog.records
    assert record.getMessage().startswith("mlp: could not time its kernels one by one (")
    assert "the report names no kernels" in record.getMessage()
