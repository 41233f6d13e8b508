#!/usr/bin/env bash
# Prepare a Debian 12 host (as root) for Bulwark's test suite:
#  - installs every system package the project's tests need (idempotent; apt
#    is only touched when something is missing),
#  - prepares and starts libvirtd/virtlogd without systemd (never restarts a
#    running daemon).
# Safe to run again; quick when everything is already in place.
set -euo pipefail

log() { printf 'setup-test-host: %s\n' "$*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
    log "must run as root"
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive

# qemu-system-x86 and qemu-utils must be installed in the same apt-get call:
# Debian 12's qemu-system-x86 (7.2) otherwise conflicts with a newer
# preinstalled qemu-utils.
PACKAGES=(
    qemu-system-x86 qemu-utils
    libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients libvirt-dev pkg-config
    busybox-static extlinux syslinux-common e2fsprogs fdisk
    libnbd-bin nbdkit fuse3  # nbdfuse ships in libnbd-bin on Debian 12
    restic python3-aiosmtpd
    mount util-linux coreutils gzip cpio xz-utils zstd
    dpkg-dev  # package test: dpkg-shlibdeps (systemctl, systemd-analyze used if present)
    chromium chromium-driver  # dashboard browser tests (headless, WebDriver)
    lintian man-db zsh fish  # package test: lintian, `man -l`, completion scripts
    radosgw ceph-mon ceph-osd ceph-common curl  # scripts/s3-lock-server.sh: S3 with Object Lock
    xfsprogs dosfstools mtools ntfs-3g lvm2  # bulwark files tests: real filesystem images
    btrfs-progs  # a restore onto a compressed btrfs
    acl attr libcap2-bin  # file backup tests: setfacl, setfattr, setcap
)

# One dpkg-query for all packages; anything not listed as installed is missing.
installed=" $( (dpkg-query -W -f='${Package} ${db:Status-Status}\n' "${PACKAGES[@]}" 2>/dev/null || true) |
    awk '$2 == "installed" {printf "%s ", $1}') "
missing=()
for p in "${PACKAGES[@]}"; do
    case "$installed" in
        *" $p "*) ;;
        *) missing+=("$p") ;;
    esac
done

if [ "${#missing[@]}" -gt 0 ]; then
    log "installing: ${missing[*]}"
    apt-get update -qq
    # Install the qemu pair together, at the same version, whenever either is
    # missing: a newer preinstalled qemu-utils (e.g. a 10.x backport) breaks
    # qemu-system-common 7.2 and must be replaced by the matching version.
    need_qemu=0
    rest=()
    for p in "${missing[@]}"; do
        case "$p" in
            qemu-system-x86|qemu-utils) need_qemu=1 ;;
            *) rest+=("$p") ;;
        esac
    done
    missing=("${rest[@]}")
    if [ "$need_qemu" = 1 ]; then
        qv=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ {print $2}')
        if [ -z "$qv" ] || [ "$qv" = "(none)" ]; then
            log "no installable qemu-system-x86 candidate"
            exit 1
        fi
        missing+=("qemu-system-x86=$qv" "qemu-utils=$qv")
    fi
    # Don't let package maintainer scripts start services (no systemd here).
    policy=/usr/sbin/policy-rc.d
    created_policy=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' > "$policy"
        chmod +x "$policy"
        created_policy=1
    fi
    rc=0
    apt-get install -y -qq --no-install-recommends \
        --allow-downgrades \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
        "${missing[@]}" >/dev/null || rc=$?
    if [ "$created_policy" = 1 ]; then rm -f "$policy"; fi
    if [ "$rc" -ne 0 ]; then
        log "apt-get install failed ($rc)"
        exit "$rc"
    fi
else
    log "all packages already installed"
fi

# ---- libvirt without systemd -------------------------------------------------
mkdir -p /var/log/libvirt/qemu /var/run/libvirt /var/lib/libvirt/qemu \
    /var/cache/libvirt /var/lib/libvirt/images

# Run QEMU as root: test images live in arbitrary temp dirs.
qemu_conf=/etc/libvirt/qemu.conf
if [ -f "$qemu_conf" ] && ! grep -q '^# bulwark-test-host' "$qemu_conf"; then
    cat >> "$qemu_conf" <<'CONF'
# bulwark-test-host: QEMU runs as root so tests can use images anywhere.
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
CONF
    log "configured $qemu_conf"
fi

# FUSE for non-root helpers (nbdfuse, bulwark mount) if needed.
if [ -f /etc/fuse.conf ] && ! grep -q '^user_allow_other' /etc/fuse.conf; then
    echo user_allow_other >> /etc/fuse.conf
fi

# Is a process with this exact name running? (No procps needed.)
running() {
    local c n
    for c in /proc/[0-9]*/comm; do
        n=""
        { read -r n <"$c"; } 2>/dev/null || true
        [ "$n" = "$1" ] && return 0
    done
    return 1
}

# libvirtd looks for hook scripts only when it starts: put Bulwark's qemu
# hook in place first (a no-op placeholder until `bulwark hook install`
# replaces it with bulwark-hook), so a libvirtd started here runs it.
hookdir=/etc/libvirt/hooks/qemu.d
if [ ! -e "$hookdir/bulwark" ]; then
    mkdir -p "$hookdir"
    printf '#!/bin/sh\n# placeholder: bulwark hook install replaces this\nexit 0\n' > "$hookdir/bulwark"
    chmod 755 "$hookdir/bulwark"
    running libvirtd && log "installed $hookdir/bulwark; libvirtd runs already: it loads hooks at its next start"
fi

# Never restart a daemon that runs already (whoever started it).
if ! running virtlogd; then
    log "starting virtlogd"
    virtlogd -d
fi
if ! running libvirtd; then
    log "starting libvirtd"
    libvirtd -d
fi

# Wait until libvirtd answers.
for _ in $(seq 1 100); do
    if virsh -c qemu:///system version >/dev/null 2>&1; then
        log "libvirtd ready"
        exit 0
    fi
    sleep 0.1
done
log "libvirtd did not answer on qemu:///system"
exit 1
