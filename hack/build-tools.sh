#!/usr/bin/env bash
# Build the local control plane's binaries from Go modules, pinned, cached
# outside the repo. A second run with a warm cache builds nothing.
set -euo pipefail

# shellcheck source=hack/env.sh
source "$(dirname "$0")/env.sh"
CACHE=$BERTH_CACHE

BIN="$CACHE/bin"
export CGO_ENABLED=0 GOFLAGS=-buildvcs=false

log() { printf '[build-tools] %s\n' "$*" >&2; }

# Every module needs Go >= 1.26 (their go.mod lines); this machine's go.env
# may pin GOTOOLCHAIN=local, so an older go would just fail later.
command -v go >/dev/null || { log "go not found: Go >= 1.26 is required"; exit 1; }
gov=$(go env GOVERSION); gov=${gov#go}
if [ "$(printf '%s\n1.26\n' "$gov" | sort -V | head -1)" != "1.26" ]; then
  log "go $gov is too old: Go >= 1.26 is required"; exit 1
fi

# One build at a time per cache (CI and a developer may share a machine);
# whoever waits finds the binaries cached afterwards.
mkdir -p "$BIN"
exec 9>"$BIN/.build.lock"
if ! flock -n 9; then
  log "another build-tools.sh is running; waiting for it"
  flock 9
fi

# wrapper_module DIR NAME: a throwaway module to build other modules' mains.
wrapper_module() {
  mkdir -p "$1"
  [ -f "$1/go.mod" ] || (cd "$1" && go mod init "$2" >/dev/null 2>&1)
}

build_kubernetes() {
  local out="$BIN/kubernetes-$K8S_VERSION"
  local tools=(kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet)
  local missing=0
  for t in "${tools[@]}"; do [ -x "$out/$t" ] || missing=1; done
  [ "$missing" = 0 ] && { log "kubernetes $K8S_VERSION cached"; return; }
  log "building kubernetes $K8S_VERSION (cold: 15-30 min on 2 cores)"
  local src="$CACHE/src/kubernetes-$K8S_VERSION"
  wrapper_module "$src" berth.dev/build/kubernetes
  cd "$src"
  # k8s.io/kubernetes requires its staging modules at v0.0.0: map each to
  # the matching published v0.X.Y, deriving the list from its own go.mod.
  local gomod staging
  gomod=$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')
  staging=$(awk '$1 ~ /^k8s\.io\// && $2 == "v0.0.0" {print $1}' "$gomod" | sort -u)
  local minor=${K8S_VERSION#v1.}
  for m in $staging; do
    go mod edit -replace "$m=$m@v0.$minor"
  done
  # Resolve every main we build, so go.sum covers all their imports.
  go get "k8s.io/kubernetes@$K8S_VERSION" \
    $(printf "k8s.io/kubernetes/cmd/%s@$K8S_VERSION " "${tools[@]}") >/dev/null
  local major=1 kminor=${minor%%.*} ld=""
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld+=" -X $p.gitVersion=$K8S_VERSION -X $p.gitMajor=$major -X $p.gitMinor=$kminor -X $p.gitTreeState=clean"
  done
  mkdir -p "$out.tmp"
  go build -trimpath -tags=selinux,notest,grpcnotrace -ldflags "-s -w $ld" -o "$out.tmp/" \
    $(printf 'k8s.io/kubernetes/cmd/%s ' "${tools[@]}")
  rm -rf "$out" && mv "$out.tmp" "$out"
}

build_etcd() {
  local out="$BIN/etcd-$ETCD_VERSION"
  [ -x "$out/etcd" ] && { log "etcd $ETCD_VERSION cached"; return; }
  log "building etcd $ETCD_VERSION"
  local src="$CACHE/src/etcd-$ETCD_VERSION"
  wrapper_module "$src" berth.dev/build/etcd
  cd "$src"
  go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION" >/dev/null
  mkdir -p "$out"
  go build -trimpath -ldflags "-s -w" -o "$out/etcd" go.etcd.io/etcd/server/v3
}

build_kwok() {
  local out="$BIN/kwok-$KWOK_VERSION"
  if [ -x "$out/kwok" ] && [ -f "$out/stage/pod-ready.yaml" ]; then
    log "kwok $KWOK_VERSION cached"; return
  fi
  log "building kwok $KWOK_VERSION"
  mkdir -p "$out"
  [ -x "$out/kwok" ] ||
    GOBIN="$out" go install -trimpath -ldflags "-s -w" "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION"
  # The Stage documents ship in the module, not in the binary.
  local mod
  mod=$(go env GOMODCACHE)/sigs.k8s.io/kwok@$KWOK_VERSION
  mkdir -p "$out/stage"
  # Fast node start-up, node leases, and pods that reach Running at once,
  # complete when their containers would, and vanish when deleted.
  cp "$mod"/kustomize/stage/node/fast/node-initialize.yaml \
     "$mod"/kustomize/stage/node/heartbeat-with-lease/node-heartbeat-with-lease.yaml \
     "$mod"/kustomize/stage/pod/fast/pod-*.yaml "$out/stage/"
  chmod -R u+w,go-w "$out/stage"
}

build_helm() {
  local out="$BIN/helm-$HELM_VERSION"
  [ -x "$out/helm" ] && { log "helm $HELM_VERSION cached"; return; }
  log "building helm $HELM_VERSION"
  local kminor=${K8S_VERSION#v1.}; kminor=${kminor%%.*}
  mkdir -p "$out"
  GOBIN="$out" go install -trimpath -ldflags "-s -w \
    -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION \
    -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 \
    -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$kminor" \
    "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
}

start=$(date +%s)
build_etcd
build_kwok
build_helm
build_kubernetes
log "done in $(( $(date +%s) - start ))s; binaries under $BIN"
