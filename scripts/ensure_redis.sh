#!/usr/bin/env bash
# Installs Debian's redis-server and redis-tools when they are missing.
set -euo pipefail
if command -v redis-server >/dev/null && command -v redis-cli >/dev/null; then
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "bagpipe: redis-server and redis-cli are missing; install them as root:" >&2
  echo "  apt-get update && apt-get install -y redis-server redis-tools" >&2
  exit 1
fi
echo "bagpipe: installing redis-server and redis-tools from Debian's packages" >&2
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server redis-tools >/dev/null
