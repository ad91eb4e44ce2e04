#!/usr/bin/env bash
# vLLM 0.26.0 and lmdeploy 0.18.0 (PyTorch engine) under `kiban up` on one H200, from wheels
# carried over several calls (issue 21). Every call of the session may start with `stash`:
#
#   bench/device/engines_gpu.sh stash      # copy what this call carried (.whl, .whl-vllm,
#                                          # .whl-lmdeploy) to /tmp/kiban-carry; seconds
#   bench/device/engines_gpu.sh install    # join the split vLLM wheel, check it, install
#                                          # everything into /tmp/site-engines, import-check
#                                          # vLLM and lmdeploy, write the random model (HF,
#                                          # Qwen2.5-7B shapes, on GPU 0) in the background
#   bench/device/engines_gpu.sh vllm       # KV auto and fp8 against the plan, NVML whole
#                                          # process, tokens/s and TTFT at 1 and 16; fail-fast
#   bench/device/engines_gpu.sh vllm-util  # --gpu-memory-utilization at two context x
#                                          # concurrency points (32768 x 4, 2048 x 128)
#   bench/device/engines_gpu.sh lmdeploy   # --quant-policy 8, 0, 4 (POLICIES="8 0" drops 4):
#                                          # KV blocks vs plan, NVML, tokens/s and TTFT;
#                                          # structured output on policy 8
#
# Carry: .whl (kiban's wheels), .whl-vllm (the slim vLLM wheel in parts, see
# bench/device/slim_wheel.py and split_for_carry.sh, plus .whl-vllm/deps), .whl-lmdeploy
# (the wheel without TurboMind and the serving dependencies both engines share). The
# image's torch 2.11.0+cu130 and triton 3.6 are used as they are. Results:
# $OUT/engines-<engine>.md; details in $OUT/engines-<phase>.tar.gz. Exit status: the
# number of runs that did not hold.
set -uo pipefail
phase=${1:?usage: engines_gpu.sh stash|install|vllm|vllm-util|lmdeploy}
cd "$(dirname "$0")/../.." || exit 1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 KIBAN_HOME=/tmp/kiban-home CUDA_DEVICE_ORDER=PCI_BUS_ID
export VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PYTHONPATH="$PWD/src:/tmp/site:/tmp/site-engines"
export WORK=/tmp/kiban-engines
OUT=${OUT:-/tmp/kiban-out}
C=/tmp/kiban-carry
model=$WORK/qwen2.5-7b-random
mkdir -p "$WORK" "$OUT" "$C" "$KIBAN_HOME"
started=$SECONDS
failed=()
say() { echo "[$((SECONDS - started))s] $*"; }
fail_step() { failed+=("$1"); say "FAILED: $1"; }
finish() {
  tar -czf "$OUT/engines-$phase.tar.gz" -C "$WORK" --exclude='qwen2.5-7b-random' . 2>/dev/null
  say "steps not done: ${#failed[@]} ${failed[*]}"
  exit "${#failed[@]}"
}

fake_env() {  # kiban's environment for an engine kind: the image's python with our sites
  local root=$KIBAN_HOME/envs/$1 python
  python=$(python3 -c 'import sys; print(sys.executable)')
  mkdir -p "$root/bin"
  printf '#!/bin/sh\nexec %s "$@"\n' "$python" >"$root/bin/python"
  printf '#!/bin/sh\nexec %s -m lmdeploy "$@"\n' "$python" >"$root/bin/lmdeploy"
  chmod +x "$root/bin/python" "$root/bin/lmdeploy"
  python3 -c "
import json, pathlib
from kiban.deploy.envs import ENGINE_ENVS, MARKER
pathlib.Path('$root', MARKER).write_text(json.dumps({'fingerprint': ENGINE_ENVS['$1'].fingerprint()}))"
}

case $phase in
stash)
  for d in .whl .whl-vllm .whl-lmdeploy; do
    [[ -d $d ]] && mkdir -p "$C/$d" && cp -a "$d/." "$C/$d/"
  done
  say "carried so far: $(cd "$C" && find . -type f | wc -l) files, $(du -sh "$C" | cut -f1)"
  exit 0
  ;;
