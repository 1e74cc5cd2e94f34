"""Targets whose hardware a runner lacks, and runs whose machine went away: what the gate and the
comment say about them. A target compiled without its hardware is a portability check (compile, and
for Arm numerics under emulation), never a speed claim; an interrupted run is never a model's fault."""

from __future__ import annotations

import dataclasses

from mlci.gate import decide
from mlci.report import ReportContext, render_comment
from mlci.results import Execution, NumericsInfo, Results, Status, Verdict
from tests.test_report import model, results

ARM_NOTE = "no aarch64 CPU on this x86_64 runner: cross-compiled; numerics under qemu-aarch64, not timed"


def arm(*models, execution: Execution = Execution.EMULATED, note: str | None = ARM_NOTE) -> Results:
    res = results("arm", list(models))
    res.target = dataclasses.replace(res.target, execution=execution, execution_note=note)
    return res


def compiled(name: str, **kw) -> object:
    """A model built for a target whose hardware was not there: no latency, no A/B samples."""
    return model(name, base=None, head=None, base_status="none", **kw)


EMULATED_OK = NumericsInfo(1e-6, 1e-6, 1e-4, 1e-3, True, input_sets=2, emulated=True)


def test_a_model_compiled_without_its_hardware_is_compiled_not_new_and_never_blocks() -> None:
    decision = decide([arm(compiled("mlp", numerics=EMULATED_OK))])
    [cell] = decision.cells
    assert cell.verdict == Verdict.COMPILED and not cell.blocking and not decision.failed
    assert cell.reason == f"compiled; numerics right under emulation, not timed: this runner lacks the target's hardware ({ARM_NOTE})"
    assert decision.headline == "arm compiled only, not timed"


def test_compile_only_says_nothing_about_numerics() -> None:
    [cell] = decide([arm(compiled("mlp"), execution=Execution.COMPILE_ONLY,
                         note="no cuda device on this runner: compiled, not run")]).cells
    assert cell.reason.startswith("compiled, not timed: ") and "numerics" not in cell.reason


def test_a_model_that_stops_compiling_for_a_target_without_its_hardware_fails_the_build() -> None:
    decision = decide([arm(compiled("mlp", status="compile_failed", error="TVM build failed: no aarch64 lowering"))])
    [cell] = decision.cells
    assert cell.verdict == Verdict.FAILED and cell.blocking and decision.failed


def test_wrong_numbers_under_emulation_fail_the_build() -> None:
    wrong = NumericsInfo(2.1e9, 1.0, 1e-4, 1e-3, False, input_sets=2, emulated=True)
    decision = decide([arm(compiled("casts", status="numerics_failed", error="y: max abs err 2.1e+09", numerics=wrong))])
    assert decision.cells[0].verdict == Verdict.FAILED and decision.failed


def test_an_interrupted_target_is_neither_a_regression_nor_a_failure_and_the_comment_says_so() -> None:
    gpu = results("gpu", [model("mlp", base=None, head=None, base_status="none", status=Status.INTERRUPTED)])
    gpu.interrupted = "the spot instance i-0abc was reclaimed by EC2 (Server.SpotInstanceTermination)"
    cpu = results("cpu", [model("mlp", base=1.0, head=1.0)])
    decision = decide([cpu, gpu])
    interrupted = next(c for c in decision.cells if c.target == "gpu")
    assert interrupted.verdict == Verdict.INTERRUPTED and not interrupted.blocking and not decision.failed
    assert "Server.SpotInstanceTermination" in interrupted.reason and "rerun" in interrupted.reason
    assert "gpu interrupted: not measured" in decision.headline
    comment = render_comment(decision, ReportContext(repository="acme/vision"))
    assert "| mlp | gpu | — | — | — | — | interrupted |" in comment
    assert "**mlp** on gpu, interrupted: not measured: the spot instance i-0abc was reclaimed" in comment


def test_the_run_table_says_what_a_runner_without_the_hardware_did() -> None:
    from rich.console import Console

    from mlci.console import results_table

    res = arm(compiled("mlp", numerics=EMULATED_OK))
    console = Console(width=200, record=True)
    console.print(results_table(res))
    text = " ".join(console.export_text().split())  # the caption wraps at the table's width
    assert "ok, emulated" in text and ARM_NOTE in text
    gpu = arm(compiled("mlp"), execution=Execution.COMPILE_ONLY, note="no cuda device on this runner: compiled, not run")
    console = Console(width=200, record=True)
    console.print(results_table(gpu))
    text = " ".join(console.export_text().split())
    assert "│ compiled │" in text and "no cuda device on this runner: compiled, not run" in text


def test_doctor_says_whether_arm_targets_can_be_checked_here(monkeypatch, tmp_path) -> None:
    import shutil

    from mlci import emulation
    from mlci.commands.doctor import arm_emulation_check

    if not emulation.is_foreign({"kind": "llvm", "mtriple": "aarch64-linux-gnu"}):
        assert arm_emulation_check().value == "native (this CPU is aarch64)"
        return
    gcc = shutil.which("aarch64-linux-gnu-gcc")
    if gcc is not None:  # the cross compiler alone on PATH: no qemu, named with its package
        (tmp_path / "aarch64-linux-gnu-gcc").symlink_to(gcc)
    monkeypatch.setenv("PATH", str(tmp_path))
    check = arm_emulation_check()
    assert check.value.startswith("not checkable here: ")
    assert ("qemu-user" if gcc else "gcc-aarch64-linux-gnu") in check.value
