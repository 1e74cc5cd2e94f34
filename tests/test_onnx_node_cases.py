"""ONNX's own conformance cases (`onnx.backend.test.case.node`, expected outputs from ONNX's reference
implementation) through mlci's chain at 0 trials: the operators mlci converts itself compute what ONNX
specifies, outputs TVM's importer got wrong included, and what mlci refuses it refuses by name.

The whole suite is `bench/onnx_conformance.py`; this runs the cases each of mlci's own converters exists for.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mlci.targets import detect_host_target

from .avx2 import AVX2_MCPU

pytestmark = pytest.mark.slow

_BENCH = Path(__file__).resolve().parent.parent / "bench" / "onnx_conformance.py"


def _load_bench() -> Any:
    spec = importlib.util.spec_from_file_location("onnx_conformance", _BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


conformance = _load_bench()

# Case -> what was wrong before mlci converted the operator itself.
MATCHES = {
    "test_layer_normalization_4d_axis1": "Mean and InvStdDev came out in the input's shape",
    "test_layer_normalization_3d_axis_negative_1_epsilon": "Mean and InvStdDev came out in the input's shape",
    "test_dropout_default_mask": "the mask output broke import ('Expected nested to match tuple')",
    "test_training_dropout_zero_ratio_mask": "training mode with ratio 0 is the identity",
    "test_attention_3d_gqa": "opset-23 Attention did not import",
    "test_attention_3d_gqa_with_past_and_present": "present key and value outputs",
    "test_attention_4d_gqa_with_past_and_present_fp16": "float16 rounded at every step, 4 float16 steps off",
    "test_attention_4d_attn_mask_bool": "a boolean mask",
    "test_attention_4d_diff_heads_mask4d_padded_kv": "a float mask over padded keys",
    "test_attention_23_boolmask_fullymasked_row_nan_robustness": "a fully masked row gave NaN, ONNX says 0",
    "test_attention_4d_softcap_neginf_mask_expanded":
        "ReduceMax over a row of only -inf came out as the lowest finite float",
    "test_reduce_max_bool_inputs": "TVM cannot reduce booleans",
    "test_isinf_negative": "detect_positive=0 was ignored",
    "test_mod_mixed_sign_float32": "fmod=1 on floats",
    "test_mod_float32_mixed_sign_fmod_0": "fmod=0 on floats is numpy's mod (the divisor's sign)",
    "test_mod_mixed_sign_int32": "integer mod takes the divisor's sign",
    "test_sinh": "Sinh did not import",
    "test_pow_types_int32_int32": "an integer power came out as a float",
    "test_rms_normalization_4d_axis1": "RMSNormalization did not import",
    "test_batchnorm_example": "inference BatchNormalization",
    "test_convtranspose_output_shape": "output_shape was ignored (a 9x7 image for 10x8)",
    "test_nonmaxsuppression_iou_threshold_boundary": "a box at exactly the IoU threshold was suppressed",
    "test_spacetodepth_crd_mode_example": "mode CRD was ignored",
    "test_eyelike_with_dtype": "a dtype other than the input's was refused",
    "test_celu": "Celu had no converter",
    "test_celu_float16_expanded": "float16 Elu failed (float32 constants) and Constant value_float was refused",
    "test_resize_upsample_scales_nearest_axes_2_3": "Resize's axes were ignored",
    "test_resize_tf_crop_and_resize_axes_3_2": "Resize's axes (and the roi for them) were ignored",
    "test_resize_downsample_sizes_nearest_not_larger": "keep_aspect_ratio_policy was ignored",
    "test_mish": "ONNX Runtime writes Mish with Softplus, whose log(1 + e^x) was 0.26% off at x = -10",
    "test_cumsum_1d_exclusive": "a CumSum kernel broke weight pre-packing",
}

# Case -> (the operator, what the refusal says): nodes whose numbers TVM would get wrong.
REFUSED = {
    "test_training_dropout": ("Dropout", "training_mode"),
    "test_batchnorm_example_training_mode": ("BatchNormalization", "training_mode"),
    "test_roialign_mode_max": ("RoiAlign", "mode 'max'"),
    "test_resize_downsample_scales_linear": ("Resize", "fractional size"),
    "test_resize_downsample_sizes_linear_antialias": ("Resize", "antialias"),
    "test_top_k_uint64": ("TopK", "uint64"),
}


# Shifts by the width or more, or by a negative amount: undefined in LLVM, so the answer followed the CPU.
SHIFTS = ["test_bitshift_left_int8_shift_ge_width", "test_bitshift_right_int8_shift_ge_width",
          "test_bitshift_left_int8_negative_shift", "test_bitshift_right_int32_negative_shift"]


@pytest.fixture(scope="module")
def cases() -> dict[str, Any]:
    wanted = (set(MATCHES) | set(REFUSED) | set(SHIFTS)
              | {"test_nonmaxsuppression_suppress_by_IOU", "test_group_normalization_example"})
    found = {case.name: case for case in conformance.collect() if case.name in wanted}
    assert set(found) == wanted, f"cases missing from this onnx: {sorted(wanted - set(found))}"
    return found


@pytest.fixture(scope="module")
def host_target() -> dict[str, Any]:
    return {**detect_host_target(), "num-cores": 1}


@pytest.mark.parametrize("name", sorted(MATCHES))
def test_operators_mlci_converts_compute_what_onnx_specifies(
        name: str, cases: dict[str, Any], host_target: dict[str, Any], tmp_path: Path) -> None:
    case = cases[name]
    result = conformance.run_case(case, case.model.graph.node[0].op_type, tmp_path, host_target)
    assert result.cls == "pass", f"{name} ({MATCHES[name]}): {result.cls} at {result.stage}: {result.message}"


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_what_tvm_would_compute_wrong_is_refused_naming_the_operator_and_why(
        name: str, cases: dict[str, Any], host_target: dict[str, Any], tmp_path: Path) -> None:
    op, why = REFUSED[name]
    result = conformance.run_case(cases[name], op, tmp_path, host_target)
    assert result.cls == "unsupported", (result.cls, result.message)
    assert "refused by mlci" in result.message and f"{op} node" in result.message and why in result.message


def test_a_threshold_computed_at_run_time_is_refused_not_replaced_by_a_default(
        cases: dict[str, Any], host_target: dict[str, Any], tmp_path: Path) -> None:
    # The case feeds its thresholds as graph inputs; TVM's converter would silently use 0.5 and 0.
    result = conformance.run_case(cases["test_nonmaxsuppression_suppress_by_IOU"], "NonMaxSuppression", tmp_path,
                                  host_target, freeze=False)
    assert result.cls == "unsupported", (result.cls, result.message)
    assert "NonMaxSuppression node" in result.message and "computed at run time" in result.message


def test_an_import_failure_names_the_operator_and_node_even_when_the_model_left_it_unnamed(
        cases: dict[str, Any], host_target: dict[str, Any], tmp_path: Path) -> None:
    case = cases["test_group_normalization_example"]
    assert not any(node.name for node in case.model.graph.node)
    result = conformance.run_case(case, "GroupNormalization", tmp_path, host_target)
    if result.cls == "pass":
        pytest.skip("this TVM imports GroupNormalization with a computed shape now")
    assert result.cls == "error" and result.names_op, result.message
    assert re.search(r"[A-Z][A-Za-z]+ node '[A-Z][A-Za-z]+_\d+'", result.message), result.message


@pytest.mark.parametrize("cpu", ["host", AVX2_MCPU])
@pytest.mark.parametrize("name", SHIFTS)
def test_a_shift_out_of_range_gives_what_onnx_defines_on_every_cpu(
        name: str, cpu: str, cases: dict[str, Any], host_target: dict[str, Any], tmp_path: Path) -> None:
    target = host_target if cpu == "host" else {**host_target, "mcpu": cpu}
    result = conformance.run_case(cases[name], "BitShift", tmp_path, target)
    assert result.cls == "pass", f"{name} built for {cpu}: {result.cls}: {result.message}"


def test_the_comparison_fails_a_wrong_shape_a_wrong_value_and_a_missing_nan() -> None:
    expected = [np.array([1.0, np.nan, 3.0], np.float32)]
    assert conformance.compare([expected[0].copy()], expected, ["y"], 1e-3, 1e-5) is None
    assert "shape" in conformance.compare([np.zeros((1, 3), np.float32)], expected, ["y"], 1e-3, 1e-5)
    assert "dtype" in conformance.compare([expected[0].astype(np.float64)], expected, ["y"], 1e-3, 1e-5)
    assert conformance.compare([np.array([1.0, 0.0, 3.0], np.float32)], expected, ["y"], 1e-3, 1e-5)
    assert conformance.compare([np.array([1.0, np.nan, 3.01], np.float32)], expected, ["y"], 1e-3, 1e-5)
    ints = [np.array([1, 2], np.int32)]
    assert "1 of 2" in conformance.compare([np.array([1, 3], np.int32)], ints, ["y"], 1.0, 1.0)
