# shellcheck shell=bash
# Shared by the device scripts session.sh and two_gpus.sh (sourced, not run). Before
# sourcing, a script sets D (its work folder), md (the Markdown summary `note` appends to)
# and runs from the repository root (or a copy of it that holds src/, bench/device/ and
# the carried .whl/ and .llamacpp-src/).
#
#   device_env             environment for every process (NVLink multicast off), the
#                          carried wheels installed once into /tmp/site, PYTHONPATH
#   say / note / fail_step a timed log line / a summary line / a step that did not hold
#   gpu_count              GPUs nvidia-smi lists (0 when it lists none)
#   building / wait_build  the background llama.cpp CUDA build (build_llamacpp_cuda.sh)
#   refuse                 `kiban up` must refuse a configuration, naming what it should
#   failfast_on_gpus       a GPU index that does not exist; a plan that does not fit once
#                          all but 10 GiB of a GPU is held (sized from NVML's figures)
#   llamacpp_cuda_env      kiban's llamacpp-cuda engine environment around the built binary
#   finish                 pack the details into $OUT and exit with the number of failures

: "${D:?set D before sourcing lib.sh}" "${md:?set md before sourcing lib.sh}"
binary=/tmp/kiban-llamacpp-cuda/bin/llama-server
started=$SECONDS
failed=()

device_env() {
  export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
  export PYTHONUNBUFFERED=1 KIBAN_HOME=/tmp/kiban-home CUDA_DEVICE_ORDER=PCI_BUS_ID
  export COLUMNS=${COLUMNS:-120} # rich's tables in the summaries
  OUT=${OUT:-/tmp/kiban-out}
  mkdir -p "$D" "$OUT" "$KIBAN_HOME"
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
}

kiban() { python3 -m kiban.cli "$@"; }
say() { echo "[$((SECONDS - started))s] $*"; }
note() { printf '%s\n' "$@" >>"$md"; }
code_block() { note '```' "$(cat "$1")" '```'; } # a file's text into the summary
fail_step() { failed+=("$1"); note "" "**FAILED: $1**" ""; say "FAILED: $1"; }

gpu_count() { nvidia-smi -L 2>/dev/null | grep -c '^GPU'; }

building() { pgrep -f build_llamacpp_cuda.sh >/dev/null; }
wait_build() { # seconds: true when the binary is there
  local until=$((SECONDS + $1))
  while [[ ! -x $binary ]] && building && ((SECONDS < until)); do sleep 3; done
  if [[ -x $binary ]]; then say "llama-server CUDA build done"; else
    say "build not done: $(grep -o '^\[ *[0-9]*/[0-9]*\]' "$D/build.log" 2>/dev/null | tail -n 1)"
  fi
  [[ -x $binary ]]
}

refuse() { # title, config, regex the refusal must name: kiban up refuses, starts nothing
  say "fail-fast: $1"
  note "### $1" "" '```yaml' "$(cat "$2")" '```' '$ kiban up'
  timeout 150 python3 -m kiban.cli up -c "$2" >"$D/refuse.out" 2>&1 # not refused: stopped
  local code=$?
  note '```' "$(cat "$D/refuse.out")" "exit code $code" '```'
  if [[ $code == 0 ]] || ! grep -Eq "$3" "$D/refuse.out"; then
    kiban down -c "$2" >/dev/null 2>&1
    fail_step "fail-fast: $1"
  fi
}

failfast_on_gpus() { # folder for the configurations, GPU to hold: both refusals, then the plan
  local dir=$1 gpu=$2 missing hold
  missing=$(gpu_count)
  mkdir -p "$dir"
  cat >"$dir/no-such-gpu.yaml" <<EOF
engines:
  - {name: qwen, kind: llamacpp, models: [qwen], launch: {model: Qwen/Qwen2.5-7B-Instruct, gpus: [$missing], port: 8101}}
routes: [{model: qwen, engines: [qwen]}]
EOF
  refuse "an engine on GPU $missing, which this machine does not have" \
    "$dir/no-such-gpu.yaml" "GPU $missing.*does not exist"
  cat >"$dir/too-big.yaml" <<EOF
engines:
  - name: qwen
    kind: llamacpp
    models: [qwen]
    launch: {model: Qwen/Qwen2.5-7B-Instruct, gpus: [$gpu], port: 8101, context: 32768, concurrency: 16}
routes: [{model: qwen, engines: [qwen]}]
EOF
  say "holding all but 10 GiB of GPU $gpu (sized from NVML), then starting a plan that needs more"
  rm -f "$D/hold.ready"
  python3 bench/device/hold_gpu_memory.py --gpu "$gpu" --leave-gib 10 --seconds 120 \
    --ready "$D/hold.ready" >"$D/hold.out" 2>&1 &
  hold=$!
  for _ in $(seq 90); do
    [[ -f $D/hold.ready ]] || ! kill -0 "$hold" 2>/dev/null && break
    sleep 1
  done
  note "Memory held on GPU $gpu by another process (sized from NVML's figures):" ""
  code_block "$D/hold.out"
  if [[ -f $D/hold.ready ]]; then
    refuse "a plan that does not fit GPU $gpu (all but 10 GiB held by another process)" \
      "$dir/too-big.yaml" "GPU $gpu|gpu$gpu"
  else
    fail_step "hold GPU $gpu memory"
  fi
  kill "$hold" 2>/dev/null
  wait "$hold" 2>/dev/null
  note "The same plan with GPU $gpu free again:" ""
  kiban plan -c "$dir/too-big.yaml" >"$dir/too-big-free.txt" 2>&1
  code_block "$dir/too-big-free.txt"
}

llamacpp_cuda_env() { # the llamacpp-cuda engine environment, as ensure_engine_env builds it
  local root=$KIBAN_HOME/envs/llamacpp-cuda
  if ldd "$binary" | grep -q 'not found'; then
    export LD_LIBRARY_PATH=/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  fi
  mkdir -p "$root/bin"
  cp "$binary" "$root/bin/llama-server"
  ln -sf "$(command -v python3)" "$root/bin/python"
  python3 -c "
import json, pathlib
from kiban.deploy.envs import ENGINE_ENVS, MARKER
spec = ENGINE_ENVS['llamacpp-cuda']
pathlib.Path('$root', MARKER).write_text(json.dumps({'fingerprint': spec.fingerprint()}))"
}

finish() { # tarball, folder, what in it: pack, then exit with the failures (at most 100)
  tar -czf "$1" -C "$2" "$3" 2>/dev/null
  note "" "Steps not done: ${#failed[@]}${failed[*]:+ (${failed[*]})}; $((SECONDS - started)) s."
  say "packed $(du -sh "$1" | cut -f1); steps not done: ${#failed[@]} ${failed[*]}"
  exit $((${#failed[@]} > 100 ? 100 : ${#failed[@]}))
}
