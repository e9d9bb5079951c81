# shellcheck shell=bash
# Helpers shared by the image scripts.  Sourced by build.sh, which has set
# HERE (the vm-images directory) and OUT (its cache directory).
#
# Nothing here mounts anything: every filesystem is created directly in a
# file (mkfs.vfat + mtools, mke2fs -d) and copied into the disk image with dd.

# Fixed timestamp for every file we put into an image, so rebuilding from the
# same inputs gives (nearly) the same bytes.  2024-01-01T00:00:00Z.
export SOURCE_DATE_EPOCH=1704067200
export DEBIAN_FRONTEND=noninteractive
export LC_ALL=C
# FAT stores local time.
export TZ=UTC

# Debian's cloud kernel: small, boots quickly under QEMU and has everything a
# virtio VM needs.  virtio_blk is a module, so both images need an initramfs.
KERNEL_META=linux-image-cloud-amd64
SYSLINUX_MBR=/usr/lib/syslinux/mbr/mbr.bin

log() {
    echo "[vm-images] $*" >&2
}

die() {
    log "ERROR: $*"
    exit 1
}

# Hash of every input that defines image $1: the driver, the shared library
# and the image's own script and files.  README and out/ are not inputs.
script_hash() {
    local name="$1"
    (
        cd "$HERE" || exit 1
        {
            echo build.sh
            find lib "images/$name.sh" "images/$name" -type f 2>/dev/null
        } | sort | xargs sha256sum
    ) | sha256sum | cut -d' ' -f1
}

# apt-get update at most once per build, and only when something is needed.
APT_UPDATED=
apt_update_once() {
    if [[ -z $APT_UPDATED ]]; then
        log "apt-get update"
        apt-get -o DPkg::Lock::Timeout=600 update -qq >&2
        APT_UPDATED=1
    fi
}

