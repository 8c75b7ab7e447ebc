#!/bin/bash
# Builds Citadel's guest kernel (vmlinux with the PVH note, bzImage) and its busybox initramfs
# from Debian's linux-source-6.1, with scripts/guest-kernel/citadel.config on top of
# allnoconfig. The result is cached outside the tree in
#   ${CITADEL_CACHE_DIR:-$HOME/.cache/citadel}/kernel-<hash>/
# where <hash> covers this script, the config fragment, the init script, the kernel patches and
# the kernel source package, so a change to any of them builds a new kernel.
#
# Usage:
#   scripts/guest-kernel.sh          build if needed (silent unless it builds)
#   scripts/guest-kernel.sh --path   print the cache directory; exit 1 if it is not built
#
# Needs: linux-source-6.1, busybox-static, gcc, make, flex, bison, bc, xz-utils, perl,
# libelf-dev, libssl-dev, and patch or git.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
files_dir="$here/guest-kernel"
source_tarball="${CITADEL_LINUX_SOURCE:-/usr/src/linux-source-6.1.tar.xz}"
busybox="${CITADEL_BUSYBOX:-/bin/busybox}"
cache_root="${CITADEL_CACHE_DIR:-$HOME/.cache/citadel}"

die() {
	echo "guest-kernel: $*" >&2
	exit 1
}

# Identity of what goes into the build. The tarball is identified by its size and mtime,
# which change with every package update, so --path stays instant.
build_hash() {
	{
		sha256sum "$here/guest-kernel.sh" "$files_dir"/citadel.config "$files_dir"/init \
			"$files_dir"/*.patch | awk '{print $1}'
		stat -c '%s %Y' "$source_tarball" 2>/dev/null || echo "no-source"
		stat -c '%s %Y' "$busybox" 2>/dev/null || echo "no-busybox"
	} | sha256sum | cut -c1-16
}

hash="$(build_hash)"
out="$cache_root/kernel-$hash"

is_built() {
	[ -f "$out/complete" ] && [ -f "$out/vmlinux" ] && [ -f "$out/bzImage" ] &&
		[ -f "$out/initramfs.cpio.gz" ]
}

case "${1:-}" in
--path)
	is_built || exit 1
	echo "$out"
	exit 0
	;;
"") ;;
-h | --help)
	sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'
	exit 0
	;;
*) die "unknown argument '$1' (use --path or no argument)" ;;
esac

is_built && exit 0

need() {
	command -v "$1" >/dev/null 2>&1 || die "$1 not found (apt-get install $2)"
}
need make make
need gcc gcc
need flex flex
need bison bison
need bc bc
need xz xz-utils
need gzip gzip
need perl perl
command -v patch >/dev/null 2>&1 || command -v git >/dev/null 2>&1 ||
	die "neither patch nor git found (apt-get install patch)"
[ -f "$source_tarball" ] || die "$source_tarball not found (apt-get install linux-source-6.1)"
[ -x "$busybox" ] || die "$busybox not found (apt-get install busybox-static)"
file_type="$(od -An -tx1 -N4 "$busybox" | tr -d ' ')"
[ "$file_type" = "7f454c46" ] || die "$busybox is not an ELF binary"

mkdir -p "$cache_root"
# Concurrent callers (tests started in parallel) wait for one build instead of racing.
exec 9>"$cache_root/kernel-$hash.lock"
flock 9
is_built && exit 0

log="$cache_root/kernel-$hash.log"
work="$cache_root/kernel-$hash.build"
rm -rf "$work" "$out"
mkdir -p "$work" "$out"
echo "guest-kernel: building Linux guest kernel into $out (log: $log)" >&2

# patch(1) is not in every minimal install; git apply does the same job. The ceiling keeps
# git from treating a repository around the cache directory as the target.
apply_patch() {
	if command -v patch >/dev/null 2>&1; then
		patch -d "$work" -p1 --forward --batch <"$1"
	else
		(cd "$work" && GIT_CEILING_DIRECTORIES="$(dirname "$work")" git apply -p1 "$1")
	fi
}

build() {
	echo "== unpacking $source_tarball"
	tar -xJf "$source_tarball" -C "$work" --strip-components=1
	local fix
	for fix in "$files_dir"/*.patch; do
		apply_patch "$fix"
	done

	echo "== configuring"
	make -C "$work" ARCH=x86_64 KCONFIG_ALLCONFIG="$files_dir/citadel.config" allnoconfig
	make -C "$work" ARCH=x86_64 olddefconfig
	# Kconfig silently drops options whose dependencies are unmet: refuse such a kernel.
	local missing=0 line name
	while IFS= read -r line; do
		case "$line" in
		CONFIG_*=*)
			grep -qxF "$line" "$work/.config" || {
				echo "config: '$line' did not survive olddefconfig" >&2
				missing=1
			}
			;;
		"# CONFIG_"*" is not set")
			name="${line#\# }"
			name="${name%% *}"
			if grep -q "^$name=" "$work/.config"; then
				echo "config: '$name' is set although the fragment disables it" >&2
				missing=1
			fi
			;;
		esac
	done <"$files_dir/citadel.config"
	[ "$missing" = 0 ]

	echo "== building"
	# usr/gen_init_cpio is built along with vmlinux (CONFIG_BLK_DEV_INITRD needs it).
	make -C "$work" ARCH=x86_64 -j"$(nproc)" vmlinux bzImage

	# The initramfs: busybox with a link per applet, device nodes the kernel needs before
	# /init mounts devtmpfs, and Citadel's /init.
	local list="$work/initramfs.list" applet
	{
		echo "dir /bin 0755 0 0"
		echo "dir /sbin 0755 0 0"
		echo "dir /usr 0755 0 0"
		echo "dir /usr/bin 0755 0 0"
		echo "dir /usr/sbin 0755 0 0"
		echo "dir /dev 0755 0 0"
		echo "dir /proc 0755 0 0"
		echo "dir /sys 0755 0 0"
		echo "dir /tmp 1777 0 0"
		echo "dir /root 0700 0 0"
		echo "nod /dev/console 0600 0 0 c 5 1"
		echo "nod /dev/null 0666 0 0 c 1 3"
		echo "file /bin/busybox $busybox 0755 0 0"
		echo "file /init $files_dir/init 0755 0 0"
		"$busybox" --list-full | while IFS= read -r applet; do
			[ "$applet" = "bin/busybox" ] || echo "slink /$applet /bin/busybox 0777 0 0"
		done
	} >"$list"
	echo "== packing the initramfs"
	"$work/usr/gen_init_cpio" "$list" | gzip -9n >"$out/initramfs.cpio.gz"

	cp "$work/vmlinux" "$out/vmlinux"
	cp "$work/arch/x86/boot/bzImage" "$out/bzImage"
	cp "$work/.config" "$out/config"
}

# errexit must hold inside build(), so it runs as a plain command, not as a condition.
set +e
(
	set -e
	build
) >"$log" 2>&1
status=$?
set -e
if [ "$status" != 0 ]; then
	rm -rf "$out"
	echo "guest-kernel: build failed; see $log" >&2
	exit 1
fi
rm -rf "$work"
mv "$log" "$out/build.log"
touch "$out/complete"
echo "guest-kernel: built $out" >&2
