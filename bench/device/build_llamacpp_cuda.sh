#!/usr/bin/env bash
# Build kiban's `llamacpp-cuda` engine (llama.cpp's llama-server with CUDA, sm_90 for
# the H100) on the GPU machine, with no network, from llama.cpp sources carried there.
#
#   bench/device/build_llamacpp_cuda.sh SOURCE_TARBALL [TINY_GGUF]
#
# SOURCE_TARBALL: the llama-cpp-python sdist pinned in src/kiban/engines/llamacpp.py, or the
#   slim repack of it that bench/device/pack_llamacpp_source.sh writes (the sdist is
#   76 MB, over the 64 MiB a device call carries; the repack is about 11 MB).
# TINY_GGUF (optional): a GGUF to start the built server on (f16 KV, then mixed
#   q8_0/q4_0 KV, which needs GGML_CUDA_FA_QUANTS=all); start-up logs go to $OUT.
#
# The cmake flags come from kiban.engines.llamacpp (LLAMACPP_CMAKE_FLAGS and
# LLAMACPP_CUDA_FLAGS), so this build is the one `ensure_engine_env("llamacpp-cuda")`
# makes, for sm_90 only (90-real: no PTX), with Ninja where it is installed, and without
# NCCL (GGML_CUDA_NCCL=OFF: layer-split engines copy between GPUs peer to peer, and no
# NCCL means no NVLink multicast either). LLAMACPP_F16_KV_ONLY=1 leaves out
# GGML_CUDA_FA_QUANTS=all (only the default K/V pairs f16-f16, q8_0-q8_0, q4_0-q4_0,
# bf16-bf16 get flash-attention kernels): a shorter build when mixed K/V types are not
# measured. The build stops after $BUILD_BUDGET_S seconds (default 500) to stay inside
# one device call; run the same command again at once and it resumes where it stopped.
# Prints the binary's path and `llama-server --version`; exit status 0 built, 3 budget
# ran out (resumable), 1 failed.
#
# kiban's dependencies must be importable (the carried wheels in /tmp/site, see
# session.sh): PYTHONPATH is extended with src/, never replaced.
set -euo pipefail
tarball=$(realpath "${1:?usage: build_llamacpp_cuda.sh SOURCE_TARBALL [TINY_GGUF]}")
gguf=${2:+$(realpath "$2")}
cd "$(dirname "$0")/../.."
out=${OUT:-/tmp/kiban-llamacpp-out}
work=${KIBAN_LLAMACPP_WORK:-/tmp/kiban-llamacpp-cuda}
budget=${BUILD_BUDGET_S:-500}
mkdir -p "$out" "$work/src" "$work/bin"

flags_text=$(PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" python3 -c '
from kiban.engines.llamacpp import LLAMACPP_CMAKE_FLAGS, LLAMACPP_CUDA_FLAGS
print(*LLAMACPP_CMAKE_FLAGS, *LLAMACPP_CUDA_FLAGS, sep="\n")')
mapfile -t flags <<<"$flags_text"
if [[ ${LLAMACPP_F16_KV_ONLY:-0} == 1 ]]; then
  for i in "${!flags[@]}"; do [[ ${flags[$i]} == -DGGML_CUDA_FA_QUANTS=* ]] && unset 'flags[i]'; done
  flags=("${flags[@]}")
fi
flags+=("-DCMAKE_CUDA_ARCHITECTURES=90-real" "-DGGML_CUDA_NCCL=OFF")
if command -v ninja >/dev/null && [[ ! -f $work/build/CMakeCache.txt ]]; then
  flags+=("-G" "Ninja")
fi

if [[ ! -f $work/src/.unpacked ]]; then
  echo "unpacking $tarball"
  tar -xzf "$tarball" -C "$work/src" --wildcards '*/vendor/llama.cpp' \
    --exclude='*/vendor/llama.cpp/models' --exclude='*/vendor/llama.cpp/docs' \
    --exclude='*/vendor/llama.cpp/media' --exclude='*/vendor/llama.cpp/.git'
  touch "$work/src/.unpacked"
fi
source_dir=$(echo "$work"/src/*/vendor/llama.cpp)

fail() {  # step name, log file
  echo "FAILED: $1 (log $2); last lines:"
  tail -n 40 "$2"
  exit 1
}

echo "cmake configure: ${flags[*]}"
cmake -S "$source_dir" -B "$work/build" "${flags[@]}" >"$out/configure.log" 2>&1 ||
  fail "cmake configure" "$out/configure.log"

echo "cmake build llama-server with $(nproc) jobs (budget ${budget}s)"
started=$SECONDS
set +e
timeout "$budget" cmake --build "$work/build" --target llama-server --parallel "$(nproc)" \
  >>"$out/build.log" 2>&1
code=$?
set -e
echo "build ran $((SECONDS - started))s"
if [[ $code == 124 ]]; then
  grep -o '^\[ *[0-9]*%\]' "$out/build.log" | tail -n 1
  echo "INCOMPLETE: the build budget ran out; run the same command again now to resume."
  exit 3
fi
[[ $code == 0 ]] || fail "cmake build llama-server" "$out/build.log"

binary=$work/bin/llama-server
cp "$work/build/bin/llama-server" "$binary"
if ldd "$binary" | grep -q 'not found'; then
  export LD_LIBRARY_PATH=/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  echo "libraries not found by default; using LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
fi
ldd "$binary" | tee "$out/ldd.txt"
echo "binary: $binary"
"$binary" --version 2>&1 | tee "$out/version.txt"
"$binary" --list-devices 2>&1 | tee "$out/devices.txt"

[[ -n $gguf ]] || exit 0
start_once() {  # name, extra args...
  local name=$1 port=18080 pid
  shift
  "$binary" -m "$gguf" --host 127.0.0.1 --port $port -c 8192 -np 2 -ngl 99 --fit off \
    --log-verbosity 4 "$@" >"$out/startup-$name.log" 2>&1 &
  pid=$!
  for _ in $(seq 120); do
    if python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$port/health')" \
      2>/dev/null; then
      python3 -c "
import json, urllib.request as u
req = u.Request('http://127.0.0.1:$port/v1/completions', method='POST',
    data=json.dumps({'prompt': 'Hello', 'max_tokens': 8}).encode(),
    headers={'content-type': 'application/json'})
print('$name completion:', json.load(u.urlopen(req))['usage'])"
      break
    fi
    kill -0 $pid 2>/dev/null || break
    sleep 0.5
  done
  kill $pid 2>/dev/null || true
  wait $pid 2>/dev/null || true
  grep -E 'KV buffer size|llama_kv_cache: size|model buffer size|offloaded| E ' \
    "$out/startup-$name.log" || true
}
start_once f16 -fa on
start_once q8_0-q4_0 -fa on -ctk q8_0 -ctv q4_0
