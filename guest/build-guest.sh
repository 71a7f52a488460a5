#!/usr/bin/env bash
# Builds the L2 guest that tidevm boots: build/guest/{vmlinux,bzImage,
# initramfs.cpio.gz,rootfs.ext4,VERSIONS}. The userland is busybox init with a root shell
# on ttyS0; the init script loads virtio_mem, virtio_balloon, virtio_blk and virtio_net and prints
# TIDEVM-GUEST-READY, which the test harness waits for. rootfs.ext4 holds the same
# userland as an ext4 disk image (made with `mke2fs -d`, no root privileges needed): with
# `root=/dev/vda` on the kernel command line the initramfs's /init mounts it and switches
# to it, as a distribution's initramfs does.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

OUT="$BUILD_DIR/guest"
SCRIPT="${BASH_SOURCE[0]}"
for tool in memtouch memphase; do
    if [ "$(dirname "$SCRIPT")/tools/$tool.c" -nt "$OUT/initramfs.cpio.gz" ]; then
        rm -f "$OUT/initramfs.cpio.gz"
    fi
done
if up_to_date "$SCRIPT" "$OUT/vmlinux" "$OUT/bzImage" "$OUT/initramfs.cpio.gz" "$OUT/rootfs.ext4" \
    "$OUT/VERSIONS"; then
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
install_modules "$MODROOT" "$ROOT/lib/modules" virtio_mem virtio_balloon virtio_blk \
    failover net_failover virtio_net
mkdir -p "$ROOT"/{proc,sys,dev,tmp,root,mnt,newroot,etc/init.d}
# /init: busybox init from the initramfs, or, with root=/dev/... on the command line, the
# root file system on that disk. virtio_blk is a module, so the kernel cannot mount a
# virtio disk itself: this script loads the modules, mounts the disk and switches to it.
cat > "$ROOT/init" <<'INIT'
#!/bin/sh
mount -t proc proc /proc
root=""
for word in $(cat /proc/cmdline); do
    case "$word" in
        root=/dev/*) root="${word#root=}" ;;
    esac
done
if [ -z "$root" ]; then
    umount /proc
    exec /sbin/init
fi
echo 4 > /proc/sys/kernel/printk
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
while read -r module; do
    insmod "/lib/modules/$module" || echo "tidevm-guest: insmod $module failed"
done < /lib/modules/load-order
if mount -t ext4 -o rw "$root" /newroot && [ -x /newroot/sbin/init ]; then
    echo "tidevm-guest: root file system on $root" > /dev/kmsg
    umount /dev /sys /proc
    exec switch_root /newroot /sbin/init
fi
echo "tidevm-guest: cannot mount $root, staying in the initramfs" > /dev/kmsg
umount /dev /sys /proc
exec /sbin/init
INIT
chmod +x "$ROOT/init"
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
    # Booted from a disk, /init has loaded them already.
    name="$(basename "$module" | sed 's/\.ko.*//; s/-/_/g')"
    [ -d "/sys/module/$name" ] && continue
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

# The same tree as an ext4 root disk: its content plus room for the tests' files.
log "making the ext4 root disk"
root_mib=$(( $(du -sm "$ROOT" | cut -f1) + 48 ))
rm -f "$OUT/rootfs.ext4.tmp"
PATH="$PATH:/usr/sbin:/sbin" mke2fs -q -t ext4 -L tidevm-root -E root_owner=0:0 -d "$ROOT" "$OUT/rootfs.ext4.tmp" "${root_mib}M"
mv "$OUT/rootfs.ext4.tmp" "$OUT/rootfs.ext4"

{
    echo "kernel_package=$KERNEL_PKG"
    echo "kernel_version=$(deb_version "$KERNEL_DEB")"
    echo "kernel_release=$KERNEL_RELEASE"
    echo "busybox_version=$(deb_version "$BUSYBOX_DEB")"
    echo "modules=$(tr '\n' ' ' < "$ROOT/lib/modules/load-order" | sed 's/ $//')"
} > "$OUT/VERSIONS"
log "done: $OUT"
cat "$OUT/VERSIONS" >&2
