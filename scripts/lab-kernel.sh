#!/bin/bash
# Fetches and caches the kernel of the nested-KVM lab's first level (L1): Debian's cloud kernel
# package (the one the linux-image-cloud-amd64 metapackage depends on today), unpacked with its
# modules (kvm, kvm-amd, irqbypass, the vfio set, tun, virtio). The lab boots it under QEMU with
# TCG, which emulates AMD SVM with nested paging, so L1 offers a real /dev/kvm to Citadel.
#
# The package is resolved through the metapackage, never pinned: Debian's mirror drops old ABI
# numbers. The result is cached outside the tree in
#   ${CITADEL_CACHE_DIR:-$HOME/.cache/citadel}/lab-<package>_<version>/
# holding vmlinuz, System.map, config and lib/modules/<release>/.
#
# Usage:
#   scripts/lab-kernel.sh          fetch if needed (silent unless it fetches)
#   scripts/lab-kernel.sh --path   print the newest cached directory; exit 1 if there is none
#
# Needs: apt-get, dpkg (root for apt-get update when the package lists are empty).
set -euo pipefail

cache_root="${CITADEL_CACHE_DIR:-$HOME/.cache/citadel}"
metapackage="linux-image-cloud-amd64"

die() {
	echo "lab-kernel: $*" >&2
	exit 1
}

# The newest complete cache entry, by modification time.
cached() {
	local dir newest=""
	for dir in "$cache_root"/lab-*/; do
		[ -f "$dir/complete" ] || continue
		if [ -z "$newest" ] || [ "$dir" -nt "$newest" ]; then
			newest="$dir"
		fi
	done
	[ -n "$newest" ] || return 1
	echo "${newest%/}"
}

case "${1:-}" in
--path)
	cached
	exit $?
	;;
"") ;;
-h | --help)
	sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'
	exit 0
	;;
*) die "unknown argument '$1' (use --path or no argument)" ;;
esac

# The package the metapackage points at; empty when the package lists are missing or stale.
resolve() {
	apt-cache depends "$metapackage" 2>/dev/null |
		awk '/Depends: linux-image-[0-9]/ { print $2; exit }'
}

package="$(resolve || true)"
if [ -z "$package" ]; then
	apt-get update -qq >/dev/null 2>&1 || true
	package="$(resolve || true)"
fi
if [ -z "$package" ]; then
	# Offline, or no Debian package lists: a kernel fetched before still serves.
	cached >/dev/null && exit 0
	die "cannot resolve $metapackage (apt-get update, then retry)"
fi
version="$(apt-cache policy "$package" | awk '/Candidate:/ { print $2; exit }')"
[ -n "$version" ] && [ "$version" != "(none)" ] || die "no installable version of $package"
out="$cache_root/lab-${package}_${version}"
[ -f "$out/complete" ] && exit 0

mkdir -p "$cache_root"
exec 9>"$out.lock"
flock 9
[ -f "$out/complete" ] && exit 0

work="$(mktemp -d "$cache_root/lab-fetch.XXXXXX")"
trap 'rm -rf "$work"' EXIT
echo "lab-kernel: fetching $package $version into $out" >&2
# apt-get download writes into the current directory; the _apt user cannot write a root-owned
# temporary directory, so the download runs unsandboxed (its own warning says so).
(cd "$work" && apt-get download -qq "$package=$version" 2>&1 | grep -v 'unsandboxed' >&2 || true)
deb="$(ls "$work"/*.deb 2>/dev/null | head -n1)"
[ -n "$deb" ] || die "apt-get download $package=$version produced no package"
dpkg-deb -x "$deb" "$work/root"
rm -rf "$out"
mkdir -p "$out/lib"
release="$(ls "$work/root/lib/modules")"
cp "$work/root/boot/vmlinuz-$release" "$out/vmlinuz"
cp "$work/root/boot/System.map-$release" "$out/System.map"
cp "$work/root/boot/config-$release" "$out/config"
mv "$work/root/lib/modules" "$out/lib/modules"
for module in kernel/arch/x86/kvm/kvm-amd.ko kernel/drivers/vfio/pci/vfio-pci.ko kernel/drivers/net/tun.ko; do
	[ -f "$out/lib/modules/$release/$module" ] || die "$package lacks $module"
done
echo "$release" >"$out/release"
touch "$out/complete"
echo "lab-kernel: cached $out" >&2
