#!/usr/bin/env bash
# Install the Debian packages pyvmm and its lab need; does nothing when they are all present.
set -euo pipefail
packages=(qemu-system-x86 qemu-utils busybox-static cpio e2fsprogs fdisk kmod pciutils hwdata pci.ids gcc libc6-dev acpica-tools debootstrap)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then exit 0; fi
if [ "$(id -u)" -ne 0 ]; then
  echo "install-deps: missing Debian packages (${missing[*]}); run as root or install them" >&2; exit 1
fi
echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends "${missing[@]}"
