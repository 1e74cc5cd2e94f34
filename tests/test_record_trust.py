"""A tuning record is data: one whose schedule trace would link native code into the build (TVM's
`pragma_import_llvm` annotation) never reaches a build, whether it sits in the local database or in
an S3 entry, and mlci says which record it refused. The planted code is real: with the check
switched off it runs when mlci loads the library (it creates a file)."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mlci import remote_cache, trace_check
from mlci.pipeline import ModelSettings
from mlci.remote_cache import workload_line
from mlci.tuning import RECORDS_FILE, WORKLOADS_FILE, _plain

from .servers import moto_server
from .test_remote_cache import _bucket, _remote
from .test_tuning import _imported, _pipeline

pytestmark = pytest.mark.slow


def payload(marker: Path) -> str:
    """LLVM IR whose `module asm` adds an `.init_array` entry: when the library is loaded, the
    loader calls it, and it creates `marker` (x86-64, through libc's creat)."""
    lines = [
        ".section .init_array,\\22aw\\22", ".p2align 3", ".quad mlci_planted", ".text",
        "mlci_planted:", "  lea mlci_planted_path(%rip), %rdi", "  mov $420, %esi", "  jmp creat@PLT",
        ".section .rodata", f"mlci_planted_path: .asciz \\22{marker}\\22", ".text",
    ]
    return "\n".join(f'module asm "{line}"' for line in lines) + "\n"


def planted(record: list, workload: list, marker: Path) -> list:
    """`record`'s schedule with one more instruction, the annotation that imports `payload` on a
    loop, and a time of 1 ns, so that every build takes it. The annotation goes before the trace's
    postprocessing part, which a build does not replay (it runs the postprocessors itself)."""
    from tvm import s_tir
    from tvm.s_tir import meta_schedule as ms

    insts, decisions = record[0]
    end = next((i for i, inst in enumerate(insts) if inst[0] == "EnterPostproc"), len(insts))
    sch = s_tir.Schedule(ms.database.Workload.from_json(workload).mod)
    s_tir.Trace.apply_json_to_schedule([insts[:end], decisions], sch)
    block = next(b for b in sch.get_child_blocks(sch.get_sblock("root")) if sch.get_loops(b))
    sch.annotate(sch.get_loops(block)[0], "pragma_import_llvm", payload(marker))
    return [_plain(sch.trace.as_json()), [1e-9], record[2], record[3]]


@pytest.fixture(scope="module")
def tuned(tmp_path_factory: pytest.TempPathFactory):
    """A tiny model tuned a little: real records to plant beside."""
    tmp = tmp_path_factory.mktemp("tuned")
    imported = _imported(tmp, (32, 64, 8), "a")
    pipeline = _pipeline(tmp / "cache" / "cpu-fp", tmp / "logs")
    pipeline.tune(imported, ModelSettings(trials=4, seconds=300, trials_per_round=2))
    return tmp, imported, pipeline.cache


def _plant_locally(cache_dir: Path, imported, marker: Path) -> None:
    kernel = imported.kernels[0]
    workload, records = remote_cache.local_entries(_pipeline(cache_dir, cache_dir.parent / "logs").cache,
                                                   [kernel])[kernel.key]
    lines = (cache_dir / WORKLOADS_FILE).read_text().splitlines()
    index = next(i for i, line in enumerate(lines) if json.loads(line) == workload)
    with open(cache_dir / RECORDS_FILE, "a") as file:
        file.write(json.dumps([index, planted(records[0], workload, marker)]) + "\n")


def _build(cache_dir: Path, imported, log_dir: Path, remote=None):
    pipeline = _pipeline(cache_dir, log_dir)
    pipeline.remote = remote
    return pipeline.tune_and_build(imported, ModelSettings(trials=0))


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


@pytest.fixture
def planted_cache(tuned, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the tuned cache with a planted record in its database, and the file its code creates."""
    _, imported, cache = tuned
    cache_dir = tmp_path / "cache" / "cpu-fp"
    shutil.copytree(cache.dir, cache_dir)
    marker = tmp_path / "the-planted-code-ran"
    _plant_locally(cache_dir, imported, marker)
    return cache_dir, marker


def test_a_planted_record_in_the_local_database_never_reaches_a_build(
        tuned, planted_cache, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cache_dir, marker = planted_cache
    with caplog.at_level(logging.WARNING, logger="mlci"):
        compiled = _build(cache_dir, tuned[1], tmp_path / "logs")
    assert compiled.executable is not None and compiled.library is not None
    assert not marker.exists()
    [warning] = [m for m in _warnings(caplog) if "pragma_import_llvm" in m]
    assert RECORDS_FILE in warning and "refused" in warning and "native code" in warning
    assert "pragma_import_llvm" not in (cache_dir / RECORDS_FILE).read_text()  # set aside, not kept


def test_without_the_check_the_planted_code_runs_when_the_library_loads(
        tuned, planted_cache, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The test above proves something only if the record really carries code that runs."""
    cache_dir, marker = planted_cache
    monkeypatch.setattr(trace_check, "refusal", lambda trace: None)
    _build(cache_dir, tuned[1], tmp_path / "logs")
    assert marker.exists()


def test_a_planted_record_in_an_s3_entry_is_skipped_naming_the_object(
        tuned, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _, imported, cache = tuned
    kernel = imported.kernels[0]
    workload, records = remote_cache.local_entries(cache, [kernel])[kernel.key]
    marker = tmp_path / "the-planted-code-ran"
    with moto_server() as s3:
        bucket = _bucket(s3)
        remote = _remote(s3, bucket)
        key = remote.put_entry("cpu-fp", kernel, 10**6, workload_line(kernel),
                               [planted(records[0], workload, marker), *records])
        with caplog.at_level(logging.WARNING, logger="mlci"):
            _build(tmp_path / "fresh" / "cpu-fp", imported, tmp_path / "logs", remote=_remote(s3, bucket))
    assert not marker.exists()
    [warning] = [m for m in _warnings(caplog) if key in m]
    assert "pragma_import_llvm" in warning
    fresh = (tmp_path / "fresh" / "cpu-fp" / RECORDS_FILE)
    assert not fresh.exists() or "pragma_import_llvm" not in fresh.read_text()


def test_the_records_metaschedule_writes_pass_the_check(tuned) -> None:
    _, _, cache = tuned
    lines = (cache.dir / RECORDS_FILE).read_text().splitlines()
    assert lines
    for line in lines:
        assert trace_check.refusal(json.loads(line)[1][0]) is None, line[:300]


_SPACES = """
import json, sys
import tvm
import tvm.s_tir.tensor_intrin
from tvm import te, topi
from tvm.s_tir import meta_schedule as ms
from mlci import trace_check
from mlci.tuning import _plain

def matmul_relu():
    a = te.placeholder((128, 256), "float32", name="a")
    b = te.placeholder((256, 64), "float32", name="b")
    k = te.reduce_axis((0, 256), name="k")
    c = te.compute((128, 64), lambda i, j: te.sum(a[i, k] * b[k, j], axis=k), name="c")
    return te.create_prim_func([a, b, te.compute((128, 64), lambda i, j: te.max(c[i, j], 0.0), name="d")])

def conv_relu():
    x = te.placeholder((1, 32, 28, 28), "float32", name="x")
    w = te.placeholder((64, 32, 3, 3), "float32", name="w")
    return te.create_prim_func([x, w, topi.nn.relu(topi.nn.conv2d_nchw(x, w, 1, 1, 1))])

found = {"instructions": 0, "refused": []}
for target, workload in ((json.loads(sys.argv[1]), conv_relu), (json.loads(sys.argv[2]), matmul_relu)):
    context = ms.TuneContext(mod=tvm.IRModule({"main": workload()}), target=tvm.target.Target(target),
                             space_generator="post-order-apply", task_name=workload.__name__)
    for sch in context.generate_design_space():
        for postproc in context.space_generator.postprocs:
            postproc.apply(sch)
        trace = _plain(sch.trace.as_json())
        found["instructions"] += len(trace[0])
        why = trace_check.refusal(trace)
        if why:
            found["refused"].append([target["kind"], workload.__name__, why])
print(json.dumps(found))
"""


CPU = {"kind": "llvm", "mcpu": "haswell", "num-cores": 2}
CUDA = {"kind": "cuda", "arch": "sm_80", "max_threads_per_block": 1024, "max_shared_memory_per_block": 49152,
        "thread_warp_size": 32}


def test_every_schedule_metaschedule_generates_for_cpu_and_gpu_passes_the_check() -> None:
    """Its design spaces for a convolution on the CPU and a matmul on the GPU (tensor cores
    included), postprocessed as a tuning candidate is; nothing is built, so no GPU is needed. In a
    fresh process: TVM registers its GPU tensor intrinsics at first import."""
    out = subprocess.run([sys.executable, "-c", _SPACES, json.dumps(CPU), json.dumps(CUDA)], capture_output=True,
                         text=True, timeout=300, check=True).stdout
    found = json.loads(out.strip().splitlines()[-1])
    assert found["instructions"] > 50 and found["refused"] == []


@pytest.mark.parametrize("instruction, why", [
    (["Annotate", ["l1", '"x"'], ["pragma_import_c"], []], "pragma_import_c"),
    (["Annotate", ["l1", '"x"'], ["some_new_pragma"], []], "some_new_pragma"),
    (["Annotate", ["l1", '"64"'], ["pragma_auto_unroll_max_step"], []], "not a number"),
    (["UnsafeSetDType", ["b0", '"x"'], ["float16"], []], "UnsafeSetDType"),
    (["Annotate\n::error::x", [], [], []], "\\n::error::x"),
])
def test_instructions_metaschedule_never_writes_are_refused_by_name(instruction: list, why: str) -> None:
    trace = [[["GetSBlock", [], ["b", "main"], ["b0"]], ["GetLoops", ["b0"], [], ["l1"]], instruction], []]
    refusal = trace_check.refusal(trace)
    assert refusal is not None and why in refusal and "\n" not in refusal


def test_a_layout_whose_index_map_calls_a_function_is_refused_and_plain_index_arithmetic_is_not() -> None:
    from tvm import s_tir, te

    a = te.placeholder((64, 64), "float32", name="a")
    sch = s_tir.Schedule(te.create_prim_func([a, te.compute((64, 64), lambda i, j: a[i, j] + 1.0, name="b")]))
    block = sch.get_sblock("b")
    sch.transform_layout(block, ("write", 0), lambda i, j: (j // 8, i, j % 8))
    trace = _plain(sch.trace.as_json())
    assert trace_check.refusal(trace) is None
    layout = next(inst for inst in trace[0] if inst[0] == "TransformLayout")
    index_map = json.loads(layout[1][1])
    index_map["nodes"].append({"type": "tirx.Call", "data": {}})  # e.g. call_extern("system", ...) in an index
    layout[1][1] = json.dumps(index_map)
    refusal = trace_check.refusal(trace)
    assert refusal is not None and "TransformLayout" in refusal and "tirx.Call" in refusal


class _Planted:
    """Unpickled, it creates a file: what a cost model's object array may carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_cost_model_whose_arrays_would_unpickle_into_a_call_is_never_unpickled(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import tarfile

    import numpy as np
    from tvm.s_tir import meta_schedule as ms

    from mlci.tuning import COST_MODEL_FILE, TuningCache

    marker = tmp_path / "the-planted-code-ran"
    planted_arrays = np.empty(1, dtype=object)
    planted_arrays[0] = ("group", [_Planted(marker)], np.zeros(1))
    np.save(tmp_path / "data.npy", planted_arrays, allow_pickle=True)
    with tarfile.open(tmp_path / "cost_model.tar", "w") as tar:  # TVM's own format
        tar.add(tmp_path / "data.npy", arcname="data.npy")

    cache = TuningCache(tmp_path / "cache")
    cache.cost_model_path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(tmp_path / "data.npy", cache.cost_model_path)  # the pickle under mlci's own name
    shutil.copy(tmp_path / "cost_model.tar", cache.cost_model_path.with_name("cost_model.tar"))  # and TVM's
    with caplog.at_level(logging.WARNING, logger="mlci"):
        model = cache.load_cost_model(cores=1, warmup=4)
    assert not marker.exists() and model.data_size == 0 and COST_MODEL_FILE in caplog.text

    # TVM's own loader unpickles it: the file above really carries a call.
    with pytest.raises(Exception):  # noqa: B017 - it fails after unpickling; that it ran is the point
        ms.cost_model.XGBModel().load(str(tmp_path / "cost_model.tar"))
    assert marker.exists()
