#!/usr/bin/env bash
# Builds the L2 guest that tidevm boots: build/guest/{vmlinux,bzImage,
# initramfs.cpio.gz,VERSIONS}. The userland is busybox init with a root shell
# on ttyS0; the init script loads virtio_mem, virtio_balloon and virtio_blk and prints
# TIDEVM-GUEST-READY, which the test harness waits for.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

OUT="$BUILD_DIR/guest"
SCRIPT="${BASH_SOURCE[0]}"
for tool in memtouch memphase; do
    if [ "$(dirname "$SCRIPT")/tools/$tool.c" -nt "$OUT/initramfs.cpio.gz" ]; then
        rm -f "$OUT/initramfs.cpio.gz"
    fi
done
if up_to_date "$SCRIPT" "$OUT/vmlinux" "$OUT/bzImage" "$OUT/initramfs.cpio.gz" "$OUT/VERSIONS"; then
    log "up to date: $OUT"
    exit 0
fi

KERNEL_PKG="$(kernel_package)"
KERNEL_DEB="$(fetch_deb "$KERNEL_PKG")"
BUSYBOX_DEB="$(fetch_deb busybox-static)"
KERNEL_TREE="$BUILD_DIR/unpacked/$KERNEL_PKG"
BUSYBOX_TREE="$BUILD_DIR/unpacked/busybox-static"
unpack_deb "$KERNEL_DEB" "$KERNEL_TREE"
unpack_deb "$BUSYBOX_DEB" "$BUSYBOX_TREE"

KERNEL_RELEASE="${KERNEL_PKG#linux-image-}"
BZIMAGE="$KERNEL_TREE/boot/vmlinuz-$KERNEL_RELEASE"
MODROOT="$KERNEL_TREE/lib/modules/$KERNEL_RELEASE"
[ -f "$BZIMAGE" ] || die "no $BZIMAGE in $KERNEL_DEB"

mkdir -p "$OUT"
cp "$BZIMAGE" "$OUT/bzImage"
log "extracting vmlinux"
extract_vmlinux "$BZIMAGE" "$OUT/vmlinux"

ROOT="$(mktemp -d "$BUILD_DIR/guest-root.XXXXXX")"
trap 'rm -rf "$ROOT"' EXIT
install_busybox "$BUSYBOX_TREE/bin/busybox" "$ROOT"
install_modules "$MODROOT" "$ROOT/lib/modules" virtio_mem virtio_balloon virtio_blk
mkdir -p "$ROOT"/{proc,sys,dev,tmp,root,etc/init.d}
ln -s sbin/init "$ROOT/init"
# memtouch: a static helper that fills and checks memory in the guest (tests, demo).
gcc -O2 -static -o "$ROOT/bin/memtouch" "$(dirname "$SCRIPT")/tools/memtouch.c"
# memphase: takes and gives back memory in phases (ramp, burst, hold, idle, release), for the
# memory autopilot's tests and demo.
gcc -O2 -static -o "$ROOT/bin/memphase" "$(dirname "$SCRIPT")/tools/memphase.c"

cat > "$ROOT/etc/inittab" <<'INITTAB'
::sysinit:/etc/init.d/rcS
ttyS0::respawn:-/bin/sh
::ctrlaltdel:/sbin/reboot
::shutdown:/bin/sync
::shutdown:/bin/umount -a -r
INITTAB

cat > "$ROOT/etc/init.d/rcS" <<'RCS'
#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
# Through printk, so this shows on the console even if the serial driver's
# interrupt-driven tty output (everything below) does not work.
echo "tidevm-guest: userspace init running" > /dev/kmsg
# Keep kernel chatter (below warnings) off the serial console: the test
# harness reads command output from it.
echo 4 > /proc/sys/kernel/printk
while read -r module; do
    insmod "/lib/modules/$module" || echo "tidevm-guest: insmod $module failed"
done < /lib/modules/load-order
# Level 3 so it passes the console log level set above: when the serial tty
# output is broken, this still tells how far the guest got. It goes before the
# marker: printk writes to the UART directly, and after the marker it could land
# in the middle of the marker's interrupt-driven tty output (seen with two vCPUs:
# "TIDEVM-GUEST-REA[ 9.29] tidevm-guest: init script done ...DY").
echo "<3>tidevm-guest: init script done, starting the ttyS0 shell" > /dev/kmsg
echo TIDEVM-GUEST-READY
RCS
chmod +x "$ROOT/etc/init.d/rcS"

cat > "$ROOT/etc/profile" <<'PROFILE'
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
export PS1='tidevm-guest# '
PROFILE

log "packing initramfs"
pack_cpio "$ROOT" "$OUT/initramfs.cpio"
gzip -9n < "$OUT/initramfs.cpio" > "$OUT/initramfs.cpio.gz.tmp"
mv "$OUT/initramfs.cpio.gz.tmp" "$OUT/initramfs.cpio.gz"
rm -f "$OUT/initramfs.cpio"

{
    echo "kernel_package=$KERNEL_PKG"
    echo "kernel_version=$(deb_version "$KERNEL_DEB")"
    echo "kernel_release=$KERNEL_RELEASE"
    echo "busybox_version=$(deb_version "$BUSYBOX_DEB")"
    echo "modules=$(tr '\n' ' ' < "$ROOT/lib/modules/load-order" | sed 's/ $//')"
} > "$OUT/VERSIONS"
log "done: $OUT"
cat "$OUT/VERSIONS" >&2
