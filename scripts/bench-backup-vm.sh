#!/usr/bin/env bash
# Incremental backups of a running test VM, two bulwark binaries side by
# side: before each backup 1 MiB is written into the VM from the host, and
# the binaries take turns on the same VM, repository and checkpoint chain.
# Prints each binary's median wall time and B/A.
# Usage: scripts/bench-backup-vm.sh BIN_A [BIN_B]   (root; N=7 rounds by default)
set -euo pipefail
cd "$(dirname "$0")/.."
A=$(realpath "${1:?usage: $0 BIN_A [BIN_B]}"); B=$(realpath "${2:-$1}"); N=${N:-7}
[ -e target/vm-images/tiny.qcow2 ] || vm-images/build "$PWD/target/vm-images" >/dev/null
WORK=$(mktemp -d /tmp/bw-bench-vm.XXXXXX); chmod 755 "$WORK"
DOM="bw-bench-$$"
cleanup() { virsh -q destroy "$DOM" >/dev/null 2>&1 || true
            virsh -q undefine "$DOM" --checkpoints-metadata >/dev/null 2>&1 || true
            rm -rf "$WORK"; }
trap cleanup EXIT
cp --sparse=always target/vm-images/tiny.qcow2 "$WORK/disk.qcow2"
cat > "$WORK/domain.xml" <<XML
<domain type='qemu'><name>$DOM</name><memory unit='MiB'>256</memory><vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>
  <devices><emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
      <source file='$WORK/disk.qcow2'/><target dev='vda' bus='virtio'/></disk>
    <serial type='file'><source path='$WORK/console.log'/><target port='0'/></serial>
    <memballoon model='none'/></devices></domain>
XML
virsh -q define "$WORK/domain.xml" >/dev/null
virsh -q start "$DOM" >/dev/null
for _ in $(seq 240); do grep -q "bulwark-guest: ready" "$WORK/console.log" 2>/dev/null && break; sleep 0.5; done
export BULWARK_REPO="$WORK/repo" BULWARK_PASSWORD=bench BULWARK_STATE_DIR="$WORK/state"
"$A" repo init >/dev/null
"$A" backup vm "$DOM" >/dev/null
ta=(); tb=()
for i in $(seq "$N"); do
    for which in A B; do
        bin=$A; [ "$which" = B ] && bin=$B
        off=$(( (120 + (i % 7)) * 1024 * 1024 ))
        virsh -q qemu-monitor-command "$DOM" --hmp \
            "qemu-io -d /machine/peripheral/virtio-disk0/virtio-backend \"write -P $i $off 1M\"" >/dev/null
        t0=$(date +%s%N)
        mode=$("$bin" backup vm "$DOM" --json | sed -n 's/.*"mode":"\([a-z]*\)".*/\1/p' | head -1)
        ms=$(( ($(date +%s%N) - t0) / 1000000 ))
        [ "$mode" = incremental ] || { echo "backup $i ($which) was $mode" >&2; exit 1; }
        if [ "$which" = A ]; then ta+=("$ms"); else tb+=("$ms"); fi
    done
done
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
ma=$(median "${ta[@]}"); mb=$(median "${tb[@]}")
echo "A $A: ${ta[*]} ms, median $ma ms"
echo "B $B: ${tb[*]} ms, median $mb ms"
awk -v a="$ma" -v b="$mb" 'BEGIN { printf "B/A = %.2f\n", b / a }'
