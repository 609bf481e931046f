"""Two pyvmm-host processes on one device at once, and a journal directory someone tampered with (issue 19).

Everything a bind or unbind does, from the scan on, happens under the journal's lock: the second process
waits for the first and then finds its result (the device already on vfio-pci, or already given back), so
both exit 0, the journal holds one record, and nothing is undone by the loser. A held lock makes the race
certain: both processes start while a stand-in holds it, so both are past their imports and waiting when
it is released. One lab boot for all of it.
"""

from __future__ import annotations

import json

import pytest
from helpers.lab_script import lab_script, sections

pytestmark = pytest.mark.lab

HOLD_SECONDS = 15  # longer than pyvmm-host's start under emulation: both reach the lock while it is held

RACE = lab_script(
    r"""
hold() {  # hold the journal lock for $1 seconds, as another pyvmm-host would
  python3 -c 'import fcntl, os, sys, time
fd = os.open("/run/pyvmm/host.lock", os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(float(sys.argv[1]))' "$1"
}
race() {  # run `pyvmm-host $1 $SD` twice at once while the lock is held; print both exit codes and outputs
  mkdir -p -m 700 /run/pyvmm
  hold $HOLD > /tmp/hold.out & h=$!
  while ! grep -q held /tmp/hold.out 2>/dev/null; do sleep 0.1; done
  pyvmm-host "$1" $SD > /tmp/r1 2>&1 & p1=$!
  pyvmm-host "$1" $SD > /tmp/r2 2>&1 & p2=$!
  sleep $((HOLD - 3))
  kill -0 $p1 2>/dev/null && kill -0 $p2 2>/dev/null && echo "both-waiting driver=$(drv $SD)"
  wait $h
  wait $p1; echo "rc1=$?"
  wait $p2; echo "rc2=$?"
  cat /tmp/r1 /tmp/r2
}
sec bind; race bind
sec bound; drv $SD; cat /run/pyvmm/host-journal.json
sec unbind; race unbind
sec unbound; drv $SD; test -e /run/pyvmm/host-journal.json && echo journal-left || echo no-journal
sec mode; stat -c '%a %U %F' /run/pyvmm
sec dir-symlink
mv /run/pyvmm /run/pyvmm.real && ln -s /run/pyvmm.real /run/pyvmm
pyvmm-host bind $SD; echo "rc=$?"; drv $SD
rm /run/pyvmm && mv /run/pyvmm.real /run/pyvmm
sec dir-mode
chmod 0777 /run/pyvmm; pyvmm-host bind $SD; echo "rc=$?"; drv $SD; chmod 0700 /run/pyvmm
sec file-symlink
echo '{}' > /tmp/elsewhere.json && ln -s /tmp/elsewhere.json /run/pyvmm/host-journal.json
pyvmm-host restore --all; echo "rc=$?"
rm /run/pyvmm/host-journal.json
sec tampered
cat > /run/pyvmm/host-journal.json <<'EOF'
{"format": "pyvmm-host-journal", "version": 1, "new_ids": [], "params": [],
 "devices": [{"bdf": "0000:00:03.0", "driver": "../../../../../tmp/x", "driver_override": null,
              "ids": "1b36:0007", "method": "driver_override"}]}
EOF
pyvmm-host restore --all; echo "rc=$?"; drv $SD
rm /run/pyvmm/host-journal.json
sec clean; pyvmm-host bind $SD; echo "rc=$?"; pyvmm-host unbind $SD; echo "rc=$?"; drv $SD
""",
    SD="0000:00:03.0",
    HOLD=str(HOLD_SECONDS),
)


def test_concurrent_binds_and_unbinds_serialise_and_a_tampered_journal_is_refused(lab) -> None:
    proc = lab(RACE, devices="sd")
    out = sections(proc.stdout)
    assert proc.returncode == 0, proc.stdout

    # Both binds waited for the lock (nothing changed meanwhile); then one bound, the other found it bound.
    bind = out["bind"]
    assert "both-waiting driver=sdhci-pci" in bind, bind
    assert "rc1=0" in bind and "rc2=0" in bind, bind
    assert bind.count("0000:00:03.0: bound to vfio-pci (was sdhci-pci)") == 1, bind
    assert bind.count("0000:00:03.0: already bound to vfio-pci, nothing to do") == 1, bind
    bound = out["bound"].splitlines()
    assert bound[0] == "vfio-pci", out["bound"]
    assert json.loads("\n".join(bound[1:]))["devices"] == [{
        "bdf": "0000:00:03.0", "driver": "sdhci-pci", "driver_override": None, "ids": "1b36:0007",
        "method": "driver_override",
    }]

    # Two unbinds: one gives it back, the other finds nothing to do; the journal is gone.
    unbind = out["unbind"]
    assert "both-waiting driver=vfio-pci" in unbind, unbind
    assert "rc1=0" in unbind and "rc2=0" in unbind, unbind
    assert unbind.count("0000:00:03.0: given back to sdhci-pci") == 1, unbind
    assert unbind.count("0000:00:03.0: not bound to vfio-pci, nothing to do") == 1, unbind
    assert out["unbound"].splitlines() == ["sdhci-pci", "no-journal"]
    assert out["mode"] == "700 root directory"

    # A symlinked or world-writable journal directory, a symlinked journal file, a journal whose driver
    # name would leave /sys/bus/pci: each refused in one line, nothing changed.
    assert out["dir-symlink"].splitlines() == [
        "pyvmm-host: journal directory /run/pyvmm is a symbolic link: remove it (pyvmm-host creates a real "
        "directory)",
        "rc=1", "sdhci-pci",
    ]
    dir_mode = out["dir-mode"].splitlines()
    assert dir_mode[0].startswith("pyvmm-host: journal directory /run/pyvmm is writable by group or others "
                                  "(mode 0777)"), out["dir-mode"]
    assert dir_mode[1:] == ["rc=1", "sdhci-pci"]
    assert out["file-symlink"].splitlines() == [
        "pyvmm-host: journal file /run/pyvmm/host-journal.json is a symbolic link: remove it", "rc=1",
    ]
    tampered = out["tampered"].splitlines()
    damaged = "pyvmm-host: the journal /run/pyvmm/host-journal.json is damaged: "
    assert tampered[0].startswith(damaged), tampered
    assert "driver '../../../../../tmp/x' is not a plain name" in tampered[0]
    assert tampered[1:] == ["rc=1", "sdhci-pci"]

    # And the directory, repaired, works again.
    clean = out["clean"]
    assert clean.count("rc=0") == 2 and "given back to sdhci-pci" in clean, clean
    assert clean.splitlines()[-1] == "sdhci-pci", clean
