#!/usr/bin/env bash
# kiban on a machine with two NVIDIA GPUs and no network (the device kind nvidia-h200-x2),
# in two calls on the same machine (issue 20):
#
#   bench/device/two_gpus.sh one [WAIT_S]
#       starts the llama.cpp CUDA build (sm_90, llama-server only, all cores) and the
#       random-weights GGUF with Qwen2.5-7B's shapes in the background (setsid: they
#       outlive the call while the machine stays warm), then: nvidia-smi and the GPU
#       link matrix, kiban doctor, GPU fail-fast on real hardware (a GPU index that does
#       not exist; a plan that does not fit GPU 1 once all but 10 GiB of it is held),
#       the GPU exporter against nvidia-smi on both GPUs, and kiban plan for the
#       configurations of call two. Waits up to WAIT_S (default 0) for the build.
#   bench/device/two_gpus.sh two
#       (the next call, within the 30 s the machine stays warm) waits for the build, then:
#       one llama.cpp engine split over both GPUs (--split-mode layer --tensor-split 1,1
#       from the plan) against NVML per GPU; two engines, one per GPU, under `kiban up`
#       behind one least_outstanding route with Prometheus scraping; kiban status and
#       kiban_engine_gpu_verified; the exporter's per-process memory on the right GPU;
#       requests/s and tokens/s through the gateway with one engine and with two; one
#       engine killed under load (no failure before streaming, restarted on its GPU);
#       kiban report over the run.
#
# Carry `.whl` (bench/device/kv_accuracy-wheels.txt, downloaded as its header says) and
# `.llamacpp-src` (bench/device/pack_llamacpp_source.sh output, and prometheus.xz: Debian's
# prometheus binary, xz-compressed). Results: $OUT/two-gpus-<phase>.md (written as each
# step ends, so a call cut short still returns them) and $OUT/two-gpus-<phase>.tar.gz
# (logs, plans, JSON). Exit status: the number of steps that did not do what they exist
# for (0: all held), capped at 100.
set -uo pipefail
phase=${1:?usage: two_gpus.sh one [WAIT_S] | two}
wait_s=${2:-0}
cd "$(dirname "$0")/../.." || exit 1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 KIBAN_HOME=/tmp/kiban-home CUDA_DEVICE_ORDER=PCI_BUS_ID
D=/tmp/kiban-2gpu
OUT=${OUT:-/tmp/kiban-out}
mkdir -p "$D/$phase" "$OUT" "$KIBAN_HOME"
W=$D/$phase
md=$OUT/two-gpus-$phase.md
started=$SECONDS
deadline=${DEADLINE_S:-540}  # seconds into the call after which optional steps are skipped
failed=()
: >"$md"

