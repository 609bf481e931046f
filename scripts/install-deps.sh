#!/usr/bin/env bash
# Install the Debian packages pyvmm and its lab need; does nothing when they are all present.
set -euo pipefail
packages=(qemu-system-x86 qemu-utils busybox-static cpio e2fsprogs fdisk kmod pciutils hwdata pci.ids gcc libc6-dev acpica-tools)
# The lab needs QEMU 10 (Debian 13's; bookworm-backports' on Debian 12): under QEMU 7.2's TCG the lab lost
# its timer interrupts now and then and stalled until something else woke it (bench/README.md#when-the-lab-stalls).
QEMU_MIN=1:10.0
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
qemu_version=$(dpkg-query -W -f='${Version}' qemu-system-x86 2>/dev/null || true)
old_qemu=0
if [ -n "$qemu_version" ] && dpkg --compare-versions "$qemu_version" lt "$QEMU_MIN"; then old_qemu=1; fi
if [ ${#missing[@]} -eq 0 ] && [ $old_qemu = 0 ]; then exit 0; fi
if [ "$(id -u)" -ne 0 ]; then
  echo "install-deps: missing Debian packages (${missing[*]}) or QEMU older than 10 ($qemu_version); run as root or install them" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
release=()
if [ "$codename" = bookworm ]; then
  echo "deb http://deb.debian.org/debian bookworm-backports main" > /etc/apt/sources.list.d/pyvmm-backports.list
  release=(-t bookworm-backports)
fi
apt-get update -q
others=()
qemu_needed=$old_qemu
for p in "${missing[@]}"; do
  case $p in qemu-system-x86|qemu-utils) qemu_needed=1 ;; *) others+=("$p") ;; esac
done
if [ ${#others[@]} -gt 0 ]; then
  echo "install-deps: installing ${others[*]}"
  apt-get install -y -q --no-install-recommends "${others[@]}"
fi
if [ $qemu_needed = 1 ]; then
  echo "install-deps: installing QEMU 10${release:+ from ${codename}-backports}"
  apt-get install -y -q --no-install-recommends "${release[@]}" qemu-system-x86 qemu-utils
fi
qemu_version=$(dpkg-query -W -f='${Version}' qemu-system-x86)
if dpkg --compare-versions "$qemu_version" lt "$QEMU_MIN"; then
  echo "install-deps: QEMU $qemu_version installed, the lab needs 10 or newer" >&2; exit 1
fi