ensure_host_packages() {
    local name="$1" pkg missing=()
    # fdisk: sfdisk; dosfstools: mkfs.vfat; mtools: mcopy (also used by
    # syslinux); syslinux-common: mbr.bin + ldlinux; kmod: depmod/modprobe to
    # resolve module dependencies; faketime: fixed times for mtools/syslinux.
    local pkgs=(fdisk dosfstools mtools syslinux syslinux-common e2fsprogs
        cpio gzip xz-utils zstd kmod util-linux faketime)
    if [[ $name == debian ]]; then
        pkgs+=(debootstrap debian-archive-keyring)
    fi
    for pkg in "${pkgs[@]}"; do
        if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
            missing+=("$pkg")
        fi
    done
    if ((${#missing[@]})); then
        apt_update_once
        log "installing host packages: ${missing[*]}"
        apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends \
            "${missing[@]}" >&2
    fi
    # The kernel and busybox .debs are downloaded, never installed, but apt
    # needs package lists to find them.
    if ! compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null; then
        apt_update_once
    fi
}

# Remove a work tree.  debootstrap mounts proc/sys (and maybe binds /dev)
# inside its target; if it was interrupted those mounts may still be there,
# and a plain rm -rf would walk into the host's /dev.  Unmount what we find
# and never cross filesystems.
safe_rm_tree() {
    local dir="$1" mnt
    [[ -n $dir && -d $dir ]] || return 0
    while read -r mnt; do
        umount -l "$mnt" 2>/dev/null || true
    done < <(awk -v d="$dir/" 'index($2, d) == 1 { print $2 }' /proc/mounts | sort -r)
    rm -rf --one-file-system "$dir"
}

# Set every timestamp under $1 to SOURCE_DATE_EPOCH.
normalize_mtimes() {
    find "$1" -depth -exec touch --no-dereference --date="@$SOURCE_DATE_EPOCH" {} +
}

# Run a command with the clock frozen at SOURCE_DATE_EPOCH, for tools that
# stamp "now" into what they write and have no option against it (mtools,
# syslinux, mke2fs 1.47.0).  NO_FAKE_STAT: file times they copy from stat()
# must stay as they are.
at_epoch() {
    NO_FAKE_STAT=1 faketime -f "$(date -u -d "@$SOURCE_DATE_EPOCH" '+%Y-%m-%d %H:%M:%S')" "$@"
}

# mke2fs -d copies each source file's ctime, which touch cannot set; reset
# the ctime of every used inode in ext4 image $1.  Inode use comes from the
# per-group free-inode lists of dumpe2fs.  Reserved inodes (< 11, except the
# root directory) carry mkfs time already.
clamp_ctimes() {
    local img="$1" cmds
    cmds="$(dirname "$img")/ctime.debugfs"
    dumpe2fs "$img" 2>/dev/null | awk -v t="@$SOURCE_DATE_EPOCH" '
        /^Inodes per group:/ { ipg = $4 }
        /^Group [0-9]+:/ { g = $2; sub(":", "", g); g += 0 }
        /^  Free inodes:/ {
            split("", free)
            s = $0
            sub(/^  Free inodes: */, "", s)
            n = split(s, parts, /, */)
            for (k = 1; k <= n; k++) {
                if (parts[k] == "") continue
                m = split(parts[k], r, "-")
                hi = (m == 2) ? r[2] : r[1]
                for (i = r[1] + 0; i <= hi + 0; i++) free[i] = 1
            }
            for (i = g * ipg + 1; i <= (g + 1) * ipg; i++)
                if (!(i in free) && (i == 2 || i >= 11))
                    print "sif <" i "> ctime " t
        }' >"$cmds"
    at_epoch debugfs -w -f "$cmds" "$img" >/dev/null 2>&1
    rm -f "$cmds"
}

# Download a package's .deb (from whatever mirror the host's apt uses) into
# the cache and print its path.  Cached by exact file name, which includes
# the version.
fetch_deb() {
    local pkg="$1" cache="$OUT/cache/debs" uri file
    mkdir -p "$cache"
    # --print-uris prints nothing for a file already in the current
    # directory, so ask from an empty one.
    uri="$(cd "$EMPTY_DIR" && apt-get download --print-uris "$pkg" 2>/dev/null | head -n1)" ||
        true
    if [[ -z $uri ]]; then
        apt_update_once
        uri="$(cd "$EMPTY_DIR" && apt-get download --print-uris "$pkg" | head -n1)"
    fi
    file="$(awk '{ print $2 }' <<<"$uri")"
    [[ -n $file ]] || die "cannot find package $pkg"
    if [[ ! -s $cache/$file ]]; then
        log "downloading $pkg"
        # apt drops privileges to _apt for downloads; a root-only cache dir
        # just makes it warn, so silence that.
        (
            cd "$cache" || exit 1
            apt-get download -qq "$pkg" 2>&1 |
                grep -v '^W: Download is performed unsandboxed' >&2 || true
        )
        [[ -s $cache/$file ]] || die "download of $pkg failed"
    fi
    echo "$cache/$file"
}

# Unpack the kernel into $1/kernel and set KVER, KTREE (the unpacked tree,
# with modules.dep generated) and VMLINUZ.
prepare_kernel() {
    local work="$1" meta_dep deb
    # The metapackage only depends on the versioned image package.
    meta_dep="$(apt-cache depends "$KERNEL_META" 2>/dev/null |
        awk '$1 == "Depends:" && $2 ~ /^linux-image-/ { print $2; exit }')"
    if [[ -z $meta_dep ]]; then
        apt_update_once
        meta_dep="$(apt-cache depends "$KERNEL_META" |
            awk '$1 == "Depends:" && $2 ~ /^linux-image-/ { print $2; exit }')"
    fi
    [[ -n $meta_dep ]] || die "cannot resolve $KERNEL_META"
    deb="$(fetch_deb "$meta_dep")"
    KTREE="$work/kernel"
    mkdir -p "$KTREE"
    dpkg-deb -x "$deb" "$KTREE"
    KVER="${meta_dep#linux-image-}"
    VMLINUZ="$KTREE/boot/vmlinuz-$KVER"
    [[ -f $VMLINUZ ]] || die "no vmlinuz in $deb"
    # The .deb ships no modules.dep (its postinst makes it); make one here.
    depmod -b "$KTREE" "$KVER"
    log "kernel $KVER"
}

# Extract busybox-static's binary to $1/busybox (cached per work dir).
BUSYBOX=
prepare_busybox() {
    local work="$1" deb
    [[ -n $BUSYBOX ]] && return 0
    deb="$(fetch_deb busybox-static)"
    mkdir -p "$work/busybox-deb"
    dpkg-deb -x "$deb" "$work/busybox-deb"
    BUSYBOX="$work/busybox-deb/bin/busybox"
    [[ -x $BUSYBOX ]] || die "no busybox in $deb"
}

# Install busybox into root directory $1 as /bin/busybox plus a symlink for
# every applet.  Existing files are not overwritten (the caller's init wins).
install_busybox() {
    local root="$1" applet dir
    mkdir -p "$root/bin" "$root/sbin" "$root/usr/bin" "$root/usr/sbin"
    install -m 0755 "$BUSYBOX" "$root/bin/busybox"
    while read -r applet; do
        [[ -e $root/$applet || -L $root/$applet ]] && continue
        dir="$(dirname "$applet")"
        mkdir -p "$root/$dir"
        ln -s /bin/busybox "$root/$applet"
    done < <("$BUSYBOX" --list-full)
}

# Copy the modules needed to reach an ext4 root on virtio-blk (and their
# dependencies, in load order) into initramfs dir $1, uncompressed because
# busybox insmod cannot read .ko.xz, and list them in /etc/modules.order.
# Modules built into the kernel are skipped.
install_boot_modules() {
    local root="$1" mod line path rel seen=" "
    # ext4's soft dependency on crc32c is left to the kernel: crc32c-intel
    # would not load under TCG (no SSE4.2) and a generic one is built in.
    local want=(virtio_pci virtio_blk ext4)
    : >"$root/etc/modules.order"
    for mod in "${want[@]}"; do
        while read -r line; do
            [[ $line == insmod\ * ]] || continue
            path="$(awk '{ print $2 }' <<<"$line")"
            rel="${path#"$KTREE"/lib/modules/"$KVER"/}"
            rel="${rel%.xz}"
            rel="${rel%.zst}"
            rel="${rel%.gz}"
            [[ $seen == *" $rel "* ]] && continue
            seen+="$rel "
            mkdir -p "$root/lib/modules/$KVER/$(dirname "$rel")"
            case "$path" in
                *.xz) xz -dc "$path" ;;
                *.zst) zstd -qdc "$path" ;;
                *.gz) gzip -dc "$path" ;;
                *) cat "$path" ;;
            esac >"$root/lib/modules/$KVER/$rel"
            echo "$rel" >>"$root/etc/modules.order"
        done < <(modprobe -d "$KTREE" -S "$KVER" --show-depends "$mod")
    done
    log "initramfs modules: $(tr '\n' ' ' <"$root/etc/modules.order")"
}