install)
  if [[ ! -f /tmp/site/.kiban-wheels ]]; then
    if bench/device/join_and_install.sh /tmp/site "$C/.whl"; then
      touch /tmp/site/.kiban-wheels
    else
      fail_step "kiban wheels"
    fi
  fi
  bench/device/join_and_install.sh /tmp/site-engines "$C/.whl-vllm" "$C/.whl-vllm/deps" \
    "$C/.whl-lmdeploy" >"$WORK/install.log" 2>&1 || { cat "$WORK/install.log"; fail_step "install"; }
  for m in vllm.entrypoints.openai.api_server lmdeploy.serve.openai.api_server; do
    python3 -c "import $m" >"$WORK/import-$m.log" 2>&1 || {
      tail -n 20 "$WORK/import-$m.log"
      fail_step "import $m"
    }
  done
  python3 -c 'import vllm._C_stable_libtorch, vllm.vllm_flash_attn.flash_attn_interface as f
print("vllm kernels load; FA3", f.FA3_AVAILABLE, f.FA3_UNAVAILABLE_REASON)' 2>&1 | tail -n 3
  fake_env vllm-cuda
  fake_env lmdeploy
  if [[ ! -f $model/model.safetensors.index.json ]]; then
    say "writing the random model in the background"
    (setsid nohup python3 bench/device/write_hf_model.py "$model" >"$WORK/model.out" 2>&1 &)
  fi
  finish
  ;;
esac

for _ in $(seq 120); do [[ -f $model/model.safetensors.index.json ]] && break; sleep 1; done
[[ -f $model/model.safetensors.index.json ]] || { cat "$WORK/model.out"; fail_step "model"; finish; }
run() {  # engine, label, args for engines_gpu.py
  local engine=$1 label=$2
  shift 2
  say "$engine $label"
  timeout 560 python3 bench/device/engines_gpu.py "$engine" "$@" >>"$WORK/$phase.out" 2>&1 ||
    fail_step "$engine $label"
  for c in "$WORK"/*.yaml; do  # a run cut short leaves nothing holding the GPU
    python3 -m kiban.cli down -c "$c" >/dev/null 2>&1
  done
}
case $phase in
vllm)
  cat >"$WORK/no-such-gpu.yaml" <<EOF
engines:
  - {name: v, kind: vllm, version: "0.26.0", models: [q], launch: {model: $model, gpus: [7], port: 8299}}
routes: [{model: q, engines: [v]}]
EOF
  timeout 120 python3 -m kiban.cli up -c "$WORK/no-such-gpu.yaml" >"$WORK/no-such-gpu.out" 2>&1
  code=$?
  { echo "### fail-fast: vLLM on GPU 1 of a one-GPU machine (exit code $code)"; echo '```'
    cat "$WORK/no-such-gpu.out"; echo '```'; } >>"$OUT/engines-vllm.md"
  if [[ $code != 1 ]] || ! grep -q "does not exist" "$WORK/no-such-gpu.out"; then
    fail_step "vllm fail-fast"
  fi
  run vllm "kv auto" --kv auto --context 8192 --concurrency 16 --bench
  run vllm "kv fp8" --kv fp8 --context 8192 --concurrency 16 --bench
  ;;
vllm-util)
  run vllm "32768 x 4" --kv auto --context 32768 --concurrency 4
  run vllm "2048 x 128" --kv auto --context 2048 --concurrency 128
  ;;
lmdeploy)  # POLICIES="8 0" to leave out int4
  for q in ${POLICIES:-8 0 4}; do
    extra=()
    [[ $q == 8 ]] && extra=(--structured 10)
    run lmdeploy "quant-policy $q" --kv "$q" --context 8192 --concurrency 16 --bench "${extra[@]}"
  done
  ;;
*) echo "unknown phase $phase"; exit 2 ;;
esac
finish
