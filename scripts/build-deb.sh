#!/usr/bin/env bash
# Builds the host packages:
#  - bulwark_VERSION_ARCH.deb: the CLI/agent, the NBD server, the libvirt
#    hook and the agent's systemd unit, stripped; man pages and bash, zsh
#    and fish completions (generated from the clap definitions by
#    bulwark-docgen), docs, changelog, a DEP-5 copyright file listing the
#    licences of every crate linked in;
#  - bulwark-dbgsym_VERSION_ARCH.deb: the binaries' debug symbols, by build
#    id under /usr/lib/debug/.build-id (where gdb and debuginfod look).
# VERSION is the latest entry of scripts/deb/changelog; its upstream part
# must be the workspace version. The Maintainer is the workspace's authors.
#
# Usage: scripts/build-deb.sh [--profile release|dev] [--out DIR] [--no-build]
#                             [--compression xz|gzip|none]
#   --profile      cargo profile to build (and take binaries from); default release
#   --out          where the packages go; default target/deb
#   --no-build     package binaries already built for that profile
#   --compression  dpkg-deb -Z; default xz (lintian rejects zstd and none)
# Honours $CARGO_TARGET_DIR. Prints the paths of the two packages on
# stdout, bulwark's first. Needs cargo, dpkg-dev and binutils.
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
        -h|--help) sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
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
for tool in cargo dpkg-deb dpkg-shlibdeps dpkg-parsechangelog objcopy strip readelf; do
    command -v "$tool" >/dev/null || die "$tool not found (apt-get install dpkg-dev binutils)"
done

bins="${CARGO_TARGET_DIR:-target}/$subdir"
shipped=(usr/bin/bulwark usr/bin/bulwark-nbd usr/lib/bulwark/bulwark-hook)
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
root="$stage/root"
dbgroot="$stage/dbgsym"
doc="$root/usr/share/doc/bulwark"

# Binaries for the profile (bulwark-docgen writes the generated files).
build() {
    if [ "$build" = 1 ]; then
        log "cargo build --profile $profile"
        cargo build --profile "$profile" -p bulwark -p bulwark-nbd -p bulwark-hook \
            -p bulwark-docgen --bins >&2
    fi
    for b in bulwark bulwark-nbd bulwark-hook bulwark-docgen; do
        [ -x "$bins/$b" ] || die "$bins/$b missing: build it first or drop --no-build"
    done
}

# The package version from the changelog, checked against the workspace's.
versions() {
    changelog=scripts/deb/changelog
    version=$(dpkg-parsechangelog -l "$changelog" -S Version)
    upstream=$(sed -n '/^\[workspace.package\]/,/^\[/ s/^version *= *"\(.*\)"/\1/p' Cargo.toml)
    [ -n "$upstream" ] || die "no version in Cargo.toml [workspace.package]"
    [ "${version%-*}" = "$upstream" ] ||
        die "$changelog's latest entry is $version, the workspace is $upstream: add an entry (dch -v $upstream-1)"
    maintainer=$(sed -n '/^\[workspace.package\]/,/^\[/ s/^authors *= *\["\([^"]*\)".*/\1/p' Cargo.toml)
    [ -n "$maintainer" ] || die "no authors in Cargo.toml [workspace.package]: the package needs a Maintainer"
    # The release's date, for the man pages (and reproducible gzip/tar).
    export SOURCE_DATE_EPOCH
    SOURCE_DATE_EPOCH=$(dpkg-parsechangelog -l "$changelog" -S Timestamp)
    date=$(date -u -d "@$SOURCE_DATE_EPOCH" +%Y-%m-%d)
    arch=$(dpkg --print-architecture)
}

