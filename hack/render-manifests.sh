#!/usr/bin/env bash
# Render the Helm chart with its default values into deploy/berth.yaml: the
# plain-kubectl install (docs/install.md). A test fails when the file is stale.
#   kubectl apply --server-side -f crds/
#   kubectl apply -f deploy/berth.yaml
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=hack/env.sh
source "$here/env.sh"
root=$(cd "$here/.." && pwd)
out=${1:-$root/deploy/berth.yaml}
namespace=berth-system
mkdir -p "$(dirname "$out")"
{
  cat <<HEADER
# Berth operator: rendered by hack/render-manifests.sh from charts/berth with
# its default values (release "berth", namespace $namespace). Do not edit.
# Install the CRDs first:  kubectl apply --server-side -f crds/
# then this file:          kubectl apply -f deploy/berth.yaml
---
apiVersion: v1
kind: Namespace
metadata:
  name: $namespace
  labels:
    app.kubernetes.io/part-of: berth
    # The operator pod meets the restricted Pod Security Standard.
    pod-security.kubernetes.io/enforce: restricted
HEADER
  helm template berth "$root/charts/berth" --namespace "$namespace" --skip-crds
} > "$out.tmp"
mv "$out.tmp" "$out"
echo "wrote $out" >&2
