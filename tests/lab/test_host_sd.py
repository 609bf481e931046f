"""pyvmm-host on the lab's SD card reader: bind to vfio-pci, give back, the card still reads the same;
idempotence, DEVICE spellings and the journal on the real kernel (issue 4). In the same lab, issue 19's
in-use checks: the card open in a process, the NIC up in another network namespace, the display's fbcon."""

from __future__ import annotations

import json

import pytest
from helpers.lab_script import lab_script, sections

pytestmark = pytest.mark.lab

PRELUDE = lab_script(
    "",
    SD="0000:00:03.0",
    NIC="0000:00:04.0",
    DISP="0000:00:05.0",
)

IN_USE = r"""
sec open-block
wait_blk /dev/mmcblk0
sleep 300 < /dev/mmcblk0 & holder=$!
sleep 0.5; pyvmm-host bind $SD; echo "rc=$?"; echo "holder=$holder"; drv $SD
kill $holder; wait $holder 2>/dev/null
sec netns
IF=$(ls /sys/bus/pci/devices/$NIC/net/ | head -1); echo "if=$IF"
unshare --net sleep 300 & ns=$!; sleep 0.5; echo "ns=$ns"
busybox ip link set "$IF" netns $ns; echo "moved=$?"
nsenter -t $ns -n busybox ip addr add 10.99.0.1/24 dev "$IF"; nsenter -t $ns -n busybox ip link set "$IF" up
echo "up-there=$?"; echo "sysfs-here=[$(ls /sys/bus/pci/devices/$NIC/net/ 2>/dev/null)]"
pyvmm-host bind $NIC; echo "rc=$?"; drv $NIC
kill $ns; wait $ns 2>/dev/null
sec display
for v in /sys/class/vtconsole/*; do echo "vtcon $(cat $v/bind) $(cat $v/name)"; done
d=/sys/bus/pci/devices/$DISP; echo "graphics=[$(ls $d/graphics 2>/dev/null)] drm=[$(ls $d/drm 2>/dev/null)]"
pyvmm-host bind --dry-run --group $DISP; echo "rc=$?"; drv $DISP
"""


SD_ROUND_TRIP = PRELUDE + IN_USE + r"""
sec bind; pyvmm-host bind /sys/bus/pci/devices/$SD/; echo "rc=$?"
sec bound
drv $SD
g=$(basename "$(readlink /sys/bus/pci/devices/$SD/iommu_group)")
test -c "/dev/vfio/$g" && echo "vfio-node=/dev/vfio/$g"
sec journal; cat /run/pyvmm/host-journal.json
sec again; pyvmm-host bind 00:03.0; echo "rc=$?"
sec unbind; pyvmm-host unbind 00:03.0; echo "rc=$?"
sec given-back; drv $SD; cat /sys/bus/pci/devices/$SD/driver_override; ls /run/pyvmm
sec card
i=0; while [ ! -b /dev/mmcblk0 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
echo "read=$(sha256sum /dev/mmcblk0 | cut -d' ' -f1)"
echo "want=$PYVMM_LAB_SD_SHA256"
sec unbind-again; pyvmm-host unbind $SD; echo "rc=$?"
sec unknown; pyvmm-host bind 00:1e.0; echo "rc=$?"
"""


def test_sd_reader_goes_to_vfio_and_comes_back_reading_the_same(lab) -> None:
    proc = lab(SD_ROUND_TRIP, devices="sd,nic,gpu-audio")
    out = sections(proc.stdout)
    assert proc.returncode == 0, proc.stdout

    # Issue 19: a block device open in a process is in use; the message names the process and the fix.
    lines = out["open-block"].splitlines()
    holder = next(line for line in lines if line.startswith("holder=")).split("=")[1]
    assert lines[0] == (
        f"pyvmm-host: 0000:00:03.0: in use by the host: /dev/mmcblk0 is open in process {holder} (sleep) "
        f"(end it: kill {holder}); stop that first, or override with --force"
    ), lines
    assert lines[1] == "rc=1" and lines[-1] == "sdhci-pci", lines
    # An interface moved into another network namespace (one only a process holds) and up there: sysfs here
    # no longer lists it, pyvmm-host still finds it.
    net = out["netns"]
    iface = net.splitlines()[0].split("=")[1]
    ns = next(line for line in net.splitlines() if line.startswith("ns=")).split("=")[1]
    assert "moved=0" in net and "up-there=0" in net and "sysfs-here=[]" in net, net
    assert (f"0000:00:04.0: in use by the host: network interface {iface} is up in the network namespace of "
            f"process {ns} (sleep) (nsenter -t {ns} -n ip link set {iface} down)") in net, net
    assert net.splitlines()[-2:] == ["rc=1", "e1000e"], net
    # The display: refused while fbcon draws the host's console on its framebuffer.
    display = out["display"]
    fbcon = any(line.startswith("vtcon 1 ") and "frame buffer" in line for line in display.splitlines())
    if fbcon and "graphics=[fb" in display:
        assert "its framebuffer fb0 shows the host's text console (fbcon) (echo 0 > /sys/class/vtconsole/" \
            in display, display
        assert display.splitlines()[-2] == "rc=1", display
    else:
        assert display.splitlines()[-2] == "rc=0", display

    # Bound (spelled as a sysfs path with its trailing slash), verified, group node present.
    assert "rc=0" in out["bind"] and "0000:00:03.0: bound to vfio-pci (was sdhci-pci)" in out["bind"]
    bound = out["bound"].splitlines()
    assert bound[0] == "vfio-pci" and bound[1].startswith("vfio-node=/dev/vfio/"), out["bound"]

    # The journal recorded the original state before the change.
    journal = json.loads(out["journal"])
    assert journal["devices"] == [{
        "bdf": "0000:00:03.0", "driver": "sdhci-pci", "driver_override": None, "ids": "1b36:0007",
        "method": "driver_override",
    }]

    # Binding a bound device is a no-op that says so (spelled short this time).
    assert "rc=0" in out["again"] and "already bound to vfio-pci, nothing to do" in out["again"]

    # unbind gives it back to sdhci-pci, clears the override, empties the journal.
    assert "rc=0" in out["unbind"] and "given back to sdhci-pci" in out["unbind"]
    back = out["given-back"].splitlines()
    assert back[0] == "sdhci-pci" and back[1] == "(null)" and "host-journal.json" not in out["given-back"]

    # The card behind the reader reads exactly as before.
    lines = dict(line.split("=", 1) for line in out["card"].splitlines())
    assert lines["read"] == lines["want"] and len(lines["want"]) == 64

    assert "rc=0" in out["unbind-again"] and "not bound to vfio-pci, nothing to do" in out["unbind-again"]
    unknown = out["unknown"].splitlines()
    assert unknown == ["pyvmm-host: 00:1e.0: no such PCI device (see `pyvmm-host list`)", "rc=2"]