# Binaries, the hook link, the unit, docs, changelog, copyright.
stage_files() {
    install -d -m 0755 "$root/DEBIAN" "$root/usr/bin" "$root/usr/lib/bulwark" \
        "$root/lib/systemd/system" "$root/etc/libvirt/hooks/qemu.d" "$doc"
    install -m 0755 "$bins/bulwark" "$bins/bulwark-nbd" "$root/usr/bin/"
    install -m 0755 "$bins/bulwark-hook" "$root/usr/lib/bulwark/"
    # A link, not a copy: dpkg renames the new binary into place, so libvirt
    # never runs a half-written hook, and upgrades update the hook too.
    ln -s /usr/lib/bulwark/bulwark-hook "$root/etc/libvirt/hooks/qemu.d/bulwark"
    install -m 0644 systemd/bulwark-agent.service "$root/lib/systemd/system/"
    # Every operator document ships; the test lists what it expects from docs/.
    install -m 0644 README.md docs/*.md "$doc/"
    install -m 0644 bulwark-nbd/README.md "$doc/nbd.md"
    install -m 0644 libvirt-hooks/agent.toml.example libvirt-hooks/hook.conf "$doc/"
    gzip -9n < scripts/deb/changelog > "$doc/changelog.Debian.gz"
    cargo metadata --format-version 1 --locked --offline \
        --filter-platform "$(rustc -vV | sed -n 's/^host: //p')" > "$stage/metadata.json"
    "$bins/bulwark-docgen" copyright --metadata "$stage/metadata.json" \
        --head scripts/deb/copyright --licenses scripts/deb/licenses \
        --roots bulwark,bulwark-nbd,bulwark-hook > "$doc/copyright"
    chmod 0644 "$doc/changelog.Debian.gz" "$doc/copyright"
    install -D -m 0644 scripts/deb/lintian-overrides "$root/usr/share/lintian/overrides/bulwark"
    install -m 0755 scripts/deb/postinst scripts/deb/prerm scripts/deb/postrm "$root/DEBIAN/"
}

# Man pages (generated, and the config's written by hand, dated as the
# release) and shell completions.
stage_man_and_completions() {
    "$bins/bulwark-docgen" man "$root" --date "$date"
    install -d -m 0755 "$root/usr/share/man/man5"
    sed "1,/^\.TH/ s/^\.TH \([^ ]*\) 5 .*/.TH \1 5 $date \"bulwark $upstream\" \"Bulwark\"/" \
        docs/man/bulwark-agent.toml.5 > "$root/usr/share/man/man5/bulwark-agent.toml.5"
    find "$root/usr/share/man" -type f -exec chmod 0644 {} + -exec gzip -9n {} +
    "$bins/bulwark-docgen" completions "$root"
    find "$root/usr/share/bash-completion" "$root/usr/share/zsh" "$root/usr/share/fish" \
        -type f -exec chmod 0644 {} +
}

# Debug symbols out of the binaries into bulwark-dbgsym, as dh_strip does:
# by build id, compressed, each binary pointing to its file.
split_debug() {
    build_ids=()
    for b in "${shipped[@]}"; do
        local id
        id=$(readelf -n "$root/$b" | sed -n 's/^ *Build ID: *//p')
        [ -n "$id" ] || die "$b has no build id"
        local dbg="$dbgroot/usr/lib/debug/.build-id/${id:0:2}/${id:2}.debug"
        install -d -m 0755 "$(dirname "$dbg")"
        objcopy --only-keep-debug --compress-debug-sections "$root/$b" "$dbg"
        chmod 0644 "$dbg"
        strip --remove-section=.comment --remove-section=.note "$root/$b"
        objcopy --add-gnu-debuglink="$dbg" "$root/$b"
        build_ids+=("$id")
    done
    install -d -m 0755 "$dbgroot/DEBIAN" "$dbgroot/usr/share/doc"
    ln -s bulwark "$dbgroot/usr/share/doc/bulwark-dbgsym"
}

# Shared-library dependencies of the binaries (libc6, libvirt0, ...), as
# the installed libraries' symbols files say. dpkg-shlibdeps insists on a
# debian/control; a minimal one in a scratch dir is enough.
shlibdeps() {
    mkdir -p "$stage/src/debian"
    printf 'Source: bulwark\n\nPackage: bulwark\nArchitecture: any\n' > "$stage/src/debian/control"
    local args=() b
    for b in "${shipped[@]}"; do args+=("-e$root/$b"); done
    if ! deps=$(cd "$stage/src" && dpkg-shlibdeps -O "${args[@]}" 2>"$stage/shlibdeps.err"); then
        cat "$stage/shlibdeps.err" >&2
        die "dpkg-shlibdeps failed"
    fi
    shlibs=$(printf '%s\n' "$deps" | sed -n 's/^shlibs:Depends=//p')
    [ -n "$shlibs" ] || die "dpkg-shlibdeps found no dependencies"
}

# md5sums of the files, then DEBIAN/control, for the tree at $1.
control() {
    local tree=$1 fields=$2
    (cd "$tree" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' |
        LC_ALL=C sort -z | xargs -0r md5sum) > "$tree/DEBIAN/md5sums"
    chmod 0644 "$tree/DEBIAN/md5sums"
    printf '%s\nInstalled-Size: %s\n' "$fields" \
        "$(du -sk --exclude=DEBIAN "$tree" | cut -f1)" > "$tree/DEBIAN/control"
}

package() {
    control "$root" "Package: bulwark
Version: $version
Architecture: $arch
Maintainer: $maintainer
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
 (bulwark-nbd), the libvirt qemu hook and the agent's systemd unit."
    control "$dbgroot" "Package: bulwark-dbgsym
Source: bulwark
Version: $version
Architecture: $arch
Maintainer: $maintainer
Depends: bulwark (= $version)
Section: debug
Priority: optional
Auto-Built-Package: debug-symbols
Build-Ids: ${build_ids[*]}
Description: debug symbols for bulwark"
    mkdir -p "$out"
    deb="$out/bulwark_${version}_${arch}.deb"
    dbgsym="$out/bulwark-dbgsym_${version}_${arch}.deb"
    dpkg-deb --build --root-owner-group -Z"$compression" "$root" "$deb" >&2
    dpkg-deb --build --root-owner-group -Z"$compression" "$dbgroot" "$dbgsym" >&2
    printf '%s\n%s\n' "$deb" "$dbgsym"
}

build
versions
stage_files
stage_man_and_completions
split_debug
shlibdeps
package
