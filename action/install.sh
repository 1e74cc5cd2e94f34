#!/usr/bin/env bash
# Installs mlci for action.yml from the action's own checkout (the ref in `uses:`), so the action's
# scripts and the package can never disagree. `matrix` and `compare` need no TVM, MLflow or ONNX
# Runtime: they get mlci with its light dependencies only (seconds instead of a minute); `sync` adds
# MLflow and what it logs with (filelock, boto3 for S3 artifacts), still no TVM or ONNX Runtime.
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

# Installing needs no credential, and pip runs packages' build code: the calling step's env reaches every
# step of a composite action, so the tokens and keys it carries for mlci's own step are dropped here.
unset MLCI_RUNNER_TOKEN GITHUB_TOKEN MLFLOW_TRACKING_TOKEN MLFLOW_TRACKING_USERNAME MLFLOW_TRACKING_PASSWORD \
  AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY AWS_SESSION_TOKEN ACTIONS_ID_TOKEN_REQUEST_TOKEN ACTIONS_ID_TOKEN_REQUEST_URL

# `python -I`: the job's working directory is the repository's checkout (a pull request's code), and a plain
# `python -m pip` or `python -` would import a `pip/` or `tomllib.py` from it, with the job's tokens in its environment.
pip_install() { python -I -m pip install --disable-pip-version-check --quiet "$@"; }

case "${MLCI_COMMAND:-run}" in
  matrix | compare | sync | history | runner-start | runner-stop | runner-reap)
    # The pinned specs of mlci's light dependencies (and sync's, history's and the runners'), read from its own pyproject.toml.
    mapfile -t light < <(python -I - "$MLCI_ACTION_PATH/pyproject.toml" "${MLCI_COMMAND:-run}" <<'PY'
import re
import sys
import tomllib

with open(sys.argv[1], "rb") as f:
    dependencies = tomllib.load(f)["project"]["dependencies"]
wanted = {"typer", "rich", "jinja2", "numpy"}
if sys.argv[2] in ("sync", "history"):
    wanted |= {"mlflow", "filelock", "boto3"}
if sys.argv[2] == "history":
    wanted |= {"matplotlib"}
if sys.argv[2].startswith("runner-"):
    wanted |= {"boto3"}
for spec in dependencies:
    if re.split(r"[<>=!~;\[ ]", spec, maxsplit=1)[0].lower() in wanted:
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
