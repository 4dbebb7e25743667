#!/usr/bin/env bash
# `flwr run .` for this example, with what it needs here, and an exit code that means something:
# `flwr run` itself exits 0 as soon as the run is submitted, even when the ServerApp then fails.
#
#   ./run.sh                                   # the settings in pyproject.toml
#   ./run.sh --run-config "rounds=30 seed=1"   # extra `flwr run` options are passed through
#   KEEP_SUPERLINK=1 ./run.sh                  # leave the background SuperLink running afterwards
#
# Needs the repository installed in the active environment (`pip install -e ../..`). Exit status: 0 when
# the run finished as completed, 1 when it failed (its status line says why), 2 on a setup problem.
set -euo pipefail
cd "$(dirname "$0")"

export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 FLWR_TELEMETRY_ENABLED=0 RAY_USAGE_STATS_ENABLED=0
port="${FLWR_LOCAL_SUPERLINK_HTTP_API_PORT:-39091}"

superlink_pid() { lsof -t -iTCP:"$port" -sTCP:LISTEN 2>/dev/null | head -n 1 || true; }

# The variable above only takes effect when the SuperLink starts: one started earlier without it
# still runs `uv sync` for every run (its SuperExec then carries this flag).
if pgrep -af flower-superexec | grep -q -- --allow-runtime-dependency-installation; then
    echo "run.sh: a SuperLink started without FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 is running;" >&2
    echo "        stop it (kill $(superlink_pid)) and run again" >&2
    exit 2
fi
already_running="$(superlink_pid)"

num_supernodes="${NUM_SUPERNODES:-$(python -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["tool"]["flwr"]["app"]["config"]["num-clients"])')}"
submitted="$(flwr run . --federation-config "num-supernodes=$num_supernodes client-resources-num-cpus=1" --format json "$@")" || {
    echo "$submitted" >&2; exit 2; }
run_id="$(python -c 'import json, sys; print(json.loads(sys.argv[1])["run-id"])' "$submitted")"
echo "run $run_id submitted ($num_supernodes SuperNodes); streaming its log until it ends"

flwr log "$run_id" --stream || true
status="$(flwr ls --run-id "$run_id" --format json | python -c 'import json, sys; run = json.load(sys.stdin)["runs"][0]; print(run["status"], "-", run["status-details"])')"
echo "run $run_id: $status"

if [ -z "$already_running" ] && [ -z "${KEEP_SUPERLINK:-}" ] && pid="$(superlink_pid)" && [ -n "$pid" ]; then
    kill "$pid" && echo "stopped the background SuperLink this script started (pid $pid)"
fi
case "$status" in finished:completed*) exit 0 ;; *) exit 1 ;; esac
