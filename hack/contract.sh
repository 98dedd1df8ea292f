#!/usr/bin/env bash
# Engine contract suite: Berth's presets against the engines' released code.
# Wheels and extracted sources are cached under $BERTH_CACHE/engines.
#   hack/contract.sh                 run the suite (pytest tests/contract)
#   hack/contract.sh --write-table   rerun every case and rewrite docs/api.md's table
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=hack/env.sh
source "$here/env.sh"
cd "$here/.."
export PYTHONPATH="$PWD/operator:$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [[ "${1:-}" == "--write-table" ]]; then
  exec python -m tests.contract.matrix --write-table
fi
exec pytest tests/contract "$@"
