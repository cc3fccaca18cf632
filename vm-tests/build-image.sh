#!/usr/bin/env bash
# vm-tests/build-image.sh: builds the test VM (kernel + initramfs) from Debian packages, via apt only.
#
# Downloads (apt-get download) the cloud kernel, busybox-static, nbd-client, e2fsprogs and the
# library packages they depend on, unpacks them with dpkg-deb -x, and packs an initramfs with the
# modules for virtio-net and nbd (dependencies first, read from each module's depends= string),
# the tools with their shared libraries (found with ldd), and the guest scripts under guest/.
#
# The result is cached under $VMTESTS_CACHE (default vm-tests/.cache) in images/KEY/, where KEY
# hashes the package versions and the guest scripts; a rerun with the same inputs is instant.
# Prints the image directory (holding vmlinuz and initramfs.gz) on stdout.
#
# Usage: build-image.sh [--force]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/host.sh"

force=0
for arg in "$@"; do
    case $arg in
    --force) force=1 ;;
    -h | --help)
        sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
        exit 0
        ;;
    *) vmt_die "unknown argument $arg" ;;
    esac
done

# Modules the guest loads (with their dependencies, resolved below).
WANTED_MODULES=(virtio_pci virtio_net nbd)
# Binaries copied from the unpacked packages, with their shared libraries.
TOOLS=(sbin/nbd-client sbin/mke2fs sbin/e2fsck sbin/dumpe2fs)
TOOL_PACKAGES=(busybox-static nbd-client e2fsprogs)

