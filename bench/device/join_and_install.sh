#!/usr/bin/env bash
# On the device: join split wheels, check them, and install every wheel of the given
# folders into one target folder (no index, no dependencies: the folders hold exactly
# what the image lacks).
#
#   bench/device/join_and_install.sh TARGET DIR [DIR...]
#
# For each DIR/NAME.sha256, DIR/NAME.part1.. are joined into /tmp/kiban-joined/NAME and
# checked; a missing part or a wrong checksum stops with exit 1 naming the file. Then
# pip installs DIR/*.whl and the joined wheels into TARGET (add it to PYTHONPATH).
set -uo pipefail
target=${1:?usage: join_and_install.sh TARGET DIR [DIR...]}
shift
joined=/tmp/kiban-joined
mkdir -p "$joined"
wheels=()
for dir in "$@"; do
  for manifest in "$dir"/*.sha256; do
    [[ -e $manifest ]] || continue
    name=$(basename "$manifest" .sha256)
    manifest=$(realpath "$manifest")
    if [[ ! -f $joined/$name ]] || ! (cd "$joined" && sha256sum -c --status "$manifest" 2>/dev/null); then
      parts=$(find "$dir" -maxdepth 1 -name "$name.part*" | sort -V)
      [[ -n $parts ]] || { echo "no parts of $name in $dir"; exit 1; }
      # shellcheck disable=SC2086
      cat $parts >"$joined/$name"
    fi
    if ! (cd "$joined" && sha256sum -c --status "$manifest"); then
      echo "$name: checksum does not match (parts present: $(find "$dir" -maxdepth 1 -name "$name.part*" | sort -V | xargs -n1 basename | tr '\n' ' '))"
      exit 1
    fi
    wheels+=("$joined/$name")
  done
  for w in "$dir"/*.whl; do [[ -e $w ]] && wheels+=("$w"); done
done
((${#wheels[@]})) || { echo "no wheels in $*"; exit 1; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target "$target" "${wheels[@]}" || { echo "pip install into $target failed"; exit 1; }
echo "installed ${#wheels[@]} wheels into $target"
