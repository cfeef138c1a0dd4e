#!/usr/bin/env bash
# kdumpling setup, demo and test runner for Debian 12 (run as root).
#
#   ./setup.sh          install everything, then snapshot a live demo process (the main job)
#   ./setup.sh test     install everything, then run the whole test suite
#   ./setup.sh install  install only
#
# Idempotent: apt packages and the virtualenv (.venv) are reused when present.
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$PWD
VENV=${KDUMPLING_VENV:-$ROOT/.venv}
export DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1

log() { printf '[setup] %s\n' "$*" >&2; }

# Readers used as test oracles, the QEMU/libvirt guest rig, build deps of the codec wheels.
APT_PACKAGES=(
  python3 python3-venv python3-dev gcc make pkg-config
  gdb elfutils binutils file
  crash makedumpfile python3-libkdumpfile
  liblzo2-dev libsnappy-dev libzstd-dev
  qemu-system-x86 qemu-utils busybox-static cpio xz-utils zstd kmod
  libvirt-dev libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients libvirt-daemon-system
  python3-libvirt systemd util-linux procps
  systemd-container  # systemd-nspawn: the systemd test tier boots a throw-away container
)

install_apt() {
  local missing=()
  for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if ((${#missing[@]})); then
    log "apt-get install ${missing[*]}"
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

install_venv() {
  if [[ ! -x $VENV/bin/python ]]; then
    log "creating $VENV"
    python3 -m venv "$VENV"
  fi
  log "pip install -e .[all,libvirt,test]"
  local pip_log=$VENV/pip-install.log
  if ! "$VENV/bin/pip" install -e ".[all,libvirt,test]" >"$pip_log" 2>&1; then
    tail -30 "$pip_log" >&2
    log "pip install failed; full log in $pip_log"
    exit 1
  fi
}

demo() {
  # The main job: snapshot a live process into an ELF core that gdb opens; the process keeps
  # running. The demo target is a small Python program we start here.
  local out=${KDUMPLING_DEMO_DIR:-/var/lib/kdumpling/demo}
  mkdir -p -m 0700 "$out"
  "$VENV/bin/python" -c 'import time
while True: time.sleep(1)' </dev/null >/dev/null 2>&1 &
  DEMO_PID=$!
  trap 'kill "$DEMO_PID" 2>/dev/null || true' EXIT
  sleep 0.5
  "$VENV/bin/kdumpling-agent" capture process "$DEMO_PID" -o "$out"
  echo "Process $DEMO_PID kept running (state $(ps -o stat= -p "$DEMO_PID")); it is stopped now."
}

case ${1:-demo} in
  install) install_apt; install_venv ;;
  test)
    install_apt; install_venv
    shift
    # Every tier must run: a missing tool fails instead of skipping.
    export KDUMPLING_REQUIRE_ALL=${KDUMPLING_REQUIRE_ALL:-1}
    # Also the crash-with-vmlinux guest test: fetches the kernel's -dbg package once (858 MB,
    # cached in $KDUMPLING_TEST_CACHE). KDUMPLING_TEST_DEBUGINFO=0 leaves it out.
    export KDUMPLING_TEST_DEBUGINFO=${KDUMPLING_TEST_DEBUGINFO:-1}
    exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@" tests
    ;;
  demo) install_apt; install_venv; demo ;;
  *) echo "usage: $0 [install|test|demo]" >&2; exit 2 ;;
esac