# --- resolve package versions --------------------------------------------------------------
# Prints "package=version" lines: the kernel linux-image-cloud-amd64 points to, the tool
# packages, and the library packages the tools depend on (Depends and Pre-Depends, first
# alternative), except libc6: the host's glibc loader and libc go together into the image.
resolve_versions() {
    local show kernel_pkg libs
    show=$(apt-cache show --no-all-versions linux-image-cloud-amd64 "${TOOL_PACKAGES[@]}" 2>/dev/null) || return 1
    kernel_pkg=$(awk '/^Package: linux-image-cloud-amd64$/ { m = 1 } m && /^Depends:/ { sub(/^Depends: /, ""); sub(/[ ,(].*/, ""); print; exit }' <<<"$show")
    [[ $kernel_pkg == linux-image-* ]] || return 1
    libs=$(awk -F': ' '/^(Pre-)?Depends: / { print $2 }' <<<"$show" | tr ',' '\n' |
        sed -E 's/\|.*//; s/\(.*\)//; s/:any//; s/[[:space:]]//g' | grep -E '^lib' | grep -vx libc6 | sort -u)
    # One apt-cache call for all candidates (each call costs seconds on a loaded machine).
    apt-cache policy "$kernel_pkg" "${TOOL_PACKAGES[@]}" $libs 2>/dev/null |
        awk '/^[^ ].*:$/ { sub(/:$/, ""); p = $0 } /Candidate:/ { if ($2 == "(none)") exit 1; print p "=" $2 }'
}
# The resolution is cached while the apt lists and this script stay the same.
lists_key=$({
    stat -c '%n %s %Y' /var/lib/apt/lists/*_Packages* 2>/dev/null || true
    sha256sum "$VMT_DIR/build-image.sh"
} | sha256sum | cut -c1-16)
resolved=$VMT_CACHE/resolved-$lists_key
if [[ -s $resolved ]]; then
    versions=$(cat "$resolved")$'\n'
else
    if ! versions=$(resolve_versions) || [[ $(wc -l <<<"$versions") -lt 5 ]]; then
        vmt_apt_update
        versions=$(resolve_versions) || vmt_die "cannot resolve the image's packages with apt-cache"
    fi
    versions+=$'\n'
    mkdir -p "$VMT_CACHE"
    rm -f "$VMT_CACHE"/resolved-*
    printf '%s' "$versions" >"$resolved"
fi
kernel_pkg=$(grep -m1 '^linux-image-' <<<"$versions" | cut -d= -f1)

# The key covers what ends up in the image: package versions, this script, the guest scripts.
key=$({
    printf '%s' "$versions"
    sha256sum "$VMT_DIR/build-image.sh" "$VMT_DIR/lib/host.sh"
    (cd "$VMT_DIR" && find guest -type f | LC_ALL=C sort | xargs sha256sum)
} | sed "s#$VMT_DIR/##" | sha256sum | cut -c1-16)
image=$VMT_CACHE/images/$key
if [[ $force == 0 && -f $image/initramfs.gz && -f $image/vmlinuz ]]; then
    vmt_log "image cached: $image"
    printf '%s\n' "$image"
    exit 0
fi

# --- download and unpack ---------------------------------------------------------------------
debs=$VMT_CACHE/debs
mkdir -p "$debs"
want=()
while read -r pv; do
    [[ -n $pv ]] || continue
    p=${pv%%=*} v=${pv#*=}
    fv=${v//:/%3a}
    compgen -G "$debs/${p}_${fv}_*.deb" >/dev/null || want+=("$pv")
done <<<"$versions"
if ((${#want[@]})); then
    vmt_log "apt-get download ${want[*]}"
    if ! (cd "$debs" && vmt_apt download "${want[@]}" >/dev/null 2>"$debs/download.log"); then
        # Stale apt lists name versions the mirror no longer has: refresh once and retry.
        vmt_apt_update
        (cd "$debs" && vmt_apt download "${want[@]}" >/dev/null 2>"$debs/download.log") ||
            vmt_die "apt-get download failed: see $debs/download.log"
    fi
fi

work=$(mktemp -d "$VMT_CACHE/build.XXXXXX")
trap 'rm -rf "$work"' EXIT
pkgroot=$work/pkgs
staging=$work/initramfs
mkdir -p "$pkgroot" "$staging"
while read -r pv; do
    [[ -n $pv ]] || continue
    p=${pv%%=*} v=${pv#*=}
    deb=$(compgen -G "$debs/${p}_${v//:/%3a}_*.deb" | head -n1)
    [[ -n $deb ]] || vmt_die "downloaded package $pv not found in $debs"
    dpkg-deb -x "$deb" "$pkgroot"
done <<<"$versions"

kver=${kernel_pkg#linux-image-}
moddir=$pkgroot/lib/modules/$kver
[[ -f $pkgroot/boot/vmlinuz-$kver ]] || vmt_die "no vmlinuz-$kver in $kernel_pkg"
[[ -d $moddir ]] || vmt_die "no modules for $kver in $kernel_pkg"

# --- modules: dependency order from depends= ---------------------------------------------------
declare -A modfile=() visited=()
while IFS= read -r f; do
    b=${f##*/}
    b=${b%%.ko*}
    modfile[${b//-/_}]=$f
done < <(find "$moddir" -name '*.ko' -o -name '*.ko.xz' -o -name '*.ko.zst' -o -name '*.ko.gz')
builtin_names=$(sed -E 's#.*/##; s#\.ko$##; s#-#_#g' "$moddir/modules.builtin" 2>/dev/null || true)

mkdir -p "$staging/lib/modules"
load_order=()
# Decompresses (busybox insmod takes plain .ko only) into the image and prints the copy's path.
stage_module() {
    local name=$1 src=${modfile[$1]} dst=$staging/lib/modules/$1.ko
    case $src in
    *.ko.xz) xz -dc "$src" >"$dst" ;;
    *.ko.zst) zstd -qdc "$src" >"$dst" ;;
    *.ko.gz) gzip -dc "$src" >"$dst" ;;
    *.ko) cp "$src" "$dst" ;;
    esac
    printf '%s\n' "$dst"
}
visit_module() {
    local name=$1 staged deps dep
    [[ -z ${visited[$name]:-} ]] || return 0
    visited[$name]=1
    if [[ -z ${modfile[$name]:-} ]]; then
        grep -qx -- "$name" <<<"$builtin_names" && return 0
        vmt_die "module $name is neither in $kernel_pkg nor built in"
    fi
    staged=$(stage_module "$name")
    deps=$(tr '\0' '\n' <"$staged" | grep -a -m1 '^depends=' | cut -d= -f2- || true)
    for dep in ${deps//,/ }; do
        visit_module "$dep"
    done
    load_order+=("$name")
}
for m in "${WANTED_MODULES[@]}"; do
    visit_module "$m"
done
printf '%s\n' "${load_order[@]}" >"$staging/lib/modules/load-order"
vmt_log "modules in load order: ${load_order[*]}"

# --- busybox, tools, libraries -----------------------------------------------------------------
mkdir -p "$staging"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,run,tmp,mnt,lib64,lib/x86_64-linux-gnu,vmtest}
cp "$pkgroot/bin/busybox" "$staging/bin/busybox"
libpath=$pkgroot/lib/x86_64-linux-gnu:$pkgroot/usr/lib/x86_64-linux-gnu
declare -A libs=()
for t in "${TOOLS[@]}"; do
    [[ -e $pkgroot/$t ]] || vmt_die "tool $t not found in ${TOOL_PACKAGES[*]}"
    cp -L "$pkgroot/$t" "$staging/$t"
    ldd_out=$(LD_LIBRARY_PATH=$libpath ldd "$pkgroot/$t") || vmt_die "ldd $t failed"
    if grep -q 'not found' <<<"$ldd_out"; then
        vmt_die "libraries of $t not found: $(grep 'not found' <<<"$ldd_out" | tr -s ' \t\n' ' ')"
    fi
    while read -r lib; do
        libs[$lib]=1
    done < <(awk '/=> \// { print $3 } /^[[:space:]]*\/[^ ]*ld-linux/ { print $1 }' <<<"$ldd_out")
