#!/usr/bin/env bash
# Installs mlci for action.yml from the action's own checkout (the ref in `uses:`), so the action's
# scripts and the package can never disagree. `matrix` and `compare` need no TVM, MLflow or ONNX
# Runtime: they get mlci with its light dependencies only (seconds instead of a minute).
set -euo pipefail

case "${MLCI_INSTALL:-action}" in
  skip)
    if ! command -v mlci >/dev/null; then
      echo "::error title=mlci::install is 'skip' but mlci is not on PATH"
      exit 2
    fi
    mlci --version
    exit 0
    ;;
  action) ;;
  *)
    echo "::error title=mlci::the install input must be 'action' or 'skip'"
    exit 2
    ;;
esac

pip_install() { python -m pip install --disable-pip-version-check --quiet "$@"; }

case "${MLCI_COMMAND:-run}" in
  matrix | compare)
    # The pinned specs of mlci's light dependencies, read from its own pyproject.toml.
    mapfile -t light < <(python - "$MLCI_ACTION_PATH/pyproject.toml" <<'PY'
import re
import sys
import tomllib

with open(sys.argv[1], "rb") as f:
    dependencies = tomllib.load(f)["project"]["dependencies"]
for spec in dependencies:
    if re.split(r"[<>=!~;\[ ]", spec, maxsplit=1)[0].lower() in {"typer", "rich", "jinja2", "numpy"}:
        print(spec)
PY
    )
    pip_install --no-deps "$MLCI_ACTION_PATH"
    pip_install "${light[@]}"
    ;;
  *)
    pip_install "$MLCI_ACTION_PATH"
    ;;
esac
mlci --version
