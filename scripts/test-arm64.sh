#!/usr/bin/env bash
# Proof on aarch64: run the runtime + sync + align (+ daemon) test subset inside an arm64
# Debian bookworm rootfs under qemu-user emulation, with the aarch64 wheels from PyPI.
#
#   sudo scripts/test-arm64.sh            # all phases (host setup, rootfs, venv, tests)
#   sudo scripts/test-arm64.sh tests      # re-run only the tests in an existing rootfs
#
# Needs root (debootstrap, chroot, binfmt_misc). The rootfs is cached in $ROOTFS (~330 MB,
# ~6 min to build); emulated Python is ~15x slower than native, so timeouts are generous.
set -euo pipefail

ROOTFS=${ROOTFS:-/var/tmp/edge-sdk-arm64-rootfs}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
REPO=$(cd "$(dirname "$0")/.." && pwd)
PHASE=${1:-all}
# Deployment-file lint (hadolint, systemd unit text) is not architecture-dependent: host only.
TESTS=${ARM64_TESTS:-"tests/runtime tests/edge_sdk tests/daemon --ignore=tests/daemon/test_deploy_files.py"}
# onnxruntime >= 1.28 (1.28.0, 1.31.1, 1.32.0 tried) dies with SIGSEGV at import under qemu-user 7.2
# (Debian bookworm's qemu-user-static), before any model is loaded: an emulator limitation, not a
# device one. 1.26.0 is the newest release verified to work under emulation; real arm64 boards
# run the current wheels.
ORT_UNDER_QEMU=${ORT_UNDER_QEMU:-onnxruntime==1.26.0}
# edge-sdk is pure Python: its wheel is built natively on the host (fast, py3-none-any) and
# installed in the rootfs like a device would install it.
HOST_PYTHON=${HOST_PYTHON:-$REPO/.venv/bin/python}
PYTEST_TIMEOUT=${PYTEST_TIMEOUT:-3600}

log() { printf '[test-arm64 %s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }

[ "$(id -u)" -eq 0 ] || { echo "run as root (debootstrap, chroot and binfmt_misc need it)" >&2; exit 1; }

host_setup() {
  local need=()
  command -v debootstrap >/dev/null || need+=(debootstrap)
  [ -x /usr/bin/qemu-aarch64-static ] || need+=(qemu-user-static)
  command -v update-binfmts >/dev/null || need+=(binfmt-support)
  if [ ${#need[@]} -gt 0 ]; then
    log "installing ${need[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  fi
  mountpoint -q /proc/sys/fs/binfmt_misc || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
  update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || true
  [ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || { echo "binfmt_misc has no qemu-aarch64 entry" >&2; exit 1; }
}

make_rootfs() {
  if [ -x "$ROOTFS/usr/bin/python3" ]; then log "rootfs exists: $ROOTFS"; return; fi
  log "debootstrap arm64 bookworm into $ROOTFS"
  rm -rf "$ROOTFS"
  debootstrap --arch=arm64 --variant=minbase \
    --include=python3,python3-venv,python3-pip,ca-certificates,mosquitto \
    bookworm "$ROOTFS" "$MIRROR"
}

mounts() {
  for d in proc sys dev; do mountpoint -q "$ROOTFS/$d" || mount --bind "/$d" "$ROOTFS/$d"; done
  mkdir -p "$ROOTFS/src"
  # The host's pip settings (index mirrors, CA bundle) so pip inside works like outside.
  cp /etc/ssl/certs/ca-certificates.crt "$ROOTFS/etc/host-ca.crt"
  cp /etc/resolv.conf "$ROOTFS/etc/resolv.conf" 2>/dev/null || true
}

umounts() {
  for d in dev sys proc; do mountpoint -q "$ROOTFS/$d" && umount -l "$ROOTFS/$d" || true; done
}

in_chroot() { chroot "$ROOTFS" /usr/bin/env -i HOME=/root PATH=/usr/bin:/bin:/usr/sbin:/sbin \
  PIP_CERT=/etc/host-ca.crt PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_DEFAULT_TIMEOUT=300 "$@"; }

sync_source() {
  # Only what the tests need; no venvs, caches or build output, and not the package sources: the
  # tests (and the `python -m edge_sdk` subprocesses they start in /src) must import the
  # installed wheel, as on a device, never a source folder that happens to be in the cwd.
  tar -C "$REPO" --exclude=.venv --exclude=.git --exclude='*.egg-info' --exclude=build --exclude=dist \
      --exclude=__pycache__ --exclude=demo-out --exclude=./edge_sdk --exclude=./converters \
      --exclude=./runtime --exclude=./device_profiles -cf - . | (rm -rf "$ROOTFS/src" && mkdir -p "$ROOTFS/src" && tar -C "$ROOTFS/src" -xf -)
}

build_wheel() {
  rm -rf "$ROOTFS/tmp/wheels" && mkdir -p "$ROOTFS/tmp/wheels"
  "$HOST_PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w "$ROOTFS/tmp/wheels" "$REPO" >/dev/null
  WHEEL=/tmp/wheels/$(basename "$(ls "$ROOTFS"/tmp/wheels/edge_sdk-*.whl)")
}

make_venv() {
  sync_source
  build_wheel
  if [ ! -x "$ROOTFS/opt/venv/bin/python" ]; then
    log "creating venv inside the rootfs"
    in_chroot python3 -m venv /opt/venv
  fi
  log "pip install (aarch64 wheels: numpy, onnxruntime, psutil, ...)"
  # No editable install: the tests import the installed package like a device would.
  # sympy: onnxruntime 1.26's quantization tools import it on load, and the test fixtures build
  # their releases with the converter.
  in_chroot /opt/venv/bin/pip install -q --prefer-binary "$WHEEL[daemon,align]" "$ORT_UNDER_QEMU" sympy pytest hypothesis httpx
}

run_tests() {
  sync_source
  # The tests import the installed package: reinstall it from the current source (no deps).
  build_wheel
  in_chroot /opt/venv/bin/pip install -q --no-deps --force-reinstall "$WHEEL"
  log "arch inside: $(in_chroot uname -m); python: $(in_chroot /opt/venv/bin/python -c 'import platform; print(platform.machine(), platform.python_version())')"
  log "pytest $TESTS"
  in_chroot /usr/bin/timeout "$PYTEST_TIMEOUT" /bin/sh -c \
    "cd /src && /opt/venv/bin/pytest -q -p no:cacheprovider -m 'not slow and not toolchain' --durations=15 $TESTS"
}

trap umounts EXIT
case "$PHASE" in
  all) host_setup; make_rootfs; mounts; make_venv; run_tests ;;
  setup) host_setup; make_rootfs ;;
  venv) host_setup; mounts; make_venv ;;
  tests) host_setup; mounts; run_tests ;;
  *) echo "usage: $0 [all|setup|venv|tests]" >&2; exit 2 ;;
esac
log "done"
