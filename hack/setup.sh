#!/usr/bin/env bash
# Install everything Berth's demo and tests need on a fresh machine:
# a Python venv with the project and its test/dev extras, and the control
# plane binaries built from Go modules. Idempotent and cached.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=hack/env.sh
source "$here/env.sh"

# Debian packages, only if something is missing (a fresh machine of this
# kind has them all). Go >= 1.26 is not among them: Debian's is older, so
# build-tools.sh checks for it and says so.
missing=()
python3 -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
command -v flock >/dev/null || missing+=(util-linux)
# ip netns: the node agent's kernel-reservation test (tests/integration/test_node_agent.py).
command -v ip >/dev/null || missing+=(iproute2)
[ -e /etc/ssl/certs/ca-certificates.crt ] || missing+=(ca-certificates)
# The test bed's real node (testbed/realnode.py) and its images (testbed/images.py).
command -v containerd >/dev/null || missing+=(containerd)
command -v runc >/dev/null || missing+=(runc)
[ -x /usr/lib/cni/bridge ] || missing+=(containernetworking-plugins)
command -v ip >/dev/null || missing+=(iproute2)
# A static busybox: the engine image has no libc (ldd fails on static binaries).
{ [ -x /bin/busybox ] && ! ldd /bin/busybox >/dev/null 2>&1; } || missing+=(busybox-static)
command -v gcc >/dev/null || missing+=(gcc)
[ -e /usr/lib/x86_64-linux-gnu/libc.a ] || missing+=(libc6-dev)
if [ ${#missing[@]} -gt 0 ]; then
  echo "[setup] apt-get install ${missing[*]}" >&2
  sudo=""
  [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

stamp="$BERTH_VENV/.berth-stamp"
want=$(sha256sum "$here/../pyproject.toml" | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] python venv in $BERTH_VENV" >&2
  python3 -m venv "$BERTH_VENV"
  "$BERTH_VENV/bin/pip" install -q --upgrade pip
  "$BERTH_VENV/bin/pip" install -q -e "$here/..[test,dev]"
  echo "$want" > "$stamp"
fi
# The editable install points at this checkout; re-point it when run from
# another clone sharing the cache.
if ! "$BERTH_VENV/bin/python" -c 'import berth, sys; sys.exit(not berth.__file__.startswith(sys.argv[1]))' "$(cd "$here/.." && pwd)" 2>/dev/null; then
  "$BERTH_VENV/bin/pip" install -q --no-deps -e "$here/.."
fi
"$here/build-tools.sh"