# Build the busybox initramfs shared by both images as gzip'd cpio $2.
build_initramfs() {
    local work="$1" out="$2" root="$1/initramfs"
    mkdir -p "$root"/{dev,proc,sys,newroot,etc,run,tmp}
    install_busybox "$root"
    install -m 0755 "$HERE/lib/initramfs-init" "$root/init"
    install_boot_modules "$root"
    # The kernel opens /dev/console before running /init; without the node
    # /init would start with no stdout at all.
    mknod -m 0600 "$root/dev/console" c 5 1
    normalize_mtimes "$root"
    (cd "$root" && find . -print0 | sort -z |
        cpio --null --quiet -o -H newc --reproducible -R 0:0) |
        gzip -9 -n >"$out"
    log "initramfs $(du -h "$out" | cut -f1)"
}

# Create FAT boot filesystem image $1 of $2 MiB that will sit $3 sectors into
# the disk, holding kernel $4, initramfs $5 and a syslinux config booting
# with kernel command line $6.
make_boot_fs() {
    local img="$1" mib="$2" offset_sectors="$3" kernel="$4" initrd="$5" cmdline="$6"
    local cfg
    cfg="$(dirname "$img")/syslinux.cfg"
    # SERIAL mirrors syslinux's own messages to the serial console, which
    # is all there is under -nographic.  PROMPT 0 + TIMEOUT 1: boot at once.
    cat >"$cfg" <<EOF
SERIAL 0 115200
PROMPT 0
TIMEOUT 1
DEFAULT recoverfs
LABEL recoverfs
  LINUX /vmlinuz
  INITRD /initrd.img
  APPEND $cmdline
EOF
    touch --date="@$SOURCE_DATE_EPOCH" "$cfg"
    rm -f "$img"
    truncate -s "${mib}M" "$img"
    # -h: hidden sectors = partition offset, so the boot sector's idea of
    # where it lives matches the disk.  --invariant/-i: no random volume id
    # or current time in the filesystem.
    mkfs.vfat -F 16 -n RECOVERBOOT -i 52435653 --invariant -h "$offset_sectors" "$img" >&2
    # syslinux finds ldlinux.sys through the partition offset that the MBR
    # code hands over and the hidden-sectors field set above.
    at_epoch syslinux --install "$img"
    at_epoch mcopy -i "$img" "$kernel" ::/vmlinuz
    at_epoch mcopy -i "$img" "$initrd" ::/initrd.img
    at_epoch mcopy -i "$img" "$cfg" ::/syslinux.cfg
}