done
for lib in "${!libs[@]}"; do
    case ${lib##*/} in
    ld-linux-x86-64.so.2) cp -L "$lib" "$staging/lib64/ld-linux-x86-64.so.2" ;;
    *) cp -L "$lib" "$staging/lib/x86_64-linux-gnu/${lib##*/}" ;;
    esac
done
ln -s mke2fs "$staging/sbin/mkfs.ext4"
cp "$pkgroot/etc/mke2fs.conf" "$staging/etc/mke2fs.conf"
ln -s /proc/mounts "$staging/etc/mtab"
# Busybox applets for every name no real tool took.
while read -r applet; do
    [[ -e $staging/$applet || -L $staging/$applet ]] || ln -s /bin/busybox "$staging/$applet"
done < <("$staging/bin/busybox" --list-full)
mknod -m 600 "$staging/dev/console" c 5 1
mknod -m 666 "$staging/dev/null" c 1 3

# --- guest scripts ------------------------------------------------------------------------------
cp "$VMT_DIR/guest/init" "$staging/init"
chmod 755 "$staging/init"
cp -r "$VMT_DIR/guest" "$staging/vmtest/guest"
printf '%s' "$versions" >"$staging/vmtest/packages"

# --- pack -----------------------------------------------------------------------------------------
mkdir -p "$work/out"
(cd "$staging" && find . | LC_ALL=C sort | "$staging/bin/busybox" cpio -o -H newc 2>/dev/null) |
    gzip -6 >"$work/out/initramfs.gz"
cp "$pkgroot/boot/vmlinuz-$kver" "$work/out/vmlinuz"
# A copy of busybox for the host side (it packs per-run config archives with its cpio).
cp "$pkgroot/bin/busybox" "$work/out/busybox"
{
    printf 'key %s\nkernel %s\nmodules %s\n' "$key" "$kver" "${load_order[*]}"
    printf '%s' "$versions"
} >"$work/out/manifest.txt"
mkdir -p "$VMT_CACHE/images"
rm -rf "$image"
mv "$work/out" "$image"
# Only the current image and its packages are kept.
for old in "$VMT_CACHE"/images/*; do
    [[ $old == "$image" ]] || rm -rf "$old"
done
for deb in "$debs"/*.deb; do
    keep=0
    while read -r pv; do
        [[ -n $pv ]] || continue
        p=${pv%%=*} v=${pv#*=}
        [[ ${deb##*/} == "${p}_${v//:/%3a}_"* ]] && keep=1
    done <<<"$versions"
    ((keep)) || rm -f "$deb"
done
vmt_log "built $image ($(du -h "$image/initramfs.gz" | cut -f1) initramfs)"
printf '%s\n' "$image"
