#!/usr/bin/env bash
# kiban on a machine with NVIDIA GPUs and no network (issue 20: the device kind
# nvidia-h200-x2; on one GPU, nvidia-h200, what one GPU allows), in two calls on the same
# machine. GPUS, the number of GPUs, comes from nvidia-smi.
#
#   bench/device/two_gpus.sh one [WAIT_S]
#       starts the llama.cpp CUDA build (sm_90, llama-server only, all cores) and the
#       random-weights GGUF with Qwen2.5-7B's shapes in the background (setsid: they
#       outlive the call while the machine stays warm), then: nvidia-smi and the GPU
#       link matrix, kiban doctor, GPU fail-fast on real hardware (GPU index GPUS, which
#       does not exist; a plan that does not fit the last GPU once all but 10 GiB of it is
#       held), the GPU exporter against nvidia-smi on every GPU, and kiban plan for the
#       configurations of call two. Then waits for the build until WAIT_S seconds into
#       the call (default 0: no wait).
#   bench/device/two_gpus.sh two
#       (the next call, within the 30 s the machine stays warm) waits for the build, then:
#       with two GPUs or more, one llama.cpp engine split over GPUs 0 and 1 (--split-mode
#       layer --tensor-split 1,1 from the plan) against NVML per GPU (with one GPU this
#       step is skipped and reported so); two engines e0 and e1 (one per GPU, or both on
#       GPU 0 with one GPU) under `kiban up` behind one least_outstanding route and one
#       cache_aware route, with Prometheus scraping; kiban status and
#       kiban_engine_gpu_verified; the exporter's per-process memory on the right GPU;
#       requests/s and tokens/s through the gateway with one engine and with two; one
#       engine killed under load (no failure before streaming, restarted on its GPU);
#       kiban report over the run; an engine told --device none stopped by the GPU policy.
#
# Carry `.whl` (bench/device/kv_accuracy-wheels.txt, downloaded as its header says) and
# `.llamacpp-src` (bench/device/pack_llamacpp_source.sh output, and prometheus.xz: Debian's
# prometheus binary, xz-compressed) in the folder that holds src/, deploy/ (which
# `kiban observability render` reads) and bench/device/.
# Results: $OUT/two-gpus-<phase>.md (written as each step ends, so a call cut short still
# returns them) and $OUT/two-gpus-<phase>.tar.gz (logs, plans, JSON). Exit status: the
# number of steps that did not do what they exist for (0: all held; a step skipped for
# want of a second GPU does not count), capped at 100. Shared steps: bench/device/lib.sh.
set -uo pipefail
phase=${1:?usage: two_gpus.sh one [WAIT_S] | two}
wait_s=${2:-0}
cd "$(dirname "$0")/../.." || exit 1
D=/tmp/kiban-2gpu
W=$D/$phase
md=${OUT:-/tmp/kiban-out}/two-gpus-$phase.md
# shellcheck source=bench/device/lib.sh
source bench/device/lib.sh
device_env
mkdir -p "$W"
deadline=${DEADLINE_S:-540} # seconds into the call after which optional steps are skipped
skipped=()
: >"$md"

