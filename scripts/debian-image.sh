#!/usr/bin/env bash
# Builds a bootable Debian 12 (bookworm) guest disk for drills and benchmarks:
# a real distribution (systemd, initramfs-tools, udev, the guest agent) where
# vm-images/build makes a tiny busybox guest.
#
#   scripts/debian-image.sh OUTDIR        (root)
#
# writes
#   OUTDIR/debian.raw     4 GiB raw disk: MBR + extlinux, ext4 vda1 at 1 MiB..4 GiB
#   OUTDIR/debian.qcow2   the same disk, qcow2 v3 (compat=1.1: persistent bitmaps)
#   OUTDIR/debian.env     facts: sizes, kernel, command line, build time
#
# The guest: `debootstrap --variant=minbase` plus linux-image-cloud-amd64,
# systemd-sysv, udev, qemu-guest-agent (started by udev when its virtio port
# appears), kernel command line `console=ttyS0`, a serial getty on ttyS0 (a
# `login:` prompt on the serial console), root password locked, no network.
#
# Like vm-images/build: the root filesystem is made with `mke2fs -d` from
# the debootstrap tree, the kernel and initrd are copied in through one loop
# mount (syslinux cannot load sparse files) where extlinux installs, and the
# disk is assembled at offsets with sfdisk and dd: no partition devices, no
# device-mapper.
#
# Cached: OUTDIR/.debian.stamp holds a hash of this script and the mirror;
# when it matches and both disks exist, nothing is done. Debootstrap keeps
# its downloaded packages in OUTDIR/.debootstrap-cache for rebuilds.
# Env: DEBIAN_MIRROR (default http://deb.debian.org/debian).
set -euo pipefail

die() { printf 'debian-image: error: %s\n' "$*" >&2; exit 1; }
log() { printf 'debian-image: %s\n' "$*" >&2; }

