#!/usr/bin/env bash
# The main job, on the embedded local datastore:
#  1. a disk image: back it up twice (the second run stores almost nothing),
#     change it, back it up again, restore the latest snapshot, compare;
#  2. a protected VM: build the tiny test VM, define it with a backup policy
#     in its domain XML, start it under libvirt, take a full and an
#     incremental backup while it runs, restore the latest snapshot to an
#     image and compare it bit for bit with the disk, restore it as a new
#     domain that boots, and live-restore it: a third domain boots from the
#     backup at once while its disk streams in; verify everything.
# Usage: scripts/demo.sh [WORKDIR]     (root, on a fresh Debian 12 machine)
# Set BULWARK_DEMO_NO_VM=1 to skip part 2.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/ensure-rust.sh
cargo build --release -q -p bulwark -p bulwark-hook -p bulwark-nbd
BW="$PWD/target/release/bulwark"
WORK="${1:-$(mktemp -d /tmp/bulwark-demo.XXXXXX)}"
mkdir -p "$WORK"
export BULWARK_REPO="$WORK/repo"
export BULWARK_PASSWORD="${BULWARK_PASSWORD:-demo passphrase}"
IMG="$WORK/tiny.raw"

echo "== test image $IMG (256 MiB: random, text, zeros and holes)"
rm -f "$IMG"; truncate -s 256M "$IMG"
head -c 64M /dev/urandom | dd of="$IMG" bs=1M seek=0 conv=notrunc status=none
# (yes dies of SIGPIPE once head has enough: not an error)
{ yes "bulwark demo: the quick brown fox jumps over the lazy dog" || true; } | head -c 64M \
    | dd of="$IMG" bs=1M seek=96 conv=notrunc status=none
dd if=/dev/zero of="$IMG" bs=1M seek=160 count=32 conv=notrunc status=none

[ -e "$BULWARK_REPO/config" ] || "$BW" repo init
echo "== backup 1 (full)";            "$BW" backup image "$IMG" --source tiny
echo "== backup 2 (unchanged)";       "$BW" backup image "$IMG" --source tiny
head -c 4M /dev/urandom | dd of="$IMG" bs=1M seek=200 conv=notrunc status=none
echo "== backup 3 (4 MiB changed)";   "$BW" backup image "$IMG" --source tiny
"$BW" snapshots
echo "== restore tiny@latest"
rm -f "$WORK/restored.raw"
"$BW" restore image tiny@latest --to "$WORK/restored.raw"
cmp "$IMG" "$WORK/restored.raw" && echo "restored image is bit-identical"

if [ -z "${BULWARK_DEMO_NO_VM:-}" ]; then
    echo "== part 2: a protected VM (installs qemu/libvirt if missing, starts libvirtd)"
    scripts/setup-test-host.sh
    vm-images/build "$PWD/target/vm-images" >/dev/null
    DOM="bulwark-demo-$$"
    VMDIR="$WORK/vm"; mkdir -p "$VMDIR"; chmod 755 "$WORK" "$VMDIR"
    cp --sparse=always target/vm-images/tiny.qcow2 "$VMDIR/disk.qcow2"
    cat > "$VMDIR/domain.xml" <<XML
<domain type='qemu'>
  <name>$DOM</name>
  <metadata>
    <bulwark:policies xmlns:bulwark="https://bulwark.dev/xmlns/libvirt/1">
      <bulwark:policy name="hourly"/>
    </bulwark:policies>
  </metadata>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>
  <on_poweroff>destroy</on_poweroff>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='$VMDIR/disk.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <serial type='file'><source path='$VMDIR/console.log'/><target port='0'/></serial>
    <memballoon model='none'/>
  </devices>
</domain>
XML
    NEW="$DOM-restored"
    LIVE="$DOM-live"
    cleanup() {
        for d in "$DOM" "$NEW" "$LIVE"; do
            virsh -q destroy "$d" >/dev/null 2>&1 || true
            virsh -q undefine "$d" --checkpoints-metadata >/dev/null 2>&1 || true
        done
    }
    trap cleanup EXIT
    virsh -q define "$VMDIR/domain.xml" >/dev/null
    virsh -q start "$DOM" >/dev/null
    for _ in $(seq 120); do grep -q "bulwark-guest: ready" "$VMDIR/console.log" 2>/dev/null && break; sleep 0.5; done
    grep "bulwark-guest: ready" "$VMDIR/console.log"
    export BULWARK_STATE_DIR="$WORK/state"
    echo "== backup vm $DOM (full, running)"; "$BW" backup vm "$DOM" --policy hourly
    virsh -q qemu-monitor-command "$DOM" --hmp \
        'qemu-io -d /machine/peripheral/virtio-disk0/virtio-backend "write -P 0xab 121M 256k"' >/dev/null
    virsh -q suspend "$DOM" >/dev/null   # so the reference copy matches the backup exactly
    qemu-img convert -U -O raw "$VMDIR/disk.qcow2" "$VMDIR/reference.raw"
    echo "== backup vm $DOM (incremental, 256 KiB written from the host)"; "$BW" backup vm "$DOM" --policy hourly
    virsh -q resume "$DOM" >/dev/null
    rm -f "$VMDIR/restored.raw"
    "$BW" restore image "$DOM@latest" --disk vda --to "$VMDIR/restored.raw"
    cmp "$VMDIR/reference.raw" "$VMDIR/restored.raw" && echo "restored VM disk is bit-identical"
    echo "== restore vm $DOM@latest as a new domain $NEW, started"
    rm -rf "$VMDIR/restored"
    "$BW" restore vm "$DOM@latest" --as "$NEW" --storage-dir "$VMDIR/restored" --start
    for _ in $(seq 120); do grep -q "bulwark-guest: ready" "$VMDIR/restored/$NEW-serial0.log" 2>/dev/null && break; sleep 0.5; done
    echo -n "$NEW booted: "; grep "bulwark-guest: ready" "$VMDIR/restored/$NEW-serial0.log"
    echo "$NEW: uuid $(virsh -q domuuid "$NEW"), source $DOM: uuid $(virsh -q domuuid "$DOM")"

    echo "== restore vm $DOM@latest --live as $LIVE: it boots from the backup while its disk streams in"
    rm -rf "$VMDIR/live"
    T0=$(date +%s%N)
    "$BW" restore vm "$DOM@latest" --as "$LIVE" --storage-dir "$VMDIR/live" --live --wait \
        --stream-mib-per-sec 16 &
    LIVE_PID=$!
    for _ in $(seq 240); do grep -q "bulwark-guest: ready" "$VMDIR/live/$LIVE-serial0.log" 2>/dev/null && break; sleep 0.25; done
    echo -n "$LIVE booted after $(( ($(date +%s%N) - T0) / 1000000 )) ms: "
    grep "bulwark-guest: ready" "$VMDIR/live/$LIVE-serial0.log"
    "$BW" restore status "$LIVE"
    wait "$LIVE_PID"
    "$BW" restore status "$LIVE"
    virsh -q destroy "$LIVE" >/dev/null
    qemu-img convert -O raw "$VMDIR/live/$LIVE-vda.qcow2" "$VMDIR/live.raw"
    echo "$LIVE: $(cmp -l "$VMDIR/reference.raw" "$VMDIR/live.raw" | awk '{print int(($1-1)/4096)}' | uniq | wc -l)" \
        "4 KiB blocks differ from the snapshot: what the guest wrote as it booted"
fi
echo "== verify"; "$BW" verify
"$BW" snapshots
echo "demo done: repository at $BULWARK_REPO"
