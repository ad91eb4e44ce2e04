#!/usr/bin/env bash
# Device run of bench/device/kv_accuracy.py (see docs/benchmarks.md for what it measures).
#   bench/device/kv_accuracy.sh /path/to/llama-server [extra args for kv_accuracy.py]
# Carry `.whl` with the wheels listed in bench/device/kv_accuracy-wheels.txt.
set -euo pipefail
server=${1:?usage: kv_accuracy.sh LLAMA_SERVER [args]}
shift
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
export PYTHONPATH="$PWD/src:/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 bench/device/kv_accuracy.py --llama-server "$server" --out "${OUT:-.}" "$@" \
    2>&1 | tee "${OUT:-.}/kv_accuracy.log"
