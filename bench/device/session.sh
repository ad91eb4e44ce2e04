#!/usr/bin/env bash
# One device session for kiban on an NVIDIA GPU machine without network, in two calls:
#
#   bench/device/session.sh one   # starts the llama.cpp CUDA build in the background, then
#                                 # kiban doctor, GPU fail-fast refusals, kiban plan on the
#                                 # real GPU, the GPU exporter against nvidia-smi
#   bench/device/session.sh two   # (next call, same machine) KV accuracy and tokens/s per
#                                 # KV type; kiban up with a CUDA llama-server verified on its
#                                 # GPU, and one that is not (stopped by the GPU policy)
#
# Carry: .whl (bench/device/kv_accuracy-wheels.txt, downloaded as its header says) and
# .llamacpp-src (bench/device/pack_llamacpp_source.sh + a tiny GGUF). Details go to
# /tmp/kiban-device and come back as $OUT/details-<phase>.tar.gz; summaries as
# $OUT/*.md / *.txt. Exit status: the number of steps that did not do what they exist for.
set -uo pipefail
phase=${1:?usage: session.sh one|two}
cd "$(dirname "$0")/../.." || exit 1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 KIBAN_HOME=/tmp/kiban-home
D=/tmp/kiban-device
OUT=${OUT:-/tmp/kiban-out}
mkdir -p "$D" "$OUT" "$KIBAN_HOME"
started=$SECONDS
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl >"$D/pip.log" 2>&1 || cat "$D/pip.log"
export PYTHONPATH="$PWD/src:/tmp/site"
kiban() { python3 -m kiban.cli "$@"; }
failed=()
fail_step() { failed+=("$1"); echo "FAILED: $1"; }
python3 -c 'import kiban.cli, kiban.gateway.server' || fail_step "kiban imports (carried wheels)"
tarball=$(ls "$PWD"/.llamacpp-src/*-llama.cpp.tar.gz)
gguf=$PWD/.llamacpp-src/tiny-qwen2.gguf
binary=/tmp/kiban-llamacpp-cuda/bin/llama-server
say() { echo "[$((SECONDS - started))s] $*"; }

pack() {  # and exit with the number of steps not done
  tar -czf "$OUT/details-$phase.tar.gz" -C "$D" . 2>/dev/null
  say "packed $(du -sh "$OUT/details-$phase.tar.gz" | cut -f1); steps not done: ${failed[*]:-none}"
  exit "${#failed[@]}"
}

wait_build() {  # seconds
  local until=$((SECONDS + $1))
  while [[ ! -x $binary ]] && pgrep -f build_llamacpp_cuda >/dev/null && ((SECONDS < until)); do
    sleep 5
  done
  if [[ -x $binary ]]; then say "llama-server CUDA build done"; else
    say "build not done: $(grep -o '^\[ *[0-9]*%\]' "$D/build.log" 2>/dev/null | tail -n 1)"
  fi
}

refuse() {  # name, config file, regex the refusal names: kiban up refuses, starts nothing
  say "fail-fast: $1"
  timeout 150 python3 -m kiban.cli up -c "$2" >"$D/refuse.out" 2>&1  # not refused: stopped
  local code=$?
  {
    echo "## $1"
    echo '```'
    sed 's/^/    /' "$2"
    echo '$ kiban up'
    cat "$D/refuse.out"
    echo "exit code $code"
    echo '```'
  } >>"$D/failfast.md"
  if [[ $code == 0 ]] || ! grep -Eq "$3" "$D/refuse.out"; then
    kiban down -c "$2" >/dev/null 2>&1
    fail_step "fail-fast: $1"
  fi
}

if [[ $phase == one ]]; then
  say "starting the llama.cpp CUDA build in the background"
  (OUT=$D BUILD_BUDGET_S=3000 setsid nohup bench/device/build_llamacpp_cuda.sh "$tarball" \
    "$gguf" >"$D/build.out" 2>&1 &)
  nvidia-smi >"$D/nvidia-smi.txt" 2>&1
  say "kiban doctor"
  (cd /tmp && kiban doctor >"$D/doctor.txt" 2>&1; kiban doctor --json >"$D/doctor.json" 2>&1)
  cp "$D/doctor.txt" "$OUT/doctor.txt"

  mkdir -p "$D/configs"
  cat >"$D/configs/no-such-gpu.yaml" <<EOF
engines:
  - {name: qwen, kind: vllm, models: [qwen], launch: {model: Qwen/Qwen2.5-7B-Instruct, gpus: [3], port: 8101}}
routes: [{model: qwen, engines: [qwen]}]
EOF
  refuse "an engine on a GPU this machine does not have" "$D/configs/no-such-gpu.yaml" \
    "GPU 3.*does not exist"
  cat >"$D/configs/too-big.yaml" <<EOF
engines:
  - name: qwen
    kind: llamacpp
    models: [qwen]
    launch: {model: Qwen/Qwen2.5-7B-Instruct, gpus: [0], port: 8101, context: 32768, concurrency: 16}
routes: [{model: qwen, engines: [qwen]}]
EOF
  say "holding all but 10 GiB of GPU 0 (sized from NVML), then planning what no longer fits"
  rm -f /tmp/kiban-hold.ready
  python3 bench/device/hold_gpu_memory.py --gpu 0 --leave-gib 10 --seconds 120 \
    --ready /tmp/kiban-hold.ready >"$D/hold.out" 2>&1 &
  hold=$!
  for _ in $(seq 90); do [[ -f /tmp/kiban-hold.ready ]] || ! kill -0 $hold 2>/dev/null && break; sleep 1; done
  cat "$D/hold.out" >>"$D/failfast.md"
  if [[ -f /tmp/kiban-hold.ready ]]; then
    refuse "a plan that needs more memory than is free (all but 10 GiB held by another process)" \
      "$D/configs/too-big.yaml" "GPU 0|gpu0"
  else
    fail_step "hold GPU 0 memory"
  fi
  kill $hold 2>/dev/null; wait $hold 2>/dev/null
  echo "## the same plan with the GPU free again: it fits" >>"$D/failfast.md"
  kiban plan -c "$D/configs/too-big.yaml" >>"$D/failfast.md" 2>&1
  kiban plan model Qwen/Qwen2.5-7B-Instruct >"$D/plan-7b-quick.txt" 2>&1
  cp "$D/failfast.md" "$OUT/failfast.md"

  say "GPU exporter against nvidia-smi"
  OUT=$D python3 bench/device/gpu_exporter_check.py >"$D/gpu_exporter_check.out" 2>&1 ||
    fail_step "GPU exporter = nvidia-smi"
  cp "$D/gpu_exporter_check.md" "$OUT/" 2>/dev/null
  wait_build $((560 - (SECONDS - started)))
  cp "$D/build.out" "$OUT/build.out"
  [[ -x $binary ]] || pgrep -f build_llamacpp_cuda >/dev/null || fail_step "llama.cpp CUDA build"
  pack
fi

# phase two
wait_build 300
[[ -x $binary ]] || { fail_step "llama.cpp CUDA build (no llama-server binary)"; pack; }
say "KV accuracy and tokens/s per KV type (planner on the real GPU)"
mkdir -p "$D/kv"
OUT=$D/kv timeout 330 bench/device/kv_accuracy.sh "$binary" >"$D/kv/run.out" 2>&1 ||
  fail_step "KV accuracy"
cp "$D/kv/kv_accuracy.md" "$OUT/" 2>/dev/null

say "kiban up with the CUDA llama-server: verified on its GPU, and one that is not"
env_root=$KIBAN_HOME/envs/llamacpp-cuda
mkdir -p "$env_root/bin"
cp "$binary" "$env_root/bin/llama-server"
ln -sf "$(command -v python3)" "$env_root/bin/python"
python3 -c "
import json, pathlib
from kiban.deploy.envs import ENGINE_ENVS, MARKER
spec = ENGINE_ENVS['llamacpp-cuda']
pathlib.Path('$env_root', MARKER).write_text(json.dumps({'fingerprint': spec.fingerprint()}))"
mkdir -p "$D/up"
cat >"$D/up/kiban.yaml" <<EOF
gateway: {port: 8190, health_interval_s: 1}
engines:
  - {name: llama-gpu, kind: llamacpp, models: [tiny], launch: {model: $gguf, gpus: [0], port: 8191, context: 4096, concurrency: 4}}
routes: [{model: tiny, engines: [llama-gpu]}]
EOF
{
  echo '$ kiban up -d'
  kiban up -c "$D/up/kiban.yaml" -d 2>&1 || fail_step "kiban up, CUDA llama-server"
  echo '$ kiban status'
  kiban status -c "$D/up/kiban.yaml" 2>&1
  kiban status -c "$D/up/kiban.yaml" --json 2>&1
  echo '$ curl /v1/chat/completions'
  curl -s http://127.0.0.1:8190/v1/chat/completions -H 'content-type: application/json' \
    -d '{"model":"tiny","messages":[{"role":"user","content":"hi"}],"max_tokens":8}'
  echo
  echo '$ curl /metrics | grep gpu'
  curl -s http://127.0.0.1:8190/metrics | grep -E '^kiban_(engine_gpu_verified|gpu_memory_used_bytes|gpu_utilization)' | head
  kiban down -c "$D/up/kiban.yaml" 2>&1
} >"$D/up/verified.txt" 2>&1
cat >"$D/up/cpu.yaml" <<EOF
gateway: {port: 8192}
engines:
  - {name: llama-not-on-gpu, kind: llamacpp, models: [tiny], launch: {model: $gguf, gpus: [0], port: 8193, context: 4096, concurrency: 4, args: [--device, none]}}
routes: [{model: tiny, engines: [llama-not-on-gpu]}]
EOF
{
  echo '# an engine told to use no GPU (--device none) although it names GPU 0'
  echo '$ kiban up'
  timeout 150 python3 -m kiban.cli up -c "$D/up/cpu.yaml" 2>&1
  echo "exit code $?"
} >"$D/up/not-on-gpu.txt" 2>&1
grep -q "not on its GPU" "$D/up/not-on-gpu.txt" || fail_step "GPU policy stops an engine on the CPU"
kiban down -c "$D/up/cpu.yaml" >/dev/null 2>&1
cat "$D/up/verified.txt" "$D/up/not-on-gpu.txt" >"$OUT/gpu-policy.txt"
say "done"
pack
