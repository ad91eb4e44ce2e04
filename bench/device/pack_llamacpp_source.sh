#!/usr/bin/env bash
# Fetch the llama-cpp-python sdist pinned in src/kiban/engines/llamacpp.py and repack only the
# llama.cpp sources that build llama-server (about 11 MB instead of 76 MB), so that they
# fit in a device call (64 MiB) for bench/device/build_llamacpp_cuda.sh.
#
#   bench/device/pack_llamacpp_source.sh DEST_DIR      # prints the tarball's path
set -euo pipefail
dest=$(realpath "${1:?usage: pack_llamacpp_source.sh DEST_DIR}")
cd "$(dirname "$0")/../.."
py=.venv/bin/python; [[ -x $py ]] || py=python3  # kiban's imports need its dependencies
version=$(PYTHONPATH=src "$py" -c \
  'from kiban.engines.llamacpp import LLAMA_CPP_PYTHON_VERSION as v; print(v)')
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$py" -m pip download --no-binary :all: --no-deps --dest "$tmp" \
  "llama-cpp-python==$version" >&2
top=llama_cpp_python-$version
tar -xzf "$tmp/$top.tar.gz" -C "$tmp" \
  --exclude="$top/vendor/llama.cpp/models" --exclude="$top/vendor/llama.cpp/docs" \
  --exclude="$top/vendor/llama.cpp/media" --exclude="$top/vendor/llama.cpp/.git" \
  "$top/vendor/llama.cpp"
mkdir -p "$dest"
tar -czf "$dest/$top-llama.cpp.tar.gz" -C "$tmp" "$top"
echo "$dest/$top-llama.cpp.tar.gz"
