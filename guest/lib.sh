# Shared helpers for build-guest.sh and build-l1.sh. Sourced, not run.
# Everything here works without root: device nodes are written straight into
# a newc cpio archive instead of being created with mknod.

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD_DIR="${TIDEVM_BUILD_DIR:-$REPO_ROOT/build}"
DEB_DIR="$BUILD_DIR/debs"

log() { echo "[$(basename "$0")] $*" >&2; }
die() { log "error: $*"; exit 1; }

# apt-get update, once per script run: apt lists on a fresh machine may be
# missing or name package versions the mirror no longer has.
APT_UPDATED=0
apt_update_once() {
    [ "$APT_UPDATED" -eq 0 ] || return 0
    APT_UPDATED=1
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    log "refreshing apt lists"
    $sudo apt-get update -qq >&2 || log "apt-get update failed"
}

newest_cloud_kernel() {
    apt-cache depends linux-image-6.12-cloud-amd64 2>/dev/null \
        | awk '/Depends: linux-image-6\.12\..*-cloud-amd64/ { print $2; exit }'
}

# The newest Debian 6.12 cloud kernel package, unless pinned by the caller.
kernel_package() {
    if [ -n "${TIDEVM_KERNEL_PKG:-}" ]; then
        echo "$TIDEVM_KERNEL_PKG"
        return
    fi
    local pkg
    pkg="$(newest_cloud_kernel)"
    if [ -z "$pkg" ]; then
        apt_update_once
        pkg="$(newest_cloud_kernel)"
    fi
    [ -n "$pkg" ] || die "apt does not know linux-image-6.12-cloud-amd64 (run 'make deps' / apt-get update; it is in bookworm-security)"
    echo "$pkg"
}

# fetch_deb PACKAGE: downloads the .deb into $DEB_DIR once, prints its path.
fetch_deb() {
    local pkg="$1" deb
    mkdir -p "$DEB_DIR"
    deb="$(ls "$DEB_DIR"/"${pkg}"_*.deb 2>/dev/null | head -1 || true)"
    if [ -z "$deb" ]; then
        log "downloading $pkg"
        if ! (cd "$DEB_DIR" && apt-get download -q "$pkg" >&2); then
            apt_update_once
            (cd "$DEB_DIR" && apt-get download -q "$pkg" >&2) || die "apt-get download $pkg failed"
        fi
        deb="$(ls "$DEB_DIR"/"${pkg}"_*.deb | head -1)"
    fi
    echo "$deb"
}

# deb_version DEB: the package version recorded in a .deb.
deb_version() { dpkg-deb -f "$1" Version; }

# unpack_deb DEB DIR: extracts a .deb once into DIR.
unpack_deb() {
    local deb="$1" dir="$2"
    if [ ! -f "$dir/.unpacked" ]; then
        rm -rf "$dir"
        mkdir -p "$dir"
        dpkg -x "$deb" "$dir"
        touch "$dir/.unpacked"
    fi
}

# extract_vmlinux BZIMAGE OUT: writes the ELF kernel carried in a bzImage.
# The setup header says where the compressed payload starts (payload_offset at
# 0x248, relative to the protected-mode code that begins after
# (setup_sects + 1) * 512 bytes) and how long it is (payload_length at 0x24c),
# so the exact zstd frame is cut out instead of searching for magic bytes.
# The payload ends with the 4-byte decompressed size the kernel build appends
# after the zstd frame; zstd would reject it as a truncated second frame.
extract_vmlinux() {
    local image="$1" out="$2"
    read_le() { od -An -t u"$2" -j "$1" -N "$2" "$image" | tr -d ' '; }
    local setup_sects payload_offset payload_length start magic
    setup_sects="$(read_le $((0x1f1)) 1)"
    [ "$setup_sects" -ne 0 ] || setup_sects=4
    payload_offset="$(read_le $((0x248)) 4)"
    payload_length="$(read_le $((0x24c)) 4)"
    start=$(((setup_sects + 1) * 512 + payload_offset))
    magic="$(od -An -t x1 -j "$start" -N 4 "$image" | tr -d ' ')"
    [ "$magic" = "28b52ffd" ] || die "$image: payload at $start is not zstd (magic $magic)"
    dd if="$image" iflag=skip_bytes,count_bytes skip="$start" count="$((payload_length - 4))" \
        bs=1M status=none | zstd -dcq > "$out.tmp" \
        || die "zstd could not decompress the payload of $image"
    [ "$(od -An -c -N 4 "$out.tmp" | tr -d ' ')" = "177ELF" ] || die "payload of $image is not an ELF"
    mv "$out.tmp" "$out"
}

