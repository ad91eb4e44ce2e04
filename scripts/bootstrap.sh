#!/usr/bin/env bash
# Set up everything kiban's commands and tests need on a fresh Debian machine:
# the Debian packages listed in scripts/debian-packages.txt (only those missing),
# and a virtual environment .venv with kiban and its pinned test dependencies.
# Idempotent: a second run installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
while read -r pkg; do
  [[ -z "$pkg" || "$pkg" == \#* ]] && continue
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done < scripts/debian-packages.txt
if ((${#missing[@]})); then
  echo "bootstrap: installing Debian packages: ${missing[*]}"
  sudo=""; [[ $(id -u) -eq 0 ]] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Reinstalled when what pip builds changes: the metadata, or the C kernel of cache_aware
# (setup.py compiles it in place; an edit to the .pyx needs a rebuild).
stamp=.venv/.kiban-installed
rebuild=false
for source in pyproject.toml setup.py src/kiban/gateway/_prefix_scan.pyx; do
  if [[ $source -nt $stamp ]]; then rebuild=true; fi
done
if [[ ! -f $stamp ]] || $rebuild; then
  echo "bootstrap: installing kiban into .venv"
  python3 -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[test]'
  touch "$stamp"
fi
