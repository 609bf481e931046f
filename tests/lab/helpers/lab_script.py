"""The shell preamble of the lab's host-side tests, and the parser of what their scripts print.

A script built with `lab_script(body, SD="0000:00:03.0", ...)` starts with these shell functions and the
given variables:

    sec NAME        prints `=== NAME`: what follows, up to the next `sec`, is section NAME (`sections()`)
    drv BDF         the driver a PCI function is bound to, or `none`
    leftover [ID]   `id-left` when vfio-pci still has the dynamic id ID (default 1b36 0010, the lab's NVMe
                    drive), else `no-id-left`; remove_id fails (ENODEV) exactly when the id is not there,
                    and takes it out when it is
    wait_blk DEV    waits (up to 10 s) for block device DEV to appear; `sha_of DEV` also prints its SHA-256
    release_fbcon   unbinds fbcon from the virtual terminals: while it draws the console on a display's
                    framebuffer, pyvmm-host refuses that display as in use (issue 19)

`ORDINARY_USER` sets up the user the unprivileged tests run pyvmm as (README.md's real-host setup): `$U`
(pyvmm-user, in the kvm group), /dev/kvm as udev leaves it, and the guest kernel and initramfs readable by
it in `$TMPDIR/u/kernel` and `$TMPDIR/u/initrd`.
"""

from __future__ import annotations

ORDINARY_USER = r"""
U=pyvmm-user
getent group kvm >/dev/null || groupadd -r kvm
useradd -M -G kvm $U
chgrp kvm /dev/kvm && chmod 660 /dev/kvm  # what udev does on a real host
chmod o+x /root  # the lab's Python and pyvmm's assets live under /root (0700 on the host)
mkdir -p $TMPDIR/u && install -m 644 "$PYVMM_GUEST_KERNEL" $TMPDIR/u/kernel
install -m 644 "$PYVMM_GUEST_INITRAMFS" $TMPDIR/u/initrd && chmod 755 $TMPDIR $TMPDIR/u
"""

PRELUDE = r"""
sec() { echo "=== $1"; }
drv() { l=$(readlink "/sys/bus/pci/devices/$1/driver") && basename "$l" || echo none; }
leftover() {
  if echo "${1:-1b36 0010}" > /sys/bus/pci/drivers/vfio-pci/remove_id 2>/dev/null; then echo id-left
  else echo no-id-left; fi
}
wait_blk() { i=0; while [ ! -b "$1" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done; }
sha_of() { wait_blk "$1"; sha256sum "$1" | cut -d' ' -f1; }
release_fbcon() {  # the host's text console leaves the framebuffers, so a display is no longer in use
  for v in /sys/class/vtconsole/vtcon*; do
    grep -q "frame buffer" "$v/name" 2>/dev/null && echo 0 > "$v/bind"
  done
  true
}
"""


def lab_script(body: str, **variables: str) -> str:
    """PRELUDE, `NAME=value` for each keyword (values go unquoted: keep them shell words), then body."""
    assigned = "".join(f"{name}={value}\n" for name, value in variables.items())
    return PRELUDE + assigned + body


def sections(out: str) -> dict[str, str]:
    """The output of a script split at its `=== NAME` lines: {NAME: the lines after it, joined}."""
    found: dict[str, list[str]] = {}
    current = None
    for line in out.splitlines():
        if line.startswith("=== "):
            current = line[4:].strip()
            found[current] = []
        elif current is not None:
            found[current].append(line)
    return {k: "\n".join(v) for k, v in found.items()}