# module_path MODROOT NAME: the .ko.xz of a module (names may use - or _).
module_path() {
    local root="$1" name="$2" pattern
    pattern="$(echo "$name" | sed 's/[-_]/[-_]/g')"
    find "$root" -regextype posix-extended -regex ".*/${pattern}\.ko(\.xz)?" | head -1
}

# resolve_modules MODROOT NAME...: prints the .ko.xz paths of NAMEs and all
# of their dependencies, dependencies first, each once.
resolve_modules() {
    local root="$1"; shift
    local -a order=()
    local -A seen=()
    visit() {
        local name="$1" path dep
        name="${name//-/_}"
        [ -z "${seen[$name]:-}" ] || return 0
        seen[$name]=1
        path="$(module_path "$root" "$name")"
        [ -n "$path" ] || die "module $name not found under $root"
        for dep in $(modinfo -F depends "$path" | tr ',' ' '); do
            visit "$dep"
        done
        order+=("$path")
    }
    local module
    for module in "$@"; do visit "$module"; done
    printf '%s\n' "${order[@]}"
}

# install_modules MODROOT DESTDIR NAME...: decompresses NAMEs and their
# dependencies into DESTDIR and writes DESTDIR/load-order (one file a line).
install_modules() {
    local root="$1" dest="$2"; shift 2
    mkdir -p "$dest"
    : > "$dest/load-order"
    local path base
    while read -r path; do
        base="$(basename "$path" .xz)"
        case "$path" in
            *.xz) xz -dc "$path" > "$dest/$base" ;;
            *) cp "$path" "$dest/$base" ;;
        esac
        echo "$base" >> "$dest/load-order"
    done < <(resolve_modules "$root" "$@")
}

# install_busybox BUSYBOX ROOT: the static busybox plus a link for each applet.
install_busybox() {
    local busybox="$1" root="$2" applet
    mkdir -p "$root/bin" "$root/sbin" "$root/usr/bin" "$root/usr/sbin"
    cp "$busybox" "$root/bin/busybox"
    for applet in $("$busybox" --list); do
        [ "$applet" = busybox ] && continue
        [ -e "$root/bin/$applet" ] || ln -s busybox "$root/bin/$applet"
    done
    ln -sf ../bin/busybox "$root/sbin/init"
}

# cpio_device_nodes OUT: a tiny newc archive holding /dev/console and
# /dev/null, written byte by byte so no root (mknod) is needed. The kernel
# opens /dev/console for init's stdio before anything can mount devtmpfs.
cpio_device_nodes() {
    local out="$1" ino=900000
    entry() { # name mode rdev_major rdev_minor
        local name="$1" mode="$2" major="$3" minor="$4" namesize header pad
        namesize=$((${#name} + 1))
        header="$(printf '070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X' \
            "$ino" "$mode" 0 0 1 0 0 0 0 "$major" "$minor" "$namesize" 0)"
        ino=$((ino + 1))
        printf '%s%s\0' "$header" "$name"
        # The header (110 bytes) plus the name is padded to 4 bytes.
        pad=$(((4 - (110 + namesize) % 4) % 4))
        head -c "$pad" /dev/zero
    }
    {
        entry dev $((0040755)) 0 0
        entry dev/console $((0020600)) 5 1
        entry dev/null $((0020666)) 1 3
        entry TRAILER!!! 0 0 0
    } > "$out"
}

# pack_cpio ROOT OUT: a newc archive of ROOT (owned by root in the archive),
# followed by the device nodes.
pack_cpio() {
    local root="$1" out="$2"
    (cd "$root" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) > "$out.tmp"
    cpio_device_nodes "$out.devs"
    cat "$out.devs" >> "$out.tmp"
    rm -f "$out.devs"
    mv "$out.tmp" "$out"
}

# up_to_date SCRIPT OUTPUT...: true if every OUTPUT exists and is newer than
# SCRIPT and this library.
up_to_date() {
    local script="$1" output; shift
    for output in "$@"; do
        [ -e "$output" ] || return 1
        [ "$output" -nt "$script" ] || return 1
        [ "$output" -nt "${BASH_SOURCE[0]}" ] || return 1
    done
}
