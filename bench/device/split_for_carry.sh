#!/usr/bin/env bash
# Split a file too large for one device call into parts that ride in several calls.
#
#   bench/device/split_for_carry.sh FILE DEST_DIR MIB [MIB...]
#
# Writes DEST_DIR/NAME.part1, .part2, ... of the given sizes in MiB (the last part takes
# the rest) and DEST_DIR/NAME.sha256 (the whole file's checksum). Each call may carry
# any of the parts (carry names them one by one); a machine that stays warm keeps what
# earlier calls carried. bench/device/join_and_install.sh puts them back together on
# the device and checks the checksum before installing.
set -euo pipefail
file=${1:?usage: split_for_carry.sh FILE DEST_DIR MIB [MIB...]}
dest=${2:?usage: split_for_carry.sh FILE DEST_DIR MIB [MIB...]}
shift 2
name=$(basename "$file")
size=$(stat -c %s "$file")
mkdir -p "$dest"
rm -f "$dest/$name".part*
offset=0
part=0
for mib in "$@" 0; do
  ((offset < size)) || break
  part=$((part + 1))
  bytes=$((mib * 1024 * 1024))
  ((mib == 0 || offset + bytes > size)) && bytes=$((size - offset))
  dd if="$file" of="$dest/$name.part$part" iflag=skip_bytes,count_bytes skip="$offset" \
    count="$bytes" bs=4M status=none
  offset=$((offset + bytes))
done
((offset == size)) || { echo "sizes cover $offset of $size bytes" >&2; exit 1; }
(cd "$(dirname "$file")" && sha256sum "$name") >"$dest/$name.sha256"
ls -l "$dest/$name".part* "$dest/$name.sha256"
