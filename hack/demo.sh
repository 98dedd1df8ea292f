#!/usr/bin/env bash
# The main job: a local test bed (or the cluster KUBECONFIG points at), the
# CRDs, the operator, the example deployment, and the per-node range map. On
# the test bed the example also runs on its real node, where an engine binds
# every port Berth delivers: `ss -ltn` shows the listeners where the map says.
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
  echo "[demo] starting a local test bed: ${NODES:-4} kwok GPU nodes, 1 real node"
  (cd "$root" && python -m testbed up --dir "$local_cluster" --nodes "${NODES:-4}" --real-nodes 1)
  export KUBECONFIG="$local_cluster/kubeconfig"
fi

operator_pid=""
cleanup() {
  [ -n "$operator_pid" ] && kill "$operator_pid" 2>/dev/null && wait "$operator_pid" 2>/dev/null
  [ -n "$local_cluster" ] && (cd "$root" && python -m testbed down --dir "$local_cluster")
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
real_node=""
if [ -n "$local_cluster" ]; then
  real_node=$(kubectl get nodes -l type=real -o jsonpath='{.items[0].metadata.name}')
  node_ip=$(kubectl get node "$real_node" -o jsonpath='{.status.addresses[?(@.type=="InternalIP")].address}')
  kubectl create namespace demo-real --dry-run=client -o yaml | kubectl apply -f - >/dev/null
  # The same deployment, its containers replaced by an engine that binds its ports.
  (cd "$root" && python -m testbed.workloads examples/vllm-disagg.yaml --node "$real_node") |
    kubectl apply -n demo-real -f -
fi

# wait_ports NAMESPACE [READY]: every pod of the example has its ports (and runs).
wait_ports() {
  echo "[demo] waiting for $want pods of $name in $1 to get their ports${2:+ and run}"
  for _ in $(seq 1 120); do
    got=$(kubectl get pods -n "$1" -l "berth.dev/deployment=$name" \
      -o jsonpath='{range .items[*]}{.metadata.annotations.berth\.dev/ports}{" "}{.status.containerStatuses[0].ready}{"\n"}{end}' |
      grep -c "^{.*${2:+ true$}" || true)
    [ "$got" -ge "$want" ] && return
    sleep 1
  done
}
wait_ports demo
kubectl get -n demo infd "$name"
echo
echo "== per-node range map (berth ranges) =="
berth ranges
if [ -n "$real_node" ]; then
  wait_ports demo-real ready
  echo
  echo "== real node $real_node ($node_ip): the example's blocks, and what listens there =="
  kubectl get pods -n demo-real -l "berth.dev/deployment=$name" \
    -o jsonpath='{range .items[*]}{.metadata.name}{"  "}{.metadata.annotations.berth\.dev/ports}{"\n"}{end}'
  echo "-- ss -ltn on $node_ip (the engines bind the node IP; pods use hostNetwork):"
  ss -ltn | awk -v ip="$node_ip" 'NR==1 || index($4, ip":")==1' | sort -t: -k2 -n
fi
echo
echo "== audit trail (operator log, JSON lines) =="
grep '"audit"' "$run/operator.log" | head -5
if [ -n "${KEEP:-}" ]; then
  echo "[demo] left running: export KUBECONFIG=$KUBECONFIG ; operator pid $operator_pid"
fi
