#!/usr/bin/env bash
# `bulwark restore vm` of a stopped VM with a 1 GiB disk (the mixed image as
# qcow2) against `bulwark restore image` of the same disk: three rounds,
# the order rotated, medians; local repository (its files in the page cache
# for every row); the VM restores write the disks only (--disks-only: the
# same path, without the define, so the rounds can reuse the names).
# Usage: scripts/bench-restore-vm.sh [WORKDIR]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/ensure-rust.sh
cargo build --release -q -p bulwark 2>/dev/null
BW=$PWD/target/release/bulwark
W=${1:-/tmp/bulwark-bench-restore-vm}; rm -rf "$W"; mkdir -p "$W"; chmod 755 "$W"
export BULWARK_REPO=$W/repo BULWARK_PASSWORD=bench BULWARK_STATE_DIR=$W/state
scripts/mixed-image.sh /tmp/bulwark-mixed-1g.raw 1024
qemu-img convert -f raw -O qcow2 /tmp/bulwark-mixed-1g.raw "$W/disk.qcow2"
DOM=bw-bench-$$
cat > "$W/dom.xml" <<XML
<domain type='qemu'><name>$DOM</name><memory unit='MiB'>128</memory>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
    <source file='$W/disk.qcow2'/><target dev='vda' bus='virtio'/></disk></devices></domain>
XML
cleanup() { for d in "$DOM" "$DOM-q" "$DOM-r"; do virsh -q undefine "$d" --checkpoints-metadata >/dev/null 2>&1 || true; done; }
trap cleanup EXIT
virsh -q define "$W/dom.xml" >/dev/null
"$BW" repo init >/dev/null
"$BW" backup vm "$DOM" >/dev/null
# Wall time of the command; the command's own figure (its data phase: after
# the key derivation and, for restore vm, the libvirt look-ups) goes to $W/own.
t() { local s e k=$1; shift; sync; s=$(date +%s.%N); "$@" --json >"$W/out.json"; e=$(date +%s.%N); echo "$e - $s" | bc;
      python3 -c 'import json,sys; v=json.load(open(sys.argv[1])); v=v[0] if isinstance(v,list) else v; print(v["seconds"])' "$W/out.json" >>"$W/own-$k"; }
rate() { echo "scale=0; 1024 / $1" | bc; }
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
# Each run pays for freeing the previous run's output pages: the order
# rotates each round and the medians are compared.
img_t=(); raw_t=(); qcow_t=()
run() {
    case $1 in
    img) rm -f "$W/image.raw"; img_t+=("$(t img "$BW" restore image "$DOM@latest" --to "$W/image.raw")") ;;
    raw) rm -rf "$W/r"; raw_t+=("$(t raw "$BW" restore vm "$DOM@latest" --as "$DOM-r" --storage-dir "$W/r" --format raw --disks-only)") ;;
    qcow) rm -rf "$W/q"; qcow_t+=("$(t qcow "$BW" restore vm "$DOM@latest" --as "$DOM-q" --storage-dir "$W/q" --disks-only)") ;;
    esac
}
for round in 1 2 3; do
    case $round in
    1) order="img raw qcow" ;; 2) order="raw qcow img" ;; 3) order="qcow img raw" ;;
    esac
    for x in $order; do run "$x"; done
done
img=$(median "${img_t[@]}"); raw=$(median "${raw_t[@]}"); qcow=$(median "${qcow_t[@]}")
echo "medians of 3 rounds, order rotated (img: ${img_t[*]}; raw: ${raw_t[*]}; qcow2: ${qcow_t[*]})"
printf '%-34s %7s s %6s MiB/s\n' "restore image (raw file)" "$img" "$(rate "$img")"
printf '%-34s %7s s %6s MiB/s  %s x restore image\n' "restore vm --format raw" "$raw" "$(rate "$raw")" "$(echo "scale=2; $img / $raw" | bc)"
printf '%-34s %7s s %6s MiB/s  %s x restore image\n' "restore vm (qcow2)" "$qcow" "$(rate "$qcow")" "$(echo "scale=2; $img / $qcow" | bc)"
own() { median $(cat "$W/own-$1"); }
oi=$(own img); orw=$(own raw); oq=$(own qcow)
echo "the commands' own data-phase seconds (medians): image $oi, vm raw $orw ($(echo "scale=2; $oi / $orw" | bc) x), vm qcow2 $oq ($(echo "scale=2; $oi / $oq" | bc) x)"
qemu-img compare -q "$W/q/$DOM-q-vda.qcow2" "$W/image.raw" && cmp -s "$W/r/$DOM-r-vda.raw" "$W/image.raw" && echo "all three identical"