say() { echo "[$((SECONDS - started))s] $*"; }
note() { printf '%s\n' "$@" >>"$md"; }
fail_step() { failed+=("$1"); note "" "**FAILED: $1**" ""; say "FAILED: $1"; }
code_block() { note '```' "$(cat "$1")" '```'; }  # a file's text into the summary
time_left() { echo $((deadline - (SECONDS - started))); }
pack() {
  tar -czf "$OUT/two-gpus-$phase.tar.gz" -C "$D" "$phase" 2>/dev/null
  note "" "Steps not done: ${#failed[@]}${failed[*]:+ (${failed[*]})}; $((SECONDS - started)) s."
  say "packed; steps not done: ${#failed[@]} ${failed[*]}"
  exit $((${#failed[@]} > 100 ? 100 : ${#failed[@]}))
}

# kiban's dependencies the image lacks (pydantic, orjson, jsonschema-rs, uvicorn, ...)
if [[ ! -f /tmp/site/.kiban-wheels ]]; then
  if python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl >"$D/pip.log" 2>&1; then
    touch /tmp/site/.kiban-wheels
  else
    cat "$D/pip.log"
  fi
fi
export PYTHONPATH="$PWD/src:/tmp/site"
kiban() { python3 -m kiban.cli "$@"; }
if ! python3 -c 'import kiban.cli, kiban.gateway.server, gguf' 2>"$W/import.err"; then
  note "# two GPUs, phase $phase" "kiban does not import:"
  code_block "$W/import.err"
  fail_step "kiban imports (carried wheels)"
  pack
fi

tarball=$(find "$PWD/.llamacpp-src" -name "*-llama.cpp.tar.gz" 2>/dev/null | head -n 1)
gguf=$D/qwen2.5-7b-random-q8_0.gguf
binary=/tmp/kiban-llamacpp-cuda/bin/llama-server

building() { pgrep -f build_llamacpp_cuda.sh >/dev/null; }
wait_for() {  # seconds, what ("build" or "gguf"): true when it is there
  local until=$((SECONDS + $1))
  if [[ $2 == build ]]; then
    while [[ ! -x $binary ]] && building && ((SECONDS < until)); do sleep 3; done
    [[ -x $binary ]]
  else
    while [[ ! -f $D/gguf.done ]] && pgrep -f 'kv_accuracy.py --gguf-only' >/dev/null &&
      ((SECONDS < until)); do sleep 2; done
    [[ -f $D/gguf.done ]]
  fi
}

config_split() {
  cat >"$D/split.yaml" <<EOF
gateway: {port: 8194, health_interval_s: 1, request_log: false}
engines:
  - name: split
    kind: llamacpp
    models: [qwen]
    launch: {model: $gguf, gpus: [0, 1], port: 8193, context: 8192, concurrency: 4}
routes: [{model: qwen, engines: [split]}]
EOF
  cat >"$D/pair.yaml" <<EOF
gateway: {port: 8190, health_interval_s: 1, request_log: false}
observability: {prometheus_url: "http://127.0.0.1:9090", scrape_interval_s: 1}
engines:
  - name: gpu0
    kind: llamacpp
    models: [qwen]
    launch: {model: $gguf, gpus: [0], port: 8191, context: 4096, concurrency: 16,
             restart: {backoff_s: 1}}
  - name: gpu1
    kind: llamacpp
    models: [qwen]
    launch: {model: $gguf, gpus: [1], port: 8192, context: 4096, concurrency: 16,
             restart: {backoff_s: 1}}
routes:
  - {model: qwen, engines: [gpu0, gpu1], strategy: least_outstanding}
  - {model: qwen-gpu0, engines: [{engine: gpu0, model: qwen}]}
EOF
}

refuse() {  # title, config, what the refusal must name (regex): kiban up refuses, starts nothing
  say "fail-fast: $1"
  note "### $1" "" '```yaml' "$(cat "$2")" '```' '$ kiban up'
  timeout 150 python3 -m kiban.cli up -c "$2" >"$W/refuse.out" 2>&1  # not refused: stopped
  local code=$?
  note '```' "$(cat "$W/refuse.out")" "exit code $code" '```'
  if [[ $code == 0 ]] || ! grep -Eq "$3" "$W/refuse.out"; then
    kiban down -c "$2" >/dev/null 2>&1
    fail_step "fail-fast: $1"
  fi
}

if [[ $phase == one ]]; then
  note "# kiban on two GPUs, call one" ""
  if [[ -z $tarball ]]; then
    fail_step "llama.cpp sources (.llamacpp-src not carried)"
  elif [[ ! -x $binary ]] && ! building; then
    say "starting the llama.cpp CUDA build in the background ($(nproc) cores)"
    (OUT=$D BUILD_BUDGET_S=3000 LLAMACPP_F16_KV_ONLY=1 setsid nohup \
      bench/device/build_llamacpp_cuda.sh "$tarball" >"$D/build.out" 2>&1 &)
  fi
  if [[ ! -f $D/gguf.done ]]; then
    say "writing the random GGUF (Qwen2.5-7B shapes, q8_0) in the background"
    (setsid nohup bash -c "python3 bench/device/kv_accuracy.py --gguf-only '$gguf' \
      --model '${GGUF_MODEL:-Qwen/Qwen2.5-7B-Instruct}' && touch '$D/gguf.done'" \
      >"$D/gguf.out" 2>&1 &)
  fi
  {
    nvidia-smi
    nvidia-smi topo -m
    nvidia-smi --query-gpu=index,name,uuid,memory.total,memory.used,pci.bus_id --format=csv
    python3 -c 'import torch; print("torch", torch.__version__, "GPUs", torch.cuda.device_count())'
    nproc
    free -g
  } >"$W/machine.txt" 2>&1
  note "## The machine" ""
  code_block "$W/machine.txt"
  [[ $(nvidia-smi -L 2>/dev/null | grep -c '^GPU') -ge 2 ]] || fail_step "two GPUs visible"

  say "kiban doctor"
  (cd /tmp && kiban doctor) >"$W/doctor.txt" 2>&1
  note "## kiban doctor" ""
  code_block "$W/doctor.txt"

  note "## GPU fail-fast on real hardware" ""
  cat >"$W/no-such-gpu.yaml" <<EOF
engines:
  - {name: qwen, kind: llamacpp, models: [qwen], launch: {model: Qwen/Qwen2.5-7B-Instruct, gpus: [2], port: 8101}}
routes: [{model: qwen, engines: [qwen]}]
EOF
  refuse "an engine on GPU 2, which this machine does not have" "$W/no-such-gpu.yaml" \
    "GPU 2.*does not exist"
  cat >"$W/too-big.yaml" <<EOF
engines:
  - name: qwen
    kind: llamacpp
    models: [qwen]
    launch: {model: Qwen/Qwen2.5-7B-Instruct, gpus: [1], port: 8101, context: 32768, concurrency: 16}
routes: [{model: qwen, engines: [qwen]}]
EOF
  say "holding all but 10 GiB of GPU 1, then starting a plan that needs more"
  rm -f "$W/hold.ready"
  python3 bench/device/hold_gpu_memory.py --gpu 1 --leave-gib 10 --seconds 120 \
    --ready "$W/hold.ready" >"$W/hold.out" 2>&1 &
  hold=$!
  for _ in $(seq 90); do [[ -f $W/hold.ready ]] || ! kill -0 "$hold" 2>/dev/null && break; sleep 1; done
  note "Memory held on GPU 1 by another process (sized from NVML's total):" ""
  code_block "$W/hold.out"
  if [[ -f $W/hold.ready ]]; then
    refuse "a plan that does not fit GPU 1 (all but 10 GiB held by another process)" \
      "$W/too-big.yaml" "GPU 1|gpu1"
  else
    fail_step "hold GPU 1 memory"
  fi
  kill "$hold" 2>/dev/null
  wait "$hold" 2>/dev/null
  note "The same plan with GPU 1 free again:" ""
  kiban plan -c "$W/too-big.yaml" >"$W/too-big-free.txt" 2>&1
  code_block "$W/too-big-free.txt"

  say "GPU exporter against nvidia-smi (both GPUs, GPU 0 under load)"
  if OUT=$W python3 bench/device/gpu_exporter_check.py --rounds 5 --load-seconds 15 \
    >"$W/gpu_exporter_check.out" 2>&1; then :; else fail_step "GPU exporter = nvidia-smi"; fi
  note "## GPU exporter vs nvidia-smi" ""
  cat "$W/gpu_exporter_check.md" >>"$md" 2>/dev/null || code_block "$W/gpu_exporter_check.out"

  say "waiting for the GGUF, then kiban plan for call two's configurations"
  if wait_for 240 gguf; then
    config_split
    cp "$D/split.yaml" "$D/pair.yaml" "$W/"
    note "## kiban plan (NVML GPUs, nothing running)" "" "$(cat "$D/gguf.out")" ""
    for c in split pair; do
      kiban plan -c "$D/$c.yaml" >"$W/plan-$c.txt" 2>&1 || fail_step "kiban plan $c"
      kiban plan -c "$D/$c.yaml" --json >"$D/plan-$c.json" 2>&1
      cp "$D/plan-$c.json" "$W/"
      code_block "$W/plan-$c.txt"
    done
  else
    fail_step "random GGUF written"
    code_block "$D/gguf.out"
  fi
  if ((wait_s > 0)); then
    say "waiting up to ${wait_s}s for the build"
    wait_for "$wait_s" build || true
  fi
  note "## llama.cpp CUDA build" "" "$(tail -n 5 "$D/build.out" 2>/dev/null)" \
    "$(grep -o '^\[ *[0-9]*/[0-9]*\]' "$D/build.log" 2>/dev/null | tail -n 1)"
  building || [[ -x $binary ]] || fail_step "llama.cpp CUDA build running or done"
  pack
fi

# ---------------------------------------------------------------- phase two
note "# kiban on two GPUs, call two" ""
say "waiting for the llama.cpp build and the GGUF"
wait_for 400 build || { note "$(tail -n 40 "$D/build.out")"; fail_step "llama.cpp CUDA build"; pack; }
wait_for 120 gguf || { fail_step "random GGUF written"; pack; }
[[ -f $D/split.yaml ]] || config_split
note "llama.cpp build: $(grep -E '^build ran' "$D/build.out")" ""
if ldd "$binary" | grep -q 'not found'; then
  export LD_LIBRARY_PATH=/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
fi
# the llamacpp-cuda engine environment, as `ensure_engine_env` would have built it
env_root=$KIBAN_HOME/envs/llamacpp-cuda
mkdir -p "$env_root/bin"
cp "$binary" "$env_root/bin/llama-server"
ln -sf "$(command -v python3)" "$env_root/bin/python"
python3 -c "
import json, pathlib
from kiban.deploy.envs import ENGINE_ENVS, MARKER
spec = ENGINE_ENVS['llamacpp-cuda']
pathlib.Path('$env_root', MARKER).write_text(json.dumps({'fingerprint': spec.fingerprint()}))"

up() {  # config: kiban up -d; true when up
  timeout 420 python3 -m kiban.cli up -c "$1" -d >"$W/up-$(basename "$1" .yaml).txt" 2>&1
}
down() { kiban down -c "$1" >>"$W/down.txt" 2>&1; }
metrics() { curl -s "http://127.0.0.1:$1/metrics" >"$2"; }

say "one engine split over both GPUs"
note "## One llama.cpp engine over both GPUs (layer split, from the plan)" ""
kiban plan -c "$D/split.yaml" --json >"$W/plan-split.json" 2>&1
if up "$D/split.yaml"; then
  kiban status -c "$D/split.yaml" --no-live >"$W/status-split.txt" 2>&1
  curl -s http://127.0.0.1:8194/v1/chat/completions -H 'content-type: application/json' \
    -d '{"model":"qwen","messages":[{"role":"user","content":"hi"}],"max_tokens":16}' \
    >"$W/split-answer.json"
  python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['usage'])" \
    "$W/split-answer.json" >>"$W/status-split.txt" 2>&1 || fail_step "split engine answers"
  python3 bench/device/two_gpus.py memory --config "$D/split.yaml" --engine split \
    --plan "$W/plan-split.json" >"$W/memory-split.md" 2>&1 || fail_step "split: NVML per GPU within 5%"
  cat "$W/memory-split.md" >>"$md"
  code_block "$W/status-split.txt"
else
  fail_step "kiban up: engine split over two GPUs"
  code_block "$W/up-split.txt"
fi
cp "$D"/.kiban/split/logs/*.log "$W/" 2>/dev/null
down "$D/split.yaml"

say "Prometheus, then two engines, one per GPU, behind one route"
note "## Two engines, one per GPU, behind one least_outstanding route" ""
kiban observability render -c "$D/pair.yaml" -o "$D/observability" >"$W/render.txt" 2>&1
prom=
if [[ -f .llamacpp-src/prometheus.xz ]]; then
  xz -dc .llamacpp-src/prometheus.xz >/tmp/prometheus && chmod +x /tmp/prometheus
  setsid /tmp/prometheus --config.file="$D/observability/prometheus/prometheus.yml" \
    --storage.tsdb.path="$D/prometheus-data" --web.listen-address=127.0.0.1:9090 \
    >"$W/prometheus.log" 2>&1 &
  prom=$!
else
  fail_step "prometheus carried (.llamacpp-src/prometheus.xz)"
fi
kiban plan -c "$D/pair.yaml" --json >"$W/plan-pair.json" 2>&1
if ! up "$D/pair.yaml"; then
  fail_step "kiban up: two engines"
  code_block "$W/up-pair.txt"
  down "$D/pair.yaml"
  pack
fi
run_started=$(date +%s)
code_block "$W/up-pair.txt"
kiban status -c "$D/pair.yaml" >"$W/status-pair.txt" 2>&1
kiban status -c "$D/pair.yaml" --json >"$W/status-pair.json" 2>&1
note '$ kiban status'
code_block "$W/status-pair.txt"
metrics 8190 "$W/metrics-up.txt"
note '$ curl -s :8190/metrics | grep kiban_engine_gpu_verified' '```' \
  "$(grep '^kiban_engine_gpu_verified' "$W/metrics-up.txt")" '```'
python3 bench/device/two_gpus.py gpus --config "$D/pair.yaml" --metrics "$W/metrics-up.txt" \
  >"$W/gpus.md" 2>&1 || fail_step "exporter: each engine's memory on its GPU, verified"
note "### Processes on GPUs: NVML, the gateway's exporter, the GPU policy" ""
cat "$W/gpus.md" >>"$md"
for e in gpu0 gpu1; do
  python3 bench/device/two_gpus.py memory --config "$D/pair.yaml" --engine "$e" \
    --plan "$W/plan-pair.json" >>"$W/memory-pair.md" 2>&1 || fail_step "$e: NVML within 5%"
done
cat "$W/memory-pair.md" >>"$md"

bench() {  # name, model, concurrency, seconds
  timeout $(($4 + 60)) python3 -m kiban.cli bench http://127.0.0.1:8190 -m "$2" --stream \
    -c "$3" -d "$4" --warmup "$3" --timeout 60 \
    --max-tokens 128 -q --json -o "$W/bench-$1.json" >/dev/null 2>"$W/bench-$1.err"
}
bench_row() {
  python3 -c "
import json, sys
d = json.load(open(sys.argv[1])); r = d['result']
print(f\"| {sys.argv[2]} | {d['load']['concurrency']} | {r['requests_per_s']:.2f} | \"
      f\"{r['output_tokens_per_s']:.0f} | {r['ttft_ms']['p50'] if r.get('ttft_ms') else '-'} | \"
      f\"{r['ok']} | {sum(r['errors'].values())} |\")" "$W/bench-$1.json" "$2" 2>&1
}
say "throughput: one engine, then two"
metrics 8190 "$W/metrics-before.txt"
bench one qwen-gpu0 16 20 || fail_step "bench: one engine"
metrics 8190 "$W/metrics-mid.txt"
bench two qwen 32 20 || fail_step "bench: two engines"
metrics 8190 "$W/metrics-after.txt"
note "### Through the gateway: streaming, 128 tokens each, 20 s after a warm-up" "" \
  "| engines | clients | requests/s | tokens/s | TTFT p50 ms | ok | failed |" "|---|---|---|---|---|---|---|" \
  "$(bench_row one 'one (route qwen-gpu0)')" "$(bench_row two 'two (route qwen, least_outstanding)')" ""
python3 bench/device/two_gpus.py served --before "$W/metrics-mid.txt" \
  --after "$W/metrics-after.txt" --expect gpu0 gpu1 >"$W/served.txt" 2>&1 ||
  fail_step "least_outstanding: both engines serve"
note "$(cat "$W/served.txt")" ""

say "killing gpu1 under load"
note "### gpu1 killed under load (SIGKILL to llama-server, streaming load on route qwen)" ""
bench kill qwen 16 30 &
load=$!
sleep 8
victim=$(python3 -c "
import json, sys
print(next(p['pid'] for p in json.load(open(sys.argv[1]))['processes'] if p['name'] == 'gpu1'))" \
  "$W/status-pair.json")
kill -9 "$victim" && note "killed PID $victim at $(date +%T)"
wait "$load"
python3 bench/device/two_gpus.py kill --bench "$W/bench-kill.json" >"$W/kill.txt" 2>&1 ||
  fail_step "no failure before streaming while gpu1 died"
python3 bench/device/two_gpus.py restarted --config "$D/pair.yaml" --engine gpu1 \
  --old-pid "$victim" --timeout 150 >>"$W/kill.txt" 2>&1 || fail_step "gpu1 restarted on GPU 1"
note "$(cat "$W/kill.txt")" ""
kiban status -c "$D/pair.yaml" >"$W/status-after-kill.txt" 2>&1
metrics 8190 "$W/metrics-after-kill.txt"
python3 bench/device/two_gpus.py gpus --config "$D/pair.yaml" \
  --metrics "$W/metrics-after-kill.txt" >"$W/gpus-after-kill.md" 2>&1 ||
  fail_step "after the restart: each engine on its GPU, verified"
note '$ kiban status   # after the restart'
code_block "$W/status-after-kill.txt"
cat "$W/gpus-after-kill.md" >>"$md"

say "kiban report over the run"
note "## kiban report over the run ($(($(date +%s) - run_started)) s of data)" ""
if [[ -n $prom ]]; then
  sleep 3
  span=$(($(date +%s) - run_started + 60))
  kiban report -c "$D/pair.yaml" --period "${span}s" >"$W/report.txt" 2>&1 || fail_step "kiban report"
  kiban report -c "$D/pair.yaml" --period "${span}s" --json >"$W/report.json" 2>&1
  code_block "$W/report.txt"
fi

if (($(time_left) > 40)); then
  say "an engine told to use no GPU although it names GPU 0"
  down "$D/pair.yaml"
  cat >"$W/cpu.yaml" <<EOF
gateway: {port: 8196, request_log: false}
engines:
  - {name: not-on-gpu, kind: llamacpp, models: [qwen], launch: {model: $gguf, gpus: [0], port: 8197, context: 4096, concurrency: 1, args: [--device, none]}}
routes: [{model: qwen, engines: [not-on-gpu]}]
EOF
  refuse "an engine that names GPU 0 but is told --device none" "$W/cpu.yaml" "not on its GPU"
fi
down "$D/pair.yaml"
[[ -n $prom ]] && kill "$prom" 2>/dev/null
cp "$D"/.kiban/pair/logs/*.log "$W/" 2>/dev/null
cp "$D"/.kiban/cpu/logs/*.log "$W/" 2>/dev/null
pack
