# shellcheck shell=bash
# The "tiny" image: 128 MiB, busybox-static root, boots to its marker in a
# few seconds under QEMU TCG.  Sourced by build.sh.

TINY_TOTAL_MIB=128
TINY_BOOT_MIB=32
TINY_ROOT_UUID=52435653-0001-4000-8000-000000000001
TINY_ID=recoverfs-tiny-v1

build_image() {
    local work="$1" out="$2" root="$1/rootfs"
    prepare_kernel "$work"
    prepare_busybox "$work"
    build_initramfs "$work" "$work/initrd.img"

    mkdir -p "$root"/{dev,proc,sys,run,tmp,etc,var/lib/recoverfs}
    # Our init first: install_busybox leaves existing files alone.
    install -D -m 0755 "$HERE/images/tiny/init" "$root/sbin/init"
    install_busybox "$root"
    echo "$TINY_ID" >"$root/etc/recoverfs-id"
    echo 0 >"$root/var/lib/recoverfs/boot-count"
    chmod 1777 "$root/tmp"

    make_boot_fs "$work/boot.fat" "$TINY_BOOT_MIB" 2048 "$VMLINUZ" "$work/initrd.img" \
        "root=/dev/vda2 rootfstype=ext4 rw console=ttyS0 quiet panic=-1"
    make_root_fs "$work/root.ext4" $((TINY_TOTAL_MIB - 1 - TINY_BOOT_MIB)) "$root" \
        "$TINY_ROOT_UUID" tinyroot
    assemble_disk "$out" "$TINY_TOTAL_MIB" "$work/boot.fat" "$TINY_BOOT_MIB" "$work/root.ext4"
}
