# shellcheck shell=bash
# The "debian" image: a real Debian bookworm (debootstrap minbase + systemd,
# udev, dbus) on a 1.5 GiB disk.  A systemd unit prints the marker and powers
# off once the boot is complete.  Sourced by build.sh.

DEBIAN_SUITE=bookworm
DEBIAN_TOTAL_MIB=1536
DEBIAN_BOOT_MIB=64
DEBIAN_ROOT_UUID=52435653-0002-4000-8000-000000000002
DEBIAN_MACHINE_ID=52435653000240008000000000000002
DEBIAN_ID=recoverfs-debian-v1
# Beyond minbase: an init system and what a usual systemd boot runs, and
# the QEMU guest agent (it starts when a VM has its virtio-serial port:
# fsfreeze for backups of the running VM, guest-exec for agent jobs).
DEBIAN_INCLUDE=systemd-sysv,udev,dbus,kmod,e2fsprogs,qemu-guest-agent

# The Debian mirror the host's apt uses (it may be a proxy or a snapshot
# mirror that is the only one reachable); deb.debian.org if apt has none.
host_mirror() {
    local uri
    # shellcheck disable=SC2016 # $(...) are apt format fields, not shell
    uri="$(apt-get indextargets --format '$(CODENAME) $(REPO_URI)' 'Identifier: Packages' 2>/dev/null |
        awk -v s="$DEBIAN_SUITE" '$1 == s { print $2; exit }')"
    echo "${uri:-http://deb.debian.org/debian/}"
}

# Turn the debootstrapped tree $1 into a bootable, quiet, offline system.
configure_debian_root() {
    local root="$1" f

    echo recoverfs-debian >"$root/etc/hostname"
    printf '127.0.0.1\tlocalhost\n127.0.1.1\trecoverfs-debian\n' >"$root/etc/hosts"
    # Root is mounted read-only by the initramfs; systemd fscks it and
    # remounts it read-write from this entry, as on a normal install.
    printf 'UUID=%s\t/\text4\terrors=remount-ro\t0\t1\n' "$DEBIAN_ROOT_UUID" >"$root/etc/fstab"
    # A fixed machine id: no first-boot setup, and every boot is alike.
    echo "$DEBIAN_MACHINE_ID" >"$root/etc/machine-id"
    # Offline VM: nothing to resolve, and nothing of the build host's.
    : >"$root/etc/resolv.conf"
    # Empty root password, so a person can log in on the serial console to
    # look around; this image is only ever a test VM.
    chroot "$root" passwd -d root >/dev/null

    # The kernel and its modules, as udev inside the VM loads more of them
    # (e.g. for the NIC qemu adds).  Unpacked rather than installed: dpkg
    # would also pull in initramfs-tools, and the image brings its own
    # initramfs.
    mkdir -p "$root/usr/lib/modules" "$root/boot"
    cp -a "$KTREE/lib/modules/$KVER" "$root/usr/lib/modules/"
    cp -a "$KTREE/boot/." "$root/boot/"
    depmod -b "$root" "$KVER"

    # The marker service.
    echo "$DEBIAN_ID" >"$root/etc/recoverfs-id"
    mkdir -p "$root/var/lib/recoverfs"
    echo 0 >"$root/var/lib/recoverfs/boot-count"
    install -D -m 0755 "$HERE/images/debian/recoverfs-marker" "$root/usr/local/sbin/recoverfs-marker"
    install -D -m 0644 "$HERE/images/debian/recoverfs-marker.service" \
        "$root/etc/systemd/system/recoverfs-marker.service"
    mkdir -p "$root/etc/systemd/system/multi-user.target.wants"
    ln -sf /etc/systemd/system/recoverfs-marker.service \
        "$root/etc/systemd/system/multi-user.target.wants/recoverfs-marker.service"
    # No display manager: don't wait for graphical.target.
    ln -sf /lib/systemd/system/multi-user.target "$root/etc/systemd/system/default.target"
    # Periodic jobs (apt-daily, fstrim, e2scrub, ...) only add noise to a VM
    # that lives for one boot.
    rm -f "$root"/etc/systemd/system/timers.target.wants/*.timer

    # Caches and logs of the build itself.
    rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin \
        "$root"/var/cache/apt/archives/*.deb "$root"/var/cache/ldconfig/aux-cache
    for f in "$root"/var/log/*.log "$root"/var/log/apt/*; do
        [[ -f $f ]] && : >"$f"
    done
    rm -f "$root/var/lib/dbus/machine-id"
}

build_image() {
    local work="$1" out="$2" root="$1/rootfs" mirror
    local cache="$OUT/cache/debootstrap"
    prepare_kernel "$work"
    prepare_busybox "$work"
    build_initramfs "$work" "$work/initrd.img"

    mirror="$(host_mirror)"
    mkdir -p "$cache"
    log "debootstrap $DEBIAN_SUITE from $mirror (takes a few minutes)"
    # debootstrap mounts proc/sys inside its own target directory while
    # installing; that is the only mounting anywhere in the build.
    debootstrap --variant=minbase --components=main --include="$DEBIAN_INCLUDE" \
        --cache-dir="$cache" "$DEBIAN_SUITE" "$root" "$mirror" >&2
    configure_debian_root "$root"

    make_boot_fs "$work/boot.fat" "$DEBIAN_BOOT_MIB" 2048 "$VMLINUZ" "$work/initrd.img" \
        "root=/dev/vda2 rootfstype=ext4 ro console=ttyS0 quiet panic=-1"
    make_root_fs "$work/root.ext4" $((DEBIAN_TOTAL_MIB - 1 - DEBIAN_BOOT_MIB)) "$root" \
        "$DEBIAN_ROOT_UUID" debianroot
    assemble_disk "$out" "$DEBIAN_TOTAL_MIB" "$work/boot.fat" "$DEBIAN_BOOT_MIB" "$work/root.ext4"
}
