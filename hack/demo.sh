#!/usr/bin/env bash
# The main job: a local control plane (or the cluster KUBECONFIG points at),
# the CRDs, the operator, the example deployment, and the per-node range map.
#
#   hack/demo.sh            run it, print the map, tear the local cluster down
#   KEEP=1 hack/demo.sh     leave cluster and operator running to explore
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
"$here/setup.sh"
# shellcheck source=hack/env.sh
source "$here/env.sh"

run="$root/.run"
mkdir -p "$run"
local_cluster=""
if [ -n "${KUBECONFIG:-}" ] && kubectl version --request-timeout=5s >/dev/null 2>&1; then
  echo "[demo] using the cluster KUBECONFIG points at: $(kubectl config current-context)"
else
  local_cluster="$run/cluster"
  echo "[demo] starting a local control plane with ${NODES:-4} kwok GPU nodes"
  python "$here/localcluster.py" up --dir "$local_cluster" --nodes "${NODES:-4}"
  export KUBECONFIG="$local_cluster/kubeconfig"
fi

operator_pid=""
cleanup() {
  [ -n "$operator_pid" ] && kill "$operator_pid" 2>/dev/null && wait "$operator_pid" 2>/dev/null
  [ -n "$local_cluster" ] && python "$here/localcluster.py" down --dir "$local_cluster"
}
if [ -z "${KEEP:-}" ]; then trap cleanup EXIT; fi

kubectl apply --server-side -f "$root/crds/" >/dev/null
kubectl wait --for=condition=Established crd --all --timeout=30s >/dev/null
kubectl create namespace berth-system --dry-run=client -o yaml | kubectl apply -f - >/dev/null
kubectl create namespace demo --dry-run=client -o yaml | kubectl apply -f - >/dev/null

echo "[demo] starting the operator (log: $run/operator.log)"
python -m berth >"$run/operator.log" 2>&1 &
operator_pid=$!

kubectl apply -f "$root/examples/pool-gpu.yaml"
kubectl apply -n demo -f "$root/examples/vllm-disagg.yaml"
name=$(kubectl get -n demo -f "$root/examples/vllm-disagg.yaml" -o jsonpath='{.metadata.name}')
want=$(kubectl get -n demo infd "$name" -o jsonpath='{range .spec.roles[*]}{.replicas}{" "}{end}' |
  awk '{s=0; for (i=1;i<=NF;i++) s+=$i; print s}')
echo "[demo] waiting for $want pods of $name to get their ports"
for _ in $(seq 1 120); do
  got=$(kubectl get pods -n demo -l "berth.dev/deployment=$name" \
    -o jsonpath='{range .items[*]}{.metadata.annotations.berth\.dev/ports}{"\n"}{end}' | grep -c . || true)
  [ "$got" -ge "$want" ] && break
  sleep 1
done
kubectl get -n demo infd "$name"
echo
echo "== per-node range map (berth ranges) =="
berth ranges
echo
echo "== audit trail (operator log, JSON lines) =="
grep '"audit"' "$run/operator.log" | head -5
if [ -n "${KEEP:-}" ]; then
  echo "[demo] left running: export KUBECONFIG=$KUBECONFIG ; operator pid $operator_pid"
fi
