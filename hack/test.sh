#!/usr/bin/env bash
# The whole test suite: lint, types, unit, property and integration tests.
# Integration tests start their own local control plane unless
# BERTH_KUBECONFIG points at an existing cluster (kind or any other).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
"$here/setup.sh"
# shellcheck source=hack/env.sh
source "$here/env.sh"
cd "$here/.."
echo "[test] ruff" >&2
ruff check .
ruff format --check .
echo "[test] mypy" >&2
mypy
echo "[test] pytest" >&2
exec pytest "$@"
