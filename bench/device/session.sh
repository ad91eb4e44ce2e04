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
# $OUT/summary-<phase>.md and *.md / *.txt. Shared steps: bench/device/lib.sh. Exit
# status: the number of steps that did not do what they exist for.
set -uo pipefail
phase=${1:?usage: session.sh one|two}
cd "$(dirname "$0")/../.." || exit 1
D=/tmp/kiban-device
md=$D/summary-$phase.md
# shellcheck source=bench/device/lib.sh
source bench/device/lib.sh
device_env
: >"$md"
python3 -c 'import kiban.cli, kiban.gateway.server' || fail_step "kiban imports (carried wheels)"
tarball=$(ls "$PWD"/.llamacpp-src/*-llama.cpp.tar.gz)
gguf=$PWD/.llamacpp-src/tiny-qwen2.gguf
pack() { cp "$md" "$OUT/"; finish "$OUT/details-$phase.tar.gz" "$D" .; }

if [[ $phase == one ]]; then
  say "starting the llama.cpp CUDA build in the background"
  (OUT=$D BUILD_BUDGET_S=3000 setsid nohup bench/device/build_llamacpp_cuda.sh "$tarball" \
    "$gguf" >"$D/build.out" 2>&1 &)
  nvidia-smi >"$D/nvidia-smi.txt" 2>&1
  say "kiban doctor"
  (cd /tmp && kiban doctor >"$D/doctor.txt" 2>&1; kiban doctor --json >"$D/doctor.json" 2>&1)
  cp "$D/doctor.txt" "$OUT/doctor.txt"

  note "# GPU fail-fast on real hardware" ""
  failfast_on_gpus "$D/configs" 0
  kiban plan model Qwen/Qwen2.5-7B-Instruct >"$D/plan-7b-quick.txt" 2>&1

  say "GPU exporter against nvidia-smi"
  OUT=$D python3 bench/device/gpu_exporter_check.py >"$D/gpu_exporter_check.out" 2>&1 ||
    fail_step "GPU exporter = nvidia-smi"
  cp "$D/gpu_exporter_check.md" "$OUT/" 2>/dev/null
  wait_build $((560 - (SECONDS - started)))
  cp "$D/build.out" "$OUT/build.out"
  [[ -x $binary ]] || building || fail_step "llama.cpp CUDA build"
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
llamacpp_cuda_env
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
