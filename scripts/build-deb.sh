#!/usr/bin/env bash
# Builds the host package: bulwark_VERSION_ARCH.deb with the CLI/agent, the
# NBD server, the libvirt hook, the agent's systemd unit and the docs.
#
# Usage: scripts/build-deb.sh [--profile release|dev] [--out DIR] [--no-build]
#                             [--compression xz|zstd|gzip|none]
#   --profile      cargo profile to build (and take binaries from); default release
#   --out          where the .deb goes; default target/deb
#   --no-build     package binaries already built for that profile
#   --compression  dpkg-deb -Z; default xz (none for quick test packages)
# Honours $CARGO_TARGET_DIR. Prints the path of the .deb on stdout.
#
# Nothing is shipped under /etc/bulwark: dpkg would own those files, and on
# upgrade or purge treat the operator's configuration and secrets as its
# own. The config examples go to /usr/share/doc/bulwark/; postinst only
# creates /etc/bulwark (0700) when it is missing. The one file under /etc
# is the hook symlink, which dpkg replaces atomically on upgrade.
set -euo pipefail

log() { printf 'build-deb: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

profile=release
out=
build=1
compression=xz
while [ $# -gt 0 ]; do
    case "$1" in
        --profile) profile=${2:?--profile needs release or dev}; shift 2 ;;
        --out) out=${2:?--out needs a directory}; shift 2 ;;
        --no-build) build=0; shift ;;
        --compression) compression=${2:?--compression needs a type}; shift 2 ;;
        -h|--help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument: $1" ;;
    esac
done
# Paths given relative to the caller's directory, the rest to the repo.
absolute() { case "$1" in /*) printf '%s' "$1" ;; *) printf '%s/%s' "$PWD" "$1" ;; esac; }
[ -z "$out" ] || out=$(absolute "$out")
[ -z "${CARGO_TARGET_DIR:-}" ] || export CARGO_TARGET_DIR="$(absolute "$CARGO_TARGET_DIR")"
cd "$(dirname "$0")/.."
out=${out:-$PWD/target/deb}
case "$profile" in
    release) subdir=release ;;
    dev) subdir=debug ;;
    *) die "--profile must be release or dev, not $profile" ;;
esac
for tool in dpkg-deb dpkg-shlibdeps; do
    command -v "$tool" >/dev/null || die "$tool not found (apt-get install dpkg-dev)"
done

target=${CARGO_TARGET_DIR:-target}
bins="$target/$subdir"
if [ "$build" = 1 ]; then
    log "cargo build --profile $profile"
    cargo build --profile "$profile" -p bulwark -p bulwark-nbd -p bulwark-hook --bins >&2
fi
for b in bulwark bulwark-nbd bulwark-hook; do
    [ -x "$bins/$b" ] || die "$bins/$b missing: build it first or drop --no-build"
done

# The workspace version, from [workspace.package].
version=$(sed -n '/^\[workspace.package\]/,/^\[/ s/^version *= *"\(.*\)"/\1/p' Cargo.toml)
[ -n "$version" ] || die "no version in Cargo.toml [workspace.package]"
arch=$(dpkg --print-architecture)

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
root="$stage/root"
doc="$root/usr/share/doc/bulwark"
install -d -m 0755 "$root/DEBIAN" "$root/usr/bin" "$root/usr/lib/bulwark" \
    "$root/lib/systemd/system" "$root/etc/libvirt/hooks/qemu.d" "$doc"
install -m 0755 "$bins/bulwark" "$bins/bulwark-nbd" "$root/usr/bin/"
install -m 0755 "$bins/bulwark-hook" "$root/usr/lib/bulwark/"
# A link, not a copy: dpkg renames the new binary into place, so libvirt
# never runs a half-written hook, and upgrades update the hook too.
ln -s /usr/lib/bulwark/bulwark-hook "$root/etc/libvirt/hooks/qemu.d/bulwark"
install -m 0644 systemd/bulwark-agent.service "$root/lib/systemd/system/"
install -m 0644 README.md docs/vm.md docs/gc.md docs/s3.md "$doc/"
install -m 0644 bulwark-nbd/README.md "$doc/nbd.md"
install -m 0644 libvirt-hooks/agent.toml.example libvirt-hooks/hook.conf "$doc/"
cat > "$doc/copyright" <<'EOF'
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: bulwark

Files: *
License: AGPL-3.0-or-later
EOF
chmod 0644 "$doc/copyright"
install -m 0755 scripts/deb/postinst scripts/deb/prerm scripts/deb/postrm "$root/DEBIAN/"

# Shared-library dependencies of the binaries (libc6, libvirt0, ...), as
# the installed libraries' symbols files say. dpkg-shlibdeps insists on a
# debian/control; a minimal one in a scratch dir is enough.
mkdir -p "$stage/src/debian"
printf 'Source: bulwark\n\nPackage: bulwark\nArchitecture: any\n' > "$stage/src/debian/control"
if ! shlibdeps=$(cd "$stage/src" && dpkg-shlibdeps -O \
    -e"$root/usr/bin/bulwark" -e"$root/usr/bin/bulwark-nbd" -e"$root/usr/lib/bulwark/bulwark-hook" \
    2>"$stage/shlibdeps.err"); then
    cat "$stage/shlibdeps.err" >&2
    die "dpkg-shlibdeps failed"
fi
shlibs=$(printf '%s\n' "$shlibdeps" | sed -n 's/^shlibs:Depends=//p')
[ -n "$shlibs" ] || die "dpkg-shlibdeps found no dependencies"

installed_size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
cat > "$root/DEBIAN/control" <<EOF
Package: bulwark
Version: $version
Architecture: $arch
Maintainer: ${BULWARK_DEB_MAINTAINER:-Bulwark developers <root@localhost>}
Installed-Size: $installed_size
Depends: $shlibs, qemu-utils
Recommends: libvirt-daemon-system, fuse3
Section: admin
Priority: optional
Description: backup and instant restore for QEMU/libvirt VMs
 Bulwark backs up libvirt VMs at block level (incremental through dirty
 bitmaps) into an encrypted, deduplicated repository in a directory or an
 S3 bucket, and restores them: full restores, live restores that boot at
 once from the snapshot over NBD, and snapshots mounted as image files.
 .
 This package holds the CLI and agent (bulwark), the NBD server
 (bulwark-nbd), the libvirt qemu hook and the agent's systemd unit.
EOF

mkdir -p "$out"
deb="$out/bulwark_${version}_${arch}.deb"
dpkg-deb --build --root-owner-group -Z"$compression" "$root" "$deb" >&2
echo "$deb"
