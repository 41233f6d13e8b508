#!/usr/bin/env bash
# Writes the benchmarks' mixed image: SIZE_MIB (default 1024) of 30% random,
# 40% zeros (written out, not holes), 30% text, in 64 MiB stripes.
# Usage: scripts/mixed-image.sh FILE [SIZE_MIB]
set -euo pipefail
out=$1; size=${2:-1024}
[ -f "$out" ] && [ "$(stat -c %s "$out")" -eq $((size << 20)) ] && exit 0
rm -f "$out"
python3 - "$out" "$size" <<'PY'
import os, random, sys
out, size = sys.argv[1], int(sys.argv[2])
rnd = random.Random(1)
words = b"the backup of virtual machine disk block chunk restore snapshot 2026-11-23 INFO error=0\n".split(b" ")
stripe = 1 << 20
with open(out, "wb") as f:
    for i in range(size):
        k = i % 10
        if k < 3:
            f.write(os.urandom(stripe))
        elif k < 7:
            f.write(bytes(stripe))
        else:
            buf = bytearray()
            while len(buf) < stripe:
                buf += rnd.choice(words) + b" "
            f.write(bytes(buf[:stripe]))
PY