skip_step() { skipped+=("$1"); note "" "**SKIPPED: $1** ($2)" ""; say "SKIPPED: $1 ($2)"; }
time_left() { echo $((deadline - (SECONDS - started))); }
pack() {
  [[ ${#skipped[@]} == 0 ]] || note "" "Steps skipped: ${skipped[*]}."
  finish "$OUT/two-gpus-$phase.tar.gz" "$D" "$phase"
}

GPUS=$(gpu_count)
g1=$((GPUS >= 2 ? 1 : 0)) # e1's GPU: the second one, or GPU 0 again on a machine with one
if ! python3 -c 'import kiban.cli, kiban.gateway.server, gguf' 2>"$W/import.err"; then
  note "# GPUs, phase $phase" "kiban does not import:"
  code_block "$W/import.err"
  fail_step "kiban imports (carried wheels)"
  pack
fi
if ((GPUS < 1)); then
  fail_step "a GPU visible to nvidia-smi"
  pack
fi

tarball=$(find "$PWD/.llamacpp-src" -name "*-llama.cpp.tar.gz" 2>/dev/null | head -n 1)
gguf=$D/qwen2.5-7b-random-q8_0.gguf
wait_gguf() { # seconds: true when the GGUF is written
  local until=$((SECONDS + $1))
  while [[ ! -f $D/gguf.done ]] && pgrep -f 'kv_accuracy.py --gguf-only' >/dev/null &&
    ((SECONDS < until)); do sleep 2; done
  [[ -f $D/gguf.done ]]
}

write_configs() { # split.yaml (two GPUs or more) and pair.yaml (e0 on GPU 0, e1 on GPU $g1)
  if ((GPUS >= 2)); then
    cat >"$D/split.yaml" <<EOF
gateway: {port: 8194, health_interval_s: 1, request_log: false}
engines:
  - name: split
    kind: llamacpp
    models: [qwen]
    launch: {model: $gguf, gpus: [0, 1], port: 8193, context: 8192, concurrency: 4}
routes: [{model: qwen, engines: [split]}]
EOF
  fi
  cat >"$D/pair.yaml" <<EOF
gateway: {port: 8190, health_interval_s: 1, request_log: false}
observability: {prometheus_url: "http://127.0.0.1:9090", scrape_interval_s: 1}
engines:
  - name: e0
    kind: llamacpp
    models: [qwen]
    launch: {model: $gguf, gpus: [0], port: 8191, context: 4096, concurrency: 16,
             restart: {backoff_s: 1}}
  - name: e1
    kind: llamacpp
    models: [qwen]
    launch: {model: $gguf, gpus: [$g1], port: 8192, context: 4096, concurrency: 16,
             restart: {backoff_s: 1}}
routes:
  - {model: qwen, engines: [e0, e1], strategy: least_outstanding}
  - {model: qwen-ca, engines: [e0, e1], strategy: cache_aware}
  - {model: qwen-e0, engines: [{engine: e0, model: qwen}]}
EOF
}
configs() { if ((GPUS >= 2)); then echo split pair; else echo pair; fi; }

if [[ $phase == one ]]; then
  note "# kiban on $GPUS GPU(s), call one" ""
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
  note "## The machine ($GPUS GPU(s))" ""
  code_block "$W/machine.txt"

  say "kiban doctor"
  (cd /tmp && kiban doctor) >"$W/doctor.txt" 2>&1
  note "## kiban doctor" ""
  code_block "$W/doctor.txt"

  note "## GPU fail-fast on real hardware" ""
  failfast_on_gpus "$W" $((GPUS - 1))

  say "GPU exporter against nvidia-smi (every GPU, GPU 0 under load)"
  if OUT=$W python3 bench/device/gpu_exporter_check.py --rounds 5 --load-seconds 15 \
    >"$W/gpu_exporter_check.out" 2>&1; then :; else fail_step "GPU exporter = nvidia-smi"; fi
  note "## GPU exporter vs nvidia-smi" ""
  cat "$W/gpu_exporter_check.md" >>"$md" 2>/dev/null || code_block "$W/gpu_exporter_check.out"

  say "waiting for the GGUF, then kiban plan for call two's configurations"
  if wait_gguf 240; then
    write_configs
    note "## kiban plan (NVML GPUs, nothing running)" "" "$(cat "$D/gguf.out")" ""
    for c in $(configs); do
      cp "$D/$c.yaml" "$W/"
      kiban plan -c "$D/$c.yaml" >"$W/plan-$c.txt" 2>&1 || fail_step "kiban plan $c"
      kiban plan -c "$D/$c.yaml" --json >"$W/plan-$c.json" 2>&1
      code_block "$W/plan-$c.txt"
    done
  else
    fail_step "random GGUF written"
    code_block "$D/gguf.out"
  fi
  if ((wait_s > SECONDS - started)); then
    say "waiting for the build until ${wait_s}s into the call"
    wait_build $((wait_s - (SECONDS - started))) || true
  fi
  note "## llama.cpp CUDA build" "" "$(tail -n 5 "$D/build.out" 2>/dev/null)" \
    "$(grep -o '^\[ *[0-9]*/[0-9]*\]' "$D/build.log" 2>/dev/null | tail -n 1)"
  building || [[ -x $binary ]] || fail_step "llama.cpp CUDA build running or done"
  pack
fi

# ---------------------------------------------------------------- phase two
note "# kiban on $GPUS GPU(s), call two" ""
say "waiting for the llama.cpp build and the GGUF"
wait_build 400 || { note "$(tail -n 40 "$D/build.out")"; fail_step "llama.cpp CUDA build"; pack; }
wait_gguf 120 || { fail_step "random GGUF written"; pack; }
[[ -f $D/pair.yaml ]] || write_configs
note "llama.cpp build: $(grep -E '^build ran' "$D/build.out")" ""
llamacpp_cuda_env

up() { # config: kiban up -d; true when up
  timeout 420 python3 -m kiban.cli up -c "$1" -d >"$W/up-$(basename "$1" .yaml).txt" 2>&1
}
down() { kiban down -c "$1" >>"$W/down.txt" 2>&1; }
metrics() { curl -s "http://127.0.0.1:$1/metrics" >"$2"; }

note "## One llama.cpp engine over two GPUs (layer split, from the plan)" ""
if ((GPUS < 2)); then
  skip_step "one engine split over two GPUs (--split-mode layer --tensor-split 1,1)" \
    "needs two GPUs; this machine has $GPUS"
else
  say "one engine split over GPUs 0 and 1"
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
fi

say "Prometheus, then two engines (e0 on GPU 0, e1 on GPU $g1) behind one route"
note "## Two engines (e0 on GPU 0, e1 on GPU $g1) behind one least_outstanding route" ""
prom=
if ! kiban observability render -c "$D/pair.yaml" -o "$D/observability" >"$W/render.txt" 2>&1; then
  code_block "$W/render.txt"
  fail_step "kiban observability render (deploy/ carried beside src/?)"
elif [[ -f .llamacpp-src/prometheus.xz ]]; then
  xz -dc .llamacpp-src/prometheus.xz >/tmp/prometheus && chmod +x /tmp/prometheus
  setsid /tmp/prometheus --config.file="$D/observability/prometheus/prometheus.yml" \
    --storage.tsdb.path="$D/prometheus-data" --web.listen-address=127.0.0.1:9090 \
    >"$W/prometheus.log" 2>&1 &
  prom=$!
else
  fail_step "prometheus carried (.llamacpp-src/prometheus.xz)"
fi
kiban plan -c "$D/pair.yaml" >"$W/plan-pair.txt" 2>&1
kiban plan -c "$D/pair.yaml" --json >"$W/plan-pair.json" 2>&1
note '$ kiban plan -c pair.yaml'
code_block "$W/plan-pair.txt"
if ! up "$D/pair.yaml"; then
  fail_step "kiban up: two engines"
  code_block "$W/up-pair.txt"
  down "$D/pair.yaml"
  pack
fi
run_started=$(date +%s)
note '$ kiban up -c pair.yaml -d'
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
for e in e0 e1; do
  python3 bench/device/two_gpus.py memory --config "$D/pair.yaml" --engine "$e" \
    --plan "$W/plan-pair.json" >>"$W/memory-pair.md" 2>&1 || fail_step "$e: NVML within 5%"
done
cat "$W/memory-pair.md" >>"$md"

# prompts: 8 documents of about 300 tokens, 4 questions each, in turn (a prefix to reuse)
python3 -c "
import random
random.seed(20)
words = 'engine route gateway token cache prefix model slot memory request answer'.split()
for q in range(4):
    for d in range(8):
        doc = ' '.join(random.Random(d).choice(words) for _ in range(300))
        print(f'Document {d}: {doc} Question {q}: what does document {d} say about item {q}?')
" >"$W/prompts.txt"
bench() { # name, model, concurrency, seconds
  timeout $(($4 + 60)) python3 -m kiban.cli bench http://127.0.0.1:8190 -m "$2" --stream \
    -c "$3" -d "$4" --warmup "$3" --timeout 60 --prompt-file "$W/prompts.txt" \
    --max-tokens 128 -q --json -o "$W/bench-$1.json" >/dev/null 2>"$W/bench-$1.err"
}
bench_row() {
  python3 -c "
import json, sys
d = json.load(open(sys.argv[1])); r = d['result']
print(f\"| {sys.argv[2]} | {d['load']['concurrency']} | {r['requests_per_s']:.2f} | \"
      f\"{r['output_tokens_per_s']:.0f} | {r['ttft_ms']['p50'] if r.get('ttft_ms') else float('nan'):.0f} | \"
      f\"{r['ok']} | {sum(r['errors'].values())} |\")" "$W/bench-$1.json" "$2" 2>&1
}
say "throughput: one engine, then two (least_outstanding, cache_aware)"
metrics 8190 "$W/metrics-before.txt"
bench one qwen-e0 16 20 || fail_step "bench: one engine"
metrics 8190 "$W/metrics-mid.txt"
bench two qwen 32 20 || fail_step "bench: two engines, least_outstanding"
metrics 8190 "$W/metrics-after.txt"
rows=("$(bench_row one 'one (route qwen-e0)')" "$(bench_row two 'two (route qwen, least_outstanding)')")
printf 'least_outstanding: ' >"$W/served.txt"
python3 bench/device/two_gpus.py served --before "$W/metrics-mid.txt" \
  --after "$W/metrics-after.txt" --expect e0 e1 >>"$W/served.txt" 2>&1 ||
  fail_step "least_outstanding: both engines serve"
if (($(time_left) > 200)); then
  bench ca qwen-ca 32 20 || fail_step "bench: two engines, cache_aware"
  metrics 8190 "$W/metrics-ca.txt"
  rows+=("$(bench_row ca 'two (route qwen-ca, cache_aware)')")
  printf 'cache_aware: ' >>"$W/served.txt"
  python3 bench/device/two_gpus.py served --before "$W/metrics-after.txt" \
    --after "$W/metrics-ca.txt" --expect e0 e1 --min-share 0.1 >>"$W/served.txt" 2>&1 ||
    fail_step "cache_aware: both engines serve"
else
  skip_step "cache_aware bench" "$(time_left) s left of the call's budget"
fi
note "### Through the gateway: streaming, 128 tokens each, 20 s after a warm-up" "" \
  "Prompts: 8 documents of about 300 words, 4 questions each, in turn." "" \
  "| engines | clients | requests/s | tokens/s | TTFT p50 ms | ok | failed |" \
  "|---|---|---|---|---|---|---|" "${rows[@]}" "" "$(cat "$W/served.txt")" ""

say "killing e1 under load"
note "### e1 killed under load (SIGKILL to llama-server, streaming load on route qwen)" ""
bench kill qwen 16 30 &
load=$!
sleep 8
victim=$(python3 -c "
import json, sys
print(next(p['pid'] for p in json.load(open(sys.argv[1]))['processes'] if p['name'] == 'e1'))" \
  "$W/status-pair.json")
metrics 8190 "$W/metrics-before-kill.txt"
kill -9 "$victim" && note "killed PID $victim at $(date +%T)"
python3 bench/device/two_gpus.py restarted --config "$D/pair.yaml" --engine e1 \
  --old-pid "$victim" --timeout 150 >"$W/restarted.txt" 2>&1 & # timed from the kill
restart=$!
wait "$load"
python3 bench/device/two_gpus.py kill --bench "$W/bench-kill.json" >"$W/kill.txt" 2>&1 ||
  fail_step "no failure before streaming while e1 died"
wait "$restart" || fail_step "e1 restarted on GPU $g1"
cat "$W/restarted.txt" >>"$W/kill.txt"
metrics 8190 "$W/metrics-kill.txt"
note "$(cat "$W/kill.txt")" "" "The gateway's counters over the kill (retries, failovers, upstream failures):" \
  '```' "$(diff <(grep -E '^kiban_(retries|failovers|upstream_failures)_total' "$W/metrics-before-kill.txt") \
    <(grep -E '^kiban_(retries|failovers|upstream_failures)_total' "$W/metrics-kill.txt") | grep '^>')" '```' ""
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
down "$D/pair.yaml"

if (($(time_left) > 40)); then
  say "an engine told to use no GPU although it names GPU 0"
  cat >"$W/cpu.yaml" <<EOF
gateway: {port: 8196, request_log: false}
engines:
  - {name: not-on-gpu, kind: llamacpp, models: [qwen], launch: {model: $gguf, gpus: [0], port: 8197, context: 4096, concurrency: 1, args: [--device, none]}}
routes: [{model: qwen, engines: [not-on-gpu]}]
EOF
  refuse "an engine that names GPU 0 but is told --device none" "$W/cpu.yaml" "not on its GPU"
else
  skip_step "--device none stopped by the GPU policy" "$(time_left) s left of the call's budget"
fi
[[ -n $prom ]] && kill "$prom" 2>/dev/null
cp "$D"/.kiban/pair/logs/*.log "$W/" 2>/dev/null
cp "$W"/.kiban/cpu/logs/*.log "$W/" 2>/dev/null
pack