[ $# -eq 1 ] || die "usage: $0 OUTDIR"
[ "$(id -u)" -eq 0 ] || die "must run as root (debootstrap, a loop mount for extlinux)"

SELF=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")
mkdir -p "$1"
OUT=$(cd "$1" && pwd)

SUITE=bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
DISK_MIB=4096
PART_START_MIB=1
INCLUDE=linux-image-cloud-amd64,systemd-sysv,udev,kmod,initramfs-tools,e2fsprogs,dbus,qemu-guest-agent
CMDLINE="root=/dev/vda1 ro console=ttyS0"
HOST_PACKAGES=(debootstrap extlinux syslinux-common e2fsprogs fdisk qemu-utils)

# Serialise concurrent builds into the same OUTDIR.
exec 9>"$OUT/.debian.lock"
flock 9

KEY=$( {
    sha256sum <"$SELF"
    echo "$SUITE $MIRROR $DISK_MIB $INCLUDE $CMDLINE"
} | sha256sum | cut -c1-32)
STAMP="$OUT/.debian.stamp"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$KEY" ] &&
    [ -f "$OUT/debian.raw" ] && [ -f "$OUT/debian.qcow2" ]; then
    log "cached ($KEY) in $OUT"
    exit 0
fi

install_host_packages() {
    local missing=() p
    for p in "${HOST_PACKAGES[@]}"; do
        dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null | grep -qx installed ||
            missing+=("$p")
    done
    [ "${#missing[@]}" -eq 0 ] && return 0
    log "installing host packages: ${missing[*]}"
    apt-get install -y -qq "${missing[@]}" >/dev/null 2>&1 ||
        { apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null; } ||
        die "apt-get install ${missing[*]} failed"
}
install_host_packages

START=$(date +%s.%N)
log "building $KEY into $OUT (Debian $SUITE from $MIRROR)"
WORK=$(mktemp -d "$OUT/.work.XXXXXX")
MNT=""
LOOP=""
# Debootstrap can leave its proc/sys mounts in the tree.
unmount_under() {
    awk -v w="$1/" 'index($2, w) == 1 {print $2}' /proc/mounts | sort -r |
        while read -r m; do umount -l "$m"; done
}
cleanup() {
    unmount_under "$WORK" 2>/dev/null || true
    if [ -n "$LOOP" ]; then losetup -d "$LOOP" 2>/dev/null || true; fi
    rm -rf "$WORK"
}
trap cleanup EXIT
R="$WORK/root"

bootstrap() {
    mkdir -p "$OUT/.debootstrap-cache"
    debootstrap --variant=minbase --include="$INCLUDE" \
        --cache-dir="$OUT/.debootstrap-cache" "$SUITE" "$R" "$MIRROR" \
        >"$WORK/debootstrap.log" 2>&1 ||
        { tail -n 30 "$WORK/debootstrap.log" >&2; die "debootstrap failed"; }
}

configure_guest() {
    echo bulwark-debian >"$R/etc/hostname"
    printf '127.0.0.1 localhost\n127.0.1.1 bulwark-debian\n' >"$R/etc/hosts"
    echo '/dev/vda1 / ext4 errors=remount-ro 0 1' >"$R/etc/fstab"
    chroot "$R" passwd -l root >/dev/null
    # The getty generator starts it too (console=ttyS0); enabled explicitly
    # so the prompt does not hang on the command line alone.
    mkdir -p "$R/etc/systemd/system/getty.target.wants"
    ln -sf /lib/systemd/system/serial-getty@.service \
        "$R/etc/systemd/system/getty.target.wants/serial-getty@ttyS0.service"
    # qemu-guest-agent has no [Install]: udev starts it when the virtio port
    # org.qemu.guest_agent.0 appears. Check that the rule is there.
    grep -rqs 'qemu-guest-agent' "$R/lib/udev/rules.d/" ||
        die "qemu-guest-agent's udev rule is missing"
    # Each clone gets its own machine id at first boot.
    : >"$R/etc/machine-id"
    rm -f "$R/var/lib/dbus/machine-id"
    chroot "$R" apt-get clean
    rm -rf "$R"/var/lib/apt/lists/* "$R"/var/log/*.log "$R"/var/cache/debconf/*-old
}

# The kernel and initrd leave the tree: they go in through the mount.
KVER=""
take_boot_files() {
    local k
    k=$(find "$R/boot" -maxdepth 1 -name 'vmlinuz-*' | sort | tail -n1)
    [ -n "$k" ] || die "no kernel in the guest's /boot"
    KVER=${k##*/vmlinuz-}
    [ -f "$R/boot/initrd.img-$KVER" ] || die "no initrd for $KVER"
    mkdir -p "$WORK/boot"
    mv "$R/boot/vmlinuz-$KVER" "$WORK/boot/vmlinuz"
    mv "$R/boot/initrd.img-$KVER" "$WORK/boot/initrd.img"
    rm -rf "${R:?}/boot"/* "$R/vmlinuz" "$R/vmlinuz.old" "$R/initrd.img" "$R/initrd.img.old"
    mkdir -p "$R/boot/extlinux"
    cat >"$R/boot/extlinux/extlinux.conf" <<CONF
SERIAL 0 115200
DEFAULT debian
PROMPT 0
TIMEOUT 0
LABEL debian
  LINUX /boot/vmlinuz
  INITRD /boot/initrd.img
  APPEND $CMDLINE
CONF
}

make_partition() {
    unmount_under "$R"
    local bytes=$(((DISK_MIB - PART_START_MIB) * 1024 * 1024))
    truncate -s "$bytes" "$WORK/part.img"
    # extlinux 6.04 cannot read ext4's 64bit feature: leave it off.
    mke2fs -q -F -t ext4 -O ^64bit -L debian-root -E root_owner=0:0 -d "$R" \
        "$WORK/part.img" >/dev/null
    MNT="$WORK/mnt"
    mkdir -p "$MNT"
    LOOP=$(losetup -f --show "$WORK/part.img")
    mount -t ext4 "$LOOP" "$MNT"
    cp --sparse=never "$WORK/boot/vmlinuz" "$MNT/boot/vmlinuz"
    cp --sparse=never "$WORK/boot/initrd.img" "$MNT/boot/initrd.img"
    sync
    extlinux --install "$MNT/boot/extlinux" >/dev/null 2>&1 || die "extlinux --install failed"
    umount "$MNT"
    losetup -d "$LOOP"
    LOOP=""
}

assemble_disk() {
    local mbr="" m
    for m in /usr/lib/EXTLINUX/mbr.bin /usr/lib/syslinux/mbr/mbr.bin; do
        if [ -f "$m" ]; then mbr=$m; break; fi
    done
    [ -n "$mbr" ] || die "no syslinux mbr.bin (install extlinux syslinux-common)"
    truncate -s "$((DISK_MIB * 1024 * 1024))" "$WORK/debian.raw"
    printf 'label: dos\nlabel-id: 0xb01fdeb1\nstart=%d, type=83, bootable\n' \
        "$((PART_START_MIB * 2048))" | sfdisk -q "$WORK/debian.raw" >/dev/null
    dd if="$mbr" of="$WORK/debian.raw" bs=440 count=1 conv=notrunc status=none
    dd if="$WORK/part.img" of="$WORK/debian.raw" bs=1M seek="$PART_START_MIB" \
        conv=notrunc,sparse status=none
    qemu-img convert -f raw -O qcow2 -o compat=1.1 "$WORK/debian.raw" "$WORK/debian.qcow2"
}

bootstrap
configure_guest
take_boot_files
make_partition
assemble_disk

END=$(date +%s.%N)
SECS=$(awk "BEGIN {printf \"%.1f\", $END - $START}")
RAW_ALLOC=$(($(stat -c %b "$WORK/debian.raw") * 512))
QCOW_BYTES=$(stat -c %s "$WORK/debian.qcow2")
cat >"$WORK/debian.env" <<ENV
KEY=$KEY
SUITE=$SUITE
DISK_SIZE=$((DISK_MIB * 1024 * 1024))
PARTITION_OFFSET=$((PART_START_MIB * 1024 * 1024))
ROOT_DEVICE=/dev/vda1
CMDLINE=$CMDLINE
KERNEL=$KVER
DATA_BYTES=$RAW_ALLOC
BUILD_SECONDS=$SECS
ENV
rm -f "$STAMP"
for f in debian.raw debian.qcow2 debian.env; do mv -f "$WORK/$f" "$OUT/$f"; done
echo "$KEY" >"$STAMP"
log "built in $SECS s: $OUT/debian.raw, $OUT/debian.qcow2 (kernel $KVER)"
log "data: $RAW_ALLOC bytes allocated in the raw disk ($((RAW_ALLOC >> 20)) MiB of $DISK_MIB MiB), qcow2 file $QCOW_BYTES bytes"
