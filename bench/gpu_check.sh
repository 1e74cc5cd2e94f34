#!/usr/bin/env bash
# Checks a GPU runner image end to end: `mlci doctor`, then `mlci run` of the bundled example on a
# CUDA target (the GPU's own architecture, a small tuning budget), then TVM's latency beside ONNX
# Runtime's on CUDA and the numerics, read from the results file.
#
# Usage: bench/gpu_check.sh [TRIALS]    (default 16 trials per model)
# Env:   MLCI (default: mlci), PYTHON (default: python3), KEEP=1 keeps the scratch directory.
# Exit:  0 all models ok and ONNX Runtime timed on CUDA; 1 no GPU visible or a step failed;
#        2 the run finished but a model failed or ONNX Runtime did not run on CUDA.
set -euo pipefail

trials="${1:-16}"
mlci="${MLCI:-mlci}"
python="${PYTHON:-python3}"
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "gpu_check: no NVIDIA GPU visible: nvidia-smi is not on PATH (is the driver mounted in this container?)" >&2
    exit 1
fi
if ! cap="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1)" || [ -z "$cap" ]; then
    echo "gpu_check: no NVIDIA GPU visible: nvidia-smi lists none" >&2
    exit 1
fi
cap="${cap//[[:space:]]/}"
arch="sm_${cap//./}"
gpu="$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -n 1)"
echo "gpu_check: ${gpu} (compute capability ${cap}: ${arch})"

work="$(mktemp -d)"
cleanup() {
    if [ "${KEEP:-0}" = 1 ]; then
        echo "gpu_check: kept ${work}"
    else
        rm -rf "$work"
    fi
}
trap cleanup EXIT

cp -R "$repo/examples" "$work/examples"
cat >>"$work/examples/mlci.toml" <<TOML

[targets.gpu]
tvm = { kind = "cuda", arch = "${arch}" }
TOML

echo "gpu_check: mlci doctor"
"$mlci" doctor

results="$work/gpu.json"
echo "gpu_check: mlci run --target gpu --trials ${trials}"
(cd "$work/examples" && "$mlci" run --config mlci.toml --target gpu --trials "$trials" --no-tracking \
    --allow-failures --output "$results")

"$python" - "$results" <<'PY'
import json
import sys

data = json.load(open(sys.argv[1]))
print(f"\ntarget {data['target']['name']}: {json.dumps(data['target'].get('tvm_target'))}")
print(f"{'model':<14} {'status':<16} {'TVM ms':>10} {'ORT ms':>10}  {'ORT provider':<22} {'max abs err':>11}  numerics")
bad = []
for m in data["models"]:
    lat = (m.get("latency_ms") or {}).get("median")
    peer = m.get("peer") or {}
    num = m.get("numerics") or {}
    ort = peer.get("onnxruntime_median_ms")
    err = num.get("max_abs_err")
    print(f"{m['name']:<14} {m['status']:<16} {lat if lat is not None else '-':>10.4} "
          f"{ort if ort is not None else 'n/a':>10.4}  {peer.get('provider') or '-':<22} "
          f"{err if err is not None else '-':>11.3}  {'passed' if num.get('passed') else 'FAILED' if num else '-'}")
    if m["status"] != "ok":
        bad.append(f"{m['name']}: {m['status']}: {m.get('error')}")
    if peer.get("provider") != "CUDAExecutionProvider":
        bad.append(f"{m['name']}: ONNX Runtime was not timed on CUDA: {peer.get('note') or peer.get('provider')}")
for line in bad:
    print(f"gpu_check: {line}", file=sys.stderr)
sys.exit(2 if bad else 0)
PY
