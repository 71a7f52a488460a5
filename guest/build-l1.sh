#!/usr/bin/env bash
# Builds the nested test lane's L1 host: build/l1/vmlinuz (Debian's 6.12
# cloud kernel) and build/l1/base.cpio. L1 runs under QEMU TCG with emulated
# AMD SVM; kvm_amd gives it a real /dev/kvm, and a command agent on a
# virtio-serial port lets the test harness run shell commands in it.
#
# The tidevm binary is not in here: the harness appends a second cpio archive
# with the fresh binary and its shared libraries, so this base stays cached.
# base.cpio is left uncompressed on purpose: decompressing ~80 MB under TCG
# would cost L1 many seconds per boot.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

OUT="$BUILD_DIR/l1"
GUEST="$BUILD_DIR/guest"
SCRIPT="${BASH_SOURCE[0]}"
if up_to_date "$SCRIPT" "$OUT/vmlinuz" "$OUT/base.cpio" \
    && [ "$OUT/base.cpio" -nt "$GUEST/initramfs.cpio.gz" ] \
    && [ "$OUT/base.cpio" -nt "$GUEST/vmlinux" ] \
    && [ "$OUT/base.cpio" -nt "$GUEST/rootfs.ext4" ]; then
    log "up to date: $OUT"
    exit 0
fi
[ -f "$GUEST/vmlinux" ] && [ -f "$GUEST/initramfs.cpio.gz" ] && [ -f "$GUEST/rootfs.ext4" ] \
    || die "build the L2 guest first (guest/build-guest.sh)"

KERNEL_PKG="$(kernel_package)"
KERNEL_DEB="$(fetch_deb "$KERNEL_PKG")"
BUSYBOX_DEB="$(fetch_deb busybox-static)"
KERNEL_TREE="$BUILD_DIR/unpacked/$KERNEL_PKG"
BUSYBOX_TREE="$BUILD_DIR/unpacked/busybox-static"
unpack_deb "$KERNEL_DEB" "$KERNEL_TREE"
unpack_deb "$BUSYBOX_DEB" "$BUSYBOX_TREE"
KERNEL_RELEASE="${KERNEL_PKG#linux-image-}"
MODROOT="$KERNEL_TREE/lib/modules/$KERNEL_RELEASE"

mkdir -p "$OUT"
cp "$KERNEL_TREE/boot/vmlinuz-$KERNEL_RELEASE" "$OUT/vmlinuz"

ROOT="$(mktemp -d "$BUILD_DIR/l1-root.XXXXXX")"
trap 'rm -rf "$ROOT"' EXIT
install_busybox "$BUSYBOX_TREE/bin/busybox" "$ROOT"
install_modules "$MODROOT" "$ROOT/lib/modules" irqbypass kvm kvm_amd tun
mkdir -p "$ROOT"/{proc,sys,dev,tmp,run,root,etc/init.d,guest,usr/local/bin}
ln -s sbin/init "$ROOT/init"
cp "$GUEST/vmlinux" "$GUEST/initramfs.cpio.gz" "$GUEST/VERSIONS" "$ROOT/guest/"
# Mostly free space: compressed here, unpacked into /run by the scenarios that boot from it.
gzip -1n < "$GUEST/rootfs.ext4" > "$ROOT/guest/rootfs.ext4.gz"

cat > "$ROOT/etc/inittab" <<'INITTAB'
::sysinit:/etc/init.d/rcS
::respawn:/sbin/tidevm-agent
::shutdown:/bin/sync
INITTAB

cat > "$ROOT/etc/init.d/rcS" <<'RCS'
#!/bin/sh
export PATH=/usr/local/bin:/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /run
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
while read -r module; do
    insmod "/lib/modules/$module" || echo "tidevm-l1: insmod $module failed"
done < /lib/modules/load-order
# THP stays at the kernel's setting here: the harness sets it before each guest
# (off only for balloon work, whose 4 KiB discards inside L1 huge pages make L2
# triple-fault; see L1Thp in crates/testlane/src/guest.rs).
# The same lane fault strikes when L1 migrates a page under a running L2 from
# another CPU (tidevm is pinned to one L1 CPU against its own discards): a guest
# triple-faulted 2 s into its boot right after the hugetlbfs test had L1 compact
# memory for 600 huge pages. No proactive background compaction, then.
echo 0 > /proc/sys/vm/compaction_proactiveness
echo "TIDEVM-L1-READY kvm=$(ls /dev/kvm 2>/dev/null || echo missing)"
RCS
chmod +x "$ROOT/etc/init.d/rcS"

# The command agent. The host writes one request a line:
#   <id> <timeout-seconds> <base64 of a shell script>
# and the agent answers with
#   __TIDEVM_BEGIN_<id>__\n<stdout+stderr>\n__TIDEVM_END_<id>_<exit code>__\n
# The port is not a tty, so nothing is echoed back. Output goes through a file
# so that a background process holding the command's stdout cannot stall the
# answer, and the port's descriptor is closed for the command so that a
# background process never keeps it.
cat > "$ROOT/sbin/tidevm-agent" <<'AGENT'
#!/bin/sh
export PATH=/usr/local/bin:/bin:/sbin:/usr/bin:/usr/sbin
export HOME=/root
port=""
while [ -z "$port" ]; do
    for name in /sys/class/virtio-ports/*/name; do
        if [ "$(cat "$name" 2>/dev/null)" = agent ]; then
            port="/dev/$(basename "$(dirname "$name")")"
        fi
    done
    [ -n "$port" ] && [ -c "$port" ] || { port=""; sleep 0.2; }
done
work=/run/tidevm-agent
mkdir -p "$work"
exec 3<>"$port"
echo "tidevm-agent: serving on $port"
echo "__TIDEVM_AGENT_HELLO__" >&3
while IFS= read -r request <&3; do
    id="${request%% *}"
    rest="${request#* }"
    limit="${rest%% *}"
    script="${rest#* }"
    printf '%s' "$script" | base64 -d > "$work/cmd.$id" 2>/dev/null
    (cd /root && timeout -s KILL "$limit" sh "$work/cmd.$id") \
        < /dev/null > "$work/out.$id" 2>&1 3>&-
    rc=$?
    {
        printf '__TIDEVM_BEGIN_%s__\n' "$id"
        cat "$work/out.$id"
        printf '\n__TIDEVM_END_%s_%s__\n' "$id" "$rc"
    } >&3
    rm -f "$work/cmd.$id" "$work/out.$id"
done
echo "tidevm-agent: port closed, restarting"
AGENT
chmod +x "$ROOT/sbin/tidevm-agent"

cat > "$ROOT/etc/profile" <<'PROFILE'
export PATH=/usr/local/bin:/bin:/sbin:/usr/bin:/usr/sbin
PROFILE

log "packing base.cpio"
pack_cpio "$ROOT" "$OUT/base.cpio"
{
    cat "$GUEST/VERSIONS"
    echo "l1_modules=$(tr '\n' ' ' < "$ROOT/lib/modules/load-order" | sed 's/ $//')"
} > "$OUT/VERSIONS"
log "done: $OUT"