# Create ext4 image $1 of $2 MiB from directory $3 with fixed UUID $4 and
# label $5.
make_root_fs() {
    local img="$1" mib="$2" dir="$3" uuid="$4" label="$5"
    normalize_mtimes "$dir"
    local fsck_log
    rm -f "$img"
    truncate -s "${mib}M" "$img"
    # root_owner: the root directory is owned by root whoever runs this;
    # hash_seed: fixed htree hashes; nodiscard: nothing to discard in a new
    # sparse file.  -m 0: no blocks reserved for root on a test image.
    at_epoch mke2fs -q -F -t ext4 -L "$label" -U "$uuid" -m 0 \
        -E "root_owner=0:0,hash_seed=$uuid,nodiscard" -d "$dir" "$img" >&2
    clamp_ctimes "$img"
    # A broken root filesystem is much easier to diagnose here than as a
    # kernel panic inside the VM.
    fsck_log="$(dirname "$img")/e2fsck.log"
    if ! e2fsck -fn "$img" >"$fsck_log" 2>&1; then
        cat "$fsck_log" >&2
        die "e2fsck found problems in $img"
    fi
}

# Assemble disk $1 of $2 MiB from boot fs image $3 ($4 MiB, at 1 MiB) and
# root fs image $5 (filling the rest): MBR partition table, syslinux MBR
# code, boot partition active.
assemble_disk() {
    local disk="$1" total="$2" boot="$3" boot_mib="$4" root="$5"
    local boot_start=2048 boot_size=$((boot_mib * 2048))
    local root_start=$((boot_start + boot_size))
    local root_size=$(((total - 1 - boot_mib) * 2048))
    [[ $(stat -c %s "$root") -eq $((root_size * 512)) ]] ||
        die "root fs image size does not match its partition"
    rm -f "$disk"
    truncate -s "${total}M" "$disk"
    # type e = FAT16 (LBA); fixed label-id so the disk signature is stable.
    sfdisk -q --no-reread --no-tell-kernel --wipe never "$disk" >&2 <<EOF
label: dos
label-id: 0x52435653
unit: sectors

start=$boot_start, size=$boot_size, type=e, bootable
start=$root_start, size=$root_size, type=83
EOF
    # Only the 440 bytes of boot code: the disk signature and partition table
    # that sfdisk wrote follow right after.
    dd if="$SYSLINUX_MBR" of="$disk" bs=440 count=1 conv=notrunc status=none
    dd if="$boot" of="$disk" bs=1M seek=1 conv=notrunc,sparse status=none
    dd if="$root" of="$disk" bs=1M seek=$((1 + boot_mib)) conv=notrunc,sparse status=none
}
