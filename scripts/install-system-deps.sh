#!/usr/bin/env bash
# System packages the tests and the demo use: Mosquitto (a real MQTT broker, started by the
# tests on a free port with their own config), espeak-ng (speech for the model corpus) and, on a
# Debian Python, the venv module the Makefile creates .venv with. Installs with apt-get when run as root.
set -euo pipefail
PYTHON=${PYTHON:-python3}
missing=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || missing+=(mosquitto)
# espeak-ng synthesizes the speech the real-model corpus scores a voice-activity model on (tests/zoo).
command -v espeak-ng >/dev/null 2>&1 || missing+=(espeak-ng)
# Debian splits venv/ensurepip out of python3 (python3.11-venv for 3.11).
"$PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1 ||
  missing+=("python$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')-venv")
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing ${missing[*]} with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # The Debian package starts a system broker on port 1883; the tests start their own.
  (systemctl disable --now mosquitto 2>/dev/null || service mosquitto stop 2>/dev/null || true) >/dev/null 2>&1
else
  echo "please install: ${missing[*]} (e.g. sudo apt-get install ${missing[*]})" >&2
  exit 1
fi
