#!/usr/bin/env bash
# Runs one mlci subcommand for action.yml. The inputs arrive as MLCI_* environment variables (never
# pasted into the script), so a branch or model name cannot inject shell code.
set -euo pipefail

if [ -n "${MLCI_TRACKING_URI:-}" ]; then
  export MLFLOW_TRACKING_URI="$MLCI_TRACKING_URI"
fi
if [ -z "${GITHUB_TOKEN:-}" ]; then
  unset GITHUB_TOKEN
fi
# Only a non-empty cache-url replaces what the runner or the config says.
if [ -n "${MLCI_INPUT_CACHE_URL:-}" ]; then
  export MLCI_CACHE_URL="$MLCI_INPUT_CACHE_URL"
fi

is_true() { [ "${1:-}" = "true" ]; }

case "${MLCI_COMMAND:-run}" in
  run)
    args=(run --config "$MLCI_CONFIG")
    if [ -n "${MLCI_TARGET:-}" ]; then args+=(--target "$MLCI_TARGET"); fi
    if [ -n "${MLCI_BASE:-}" ]; then args+=(--base "$MLCI_BASE"); fi
    if [ -n "${MLCI_TRIALS:-}" ]; then args+=(--trials "$MLCI_TRIALS"); fi
    if [ -n "${MLCI_TUNE_SECONDS:-}" ]; then args+=(--tune-seconds "$MLCI_TUNE_SECONDS"); fi
    if is_true "${MLCI_ALLOW_FAILURES:-}"; then args+=(--allow-failures); fi
    case "${MLCI_PROGRESSIVE:-auto}" in
      true) args+=(--progressive) ;;
      false) args+=(--no-progressive) ;;
    esac
    ;;
  compare)
    args=(compare --github)
    while IFS= read -r path; do
      if [ -n "$path" ]; then args+=("$path"); fi
    done <<< "${MLCI_RESULTS:-}"
    for target in ${MLCI_EXPECT_TARGETS:-}; do args+=(--expect-target "$target"); done
    if [ -n "${MLCI_FAIL_ON:-}" ]; then args+=(--fail-on "$MLCI_FAIL_ON"); fi
    if ! is_true "${MLCI_COMMENT:-true}"; then args+=(--no-comment); fi
    if is_true "${MLCI_REPORT_ONLY:-}"; then args+=(--report-only); fi
    ;;
  tune)
    if [ -z "${MLCI_SHARD:-}" ]; then
      echo "::error title=mlci::the tune command needs the shard input (K/N)"
      exit 2
    fi
    args=(tune --config "$MLCI_CONFIG" --shard "$MLCI_SHARD")
    if [ -n "${MLCI_TARGET:-}" ]; then args+=(--target "$MLCI_TARGET"); fi
    if [ -n "${MLCI_TRIALS:-}" ]; then args+=(--trials "$MLCI_TRIALS"); fi
    if [ -n "${MLCI_TUNE_SECONDS:-}" ]; then args+=(--tune-seconds "$MLCI_TUNE_SECONDS"); fi
    ;;
  sync)
    # The results files that have an MLflow payload waiting beside them (cpu.json.mlflow-pending).
    args=(sync)
    if [ -n "${MLCI_TRACKING_URI:-}" ]; then args+=(--tracking-uri "$MLCI_TRACKING_URI"); fi
    # Only the default branch's report job registers what its own bench jobs could not log.
    if is_true "${MLCI_REGISTER:-}"; then args+=(--register); fi
    pending=0
    while IFS= read -r path; do
      if [ -z "$path" ]; then continue; fi
      if [ -d "$path" ]; then
        while IFS= read -r -d '' payload; do
          args+=("${payload%.mlflow-pending}")
          pending=$((pending + 1))
        done < <(find "$path" -type f -name '*.json.mlflow-pending' -print0 | sort -z)
      else
        args+=("$path")
        pending=$((pending + 1))
      fi
    done <<< "${MLCI_RESULTS:-.mlci/results}"
    if [ "$pending" -eq 0 ]; then
      echo "mlci sync: no MLflow payload is waiting"
      exit 0
    fi
    ;;
  history)
    # The branch's trend report as one self-contained HTML file, for the workflow to upload.
    report=.mlci/history.html
    args=(history --config "$MLCI_CONFIG" --format html --output "$report")
    if [ -n "${MLCI_BRANCH:-}" ]; then args+=(--branch "$MLCI_BRANCH"); fi
    if [ -n "${MLCI_TRACKING_URI:-}" ]; then args+=(--tracking-uri "$MLCI_TRACKING_URI"); fi
    if [ -n "${GITHUB_OUTPUT:-}" ]; then echo "history-path=$report" >> "$GITHUB_OUTPUT"; fi
    ;;
  matrix)
    args=(matrix --config "$MLCI_CONFIG")
    if [ -n "${MLCI_SHARDS:-}" ] && [ "$MLCI_SHARDS" != "0" ]; then args+=(--shards "$MLCI_SHARDS"); fi
    if is_true "${MLCI_FORK_SELF_HOSTED:-}"; then args+=(--fork-self-hosted); fi
    if [ -n "${MLCI_JOB_MINUTES:-}" ]; then args+=(--job-minutes "$MLCI_JOB_MINUTES"); fi
    ;;
  runner-start)
    # MLCI_RUNNER_TOKEN (a GitHub App or fine-grained token allowed to register runners) and the AWS
    # credentials come from the calling step's env. `target` may name several targets, space-separated:
    # their machines start side by side, each under GITHUB_RUN_ID-GITHUB_RUN_ATTEMPT-TARGET.
    if [ -z "${MLCI_TARGET:-}" ]; then
      echo "::error title=mlci::the runner-start command needs the target input"
      exit 2
    fi
    args=(runner start --config "$MLCI_CONFIG")
    read -r -a targets <<< "$MLCI_TARGET"
    for t in "${targets[@]}"; do args+=(--target "$t"); done
    if [ -n "${MLCI_LAUNCH_ID:-}" ]; then args+=(--launch-id "$MLCI_LAUNCH_ID"); fi
    ;;
  runner-stop)
    if [ -z "${MLCI_TARGET:-}" ] || [ -z "${MLCI_LAUNCH_ID:-}" ]; then
      echo "::error title=mlci::the $MLCI_COMMAND command needs the target and launch-id inputs"
      exit 2
    fi
    # An interruption leaves a results file saying so, for the report job.
    args=(runner stop --config "$MLCI_CONFIG" --target "$MLCI_TARGET" --launch-id "$MLCI_LAUNCH_ID"
          --report .mlci/runner-stop.json --results-dir .mlci/results)
    ;;
  runner-reap)
    args=(runner reap --config "$MLCI_CONFIG")
    ;;
  init)
    args=(init)
    ;;
  doctor)
    args=(doctor)
    ;;
  *)
    echo "::error title=mlci::the command input must be run, compare, matrix, tune, sync, history, runner-start, runner-stop, runner-reap, init or doctor"
    exit 2
    ;;
esac

exec mlci "${args[@]}"
