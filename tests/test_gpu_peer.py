"""ONNX Runtime's peer runs on the target's kind of device: the CPU beside a CPU build, CUDA beside a
CUDA build, and nothing (with the reason shown) where ONNX Runtime has no provider for the device."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper
from rich.console import Console

from mlci import measure
from mlci.console import failure_lines, results_table
from mlci.gate import decide
from mlci.pipeline import Measured
from mlci.report import ReportContext, render_comment
from mlci.results import PeerInfo, Results
from tests.test_report import model, results

NO_CUDA = measure.peer_provider("cuda", ["CPUExecutionProvider"])[1]


def test_a_cpu_target_is_compared_with_onnx_runtime_on_the_cpu():
    assert measure.peer_provider("llvm", ["CUDAExecutionProvider", "CPUExecutionProvider"]) == (
        "CPUExecutionProvider", None)


def test_a_cuda_target_is_compared_with_onnx_runtime_on_cuda_when_it_has_the_provider():
    assert measure.peer_provider("cuda", ["CUDAExecutionProvider", "CPUExecutionProvider"]) == (
        "CUDAExecutionProvider", None)


def test_a_cuda_target_without_the_cuda_provider_is_not_compared_with_the_cpu():
    provider, note = measure.peer_provider("cuda", ["AzureExecutionProvider", "CPUExecutionProvider"])
    assert provider is None
    assert note == ("ONNX Runtime here has no CUDA execution provider (install onnxruntime-gpu): "
                    "not compared with the CPU")


@pytest.mark.parametrize("kind", ["rocm", "vulkan", "metal", "opencl"])
def test_other_gpu_kinds_are_not_compared_with_the_cpu(kind):
    provider, note = measure.peer_provider(kind, ["CPUExecutionProvider", "CUDAExecutionProvider"])
    assert provider is None and kind in note and "not compared with the CPU" in note


def _relu_model() -> bytes:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8).SerializeToString()


def test_the_cpu_peer_runs_on_the_cpu_provider():
    ort_model = measure.OrtModel.load(_relu_model(), threads=1)
    assert ort_model.provider == "CPUExecutionProvider"
    x = np.array([[-1, 2, -3], [4, -5, 6]], dtype=np.float32)
    ort_model.timer({"x": x})()
    assert ort_model.run({"x": x})[0].tolist() == [[0, 2, 0], [4, 0, 6]]


@pytest.mark.filterwarnings("ignore:Specified provider")
@pytest.mark.skipif("CUDAExecutionProvider" in measure.available_providers(), reason="this ONNX Runtime has CUDA")
def test_a_cuda_session_that_falls_back_to_the_cpu_is_refused():
    """ONNX Runtime starts on the CPU when a listed provider is missing: timing that as the CUDA peer would lie."""
    with pytest.raises(RuntimeError, match="did not start its CUDAExecutionProvider"):
        measure.OrtModel.load(_relu_model(), threads=1, provider="CUDAExecutionProvider")


@pytest.mark.filterwarnings("ignore:Specified provider")
@pytest.mark.skipif("CUDAExecutionProvider" in measure.available_providers(), reason="this ONNX Runtime has CUDA")
def test_a_cuda_peer_that_cannot_start_is_a_note_not_a_failed_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """ONNX Runtime lists a CUDA provider that then does not start (no driver, no device): the model is
    still measured, its peer column says why it is empty."""
    from types import SimpleNamespace

    from mlci.pipeline import Pipeline

    monkeypatch.setattr(measure, "available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    from mlci.pipeline import Reference

    reference = Reference(measure.OrtModel.load(_relu_model(), threads=1), is_peer=True)
    prepared = SimpleNamespace(reference=_relu_model(), peer=_relu_model(), weights_dir=None, no_reference=None)
    checked = SimpleNamespace(reference=reference, compiled=SimpleNamespace(prepared=prepared))
    here = SimpleNamespace(target=SimpleNamespace(kind="cuda"), threads=1)
    peer, note = Pipeline.peer(here, checked)  # type: ignore[arg-type]
    assert peer is None and "CUDAExecutionProvider could not run the model" in note and "not compared" in note


def test_an_untimed_peer_records_why_and_no_latency():
    peer = Measured(tvm_ms=[1.0, 1.1], ort_ms=[], peer_note=NO_CUDA).peer_info()
    assert peer.onnxruntime_median_ms is None and peer.speedup is None and peer.faster is None
    assert peer.note == NO_CUDA and peer.provider is None


def test_a_timed_peer_records_its_provider():
    peer = Measured(tvm_ms=[1.0, 1.0], ort_ms=[2.0, 2.0], ort_threads=4,
                    ort_provider="CUDAExecutionProvider").peer_info()
    assert peer.provider == "CUDAExecutionProvider" and peer.note is None
    assert peer.onnxruntime_median_ms == 2.0 and peer.faster == "tvm"


def test_the_peer_provider_and_note_survive_a_round_trip():
    timed = model("resnet", ort=2.0)
    timed.peer = PeerInfo(onnxruntime_median_ms=2.0, provider="CUDAExecutionProvider")
    untimed = model("bert")
    untimed.peer = PeerInfo(onnxruntime_median_ms=None, note=NO_CUDA)
    res = results("gpu-cuda", [timed, untimed])
    loaded = Results.from_dict(res.to_dict())
    assert loaded.models[0].peer == timed.peer
    assert loaded.models[1].peer == untimed.peer


def _untimed(name: str) -> object:
    m = model(name)
    m.peer = PeerInfo(onnxruntime_median_ms=None, note=NO_CUDA + " [b]")
    return m


def test_the_run_table_shows_n_a_and_the_reason_once_for_an_untimed_peer():
    res = results("gpu-cuda", [_untimed("resnet"), _untimed("bert")])
    console = Console(record=True, width=200)
    console.print(results_table(res))
    table = console.export_text()
    assert table.count("n/a") == 2
    lines = failure_lines(res)
    assert lines == [f"ORT n/a: {NO_CUDA} \\[b]"]  # once for the target, console markup escaped


def test_the_run_table_names_a_cuda_peer():
    m = model("resnet")
    m.peer = PeerInfo(onnxruntime_median_ms=2.0, provider="CUDAExecutionProvider")
    console = Console(record=True, width=200)
    console.print(results_table(results("gpu-cuda", [m])))
    assert "ORT (CUDA)" in console.export_text()


def _with_peer(target: str, models: list, **peer) -> Results:
    """Results whose every model's ONNX Runtime peer is `peer` (as `mlci run` writes it): the comment
    reads it through the gate's cells."""
    res = results(target, models)
    for m in res.models:
        m.peer = PeerInfo(**{"onnxruntime_median_ms": m.peer.onnxruntime_median_ms if m.peer else None, **peer})
    return res


def test_the_comment_shows_n_a_and_the_reason_once_for_an_untimed_cuda_peer():
    decision = decide([_with_peer("gpu-cuda", [model("resnet"), model("bert")], note=NO_CUDA + " *x*")])
    text = render_comment(decision, ReportContext())
    rows = [line for line in text.splitlines() if " | 1.00 ms | 1.00 ms | " in line]
    assert len(rows) == 2 and all(row.endswith("| n/a | unchanged |") for row in rows)
    assert text.count("no CUDA execution provider") == 1
    assert "\\*x\\*" in text  # Markdown escaped


def test_the_comment_names_a_cuda_peer():
    decision = decide([_with_peer("gpu-cuda", [model("resnet", ort=2.0)], provider="CUDAExecutionProvider")])
    text = render_comment(decision, ReportContext())
    assert "faster: TVM or ORT (CUDA)" in text
    assert "| n/a |" not in text


def test_a_cpu_peer_keeps_the_plain_ort_header():
    text = render_comment(decide([results("cpu-x86", [model("resnet", ort=2.0)])]), ReportContext())
    assert "faster: TVM or ORT |" in text
