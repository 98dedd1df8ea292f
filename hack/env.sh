# Sourced by the hack/ scripts: where the cached venv and binaries live.
# shellcheck shell=bash
export BERTH_CACHE=${BERTH_CACHE:-$HOME/.cache/berth}
export K8S_VERSION=${K8S_VERSION:-v1.36.3}
export ETCD_VERSION=${ETCD_VERSION:-v3.6.16}
export KWOK_VERSION=${KWOK_VERSION:-v0.8.0}
export HELM_VERSION=${HELM_VERSION:-v3.22.0}
BERTH_VENV="$BERTH_CACHE/venv"
export PATH="$BERTH_VENV/bin:$BERTH_CACHE/bin/kubernetes-$K8S_VERSION:$BERTH_CACHE/bin/etcd-$ETCD_VERSION:$BERTH_CACHE/bin/kwok-$KWOK_VERSION:$BERTH_CACHE/bin/helm-$HELM_VERSION:$PATH"
