"""A KVM ioctl failing while the VM is built ends pyvmm with one line and exit status 1, never a traceback
(issue 16, acceptance 2). The failure is real: pyvmm runs under ever larger file-descriptor limits, so that
KVM_CREATE_VM, KVM_CREATE_VCPU or the vCPU's run-area mapping runs out of descriptors at some step of the
build, whichever step that is on this kernel."""

from __future__ import annotations

import re

import pytest
from helpers.lab_script import lab_script, sections

pytestmark = pytest.mark.lab

LIMITS = range(5, 25)

# From the lowest limit up, until one is enough to build and run the VM: that one runs (its guest may be slow
# to boot under emulation) and is stopped with SIGTERM after 20 s, which ends pyvmm with status 0. A limit
# just enough to build the VM can still run out while it runs (the guest enabling MSI-X vectors makes
# pyvmm open their eventfds): one line naming "Too many open files", and the next limit is tried. A pyvmm
# that outlives SIGTERM by 30 s is a failure of its own (`STUCK`): the script then shows where each of its
# threads waits (user and kernel stacks, the lab's last kernel messages) and kills it, instead of leaving
# the lab to its timeout.
SCRIPT = lab_script(
    r"""
for n in @LIMITS@; do
  sec "nofile=$n"
  PYTHONFAULTHANDLER=1 prlimit --nofile=$n pyvmm --kernel "$PYVMM_GUEST_KERNEL" \
    --initramfs "$PYVMM_GUEST_INITRAMFS" --cpus boot=4 --memory size=256M --serial null --console off \
    --cmdline 'console=ttyS0 quiet pyvmm.cmd=true' > $TMPDIR/out.log 2> $TMPDIR/err.log &
  pid=$!
  i=0; while [ $i -lt 40 ] && kill -0 $pid 2>/dev/null; do sleep 0.5; i=$((i+1)); done
  stuck=
  if kill -0 $pid 2>/dev/null; then
    kill -TERM $pid
    i=0; while [ $i -lt 60 ] && [ -d /proc/$pid/task ] && ! grep -q '^State:.*Z' /proc/$pid/status; do
      sleep 0.5; i=$((i+1)); done
    if [ -d /proc/$pid/task ] && ! grep -q '^State:.*Z' /proc/$pid/status; then
      stuck=1
      echo "STUCK: pyvmm outlived SIGTERM by 30 s"
      for t in /proc/$pid/task/*; do
        echo "thread $(cat $t/comm) $(sed -n 's/^State:\t//p' $t/status) wchan=$(cat $t/wchan)"
        sed 's/^/  /' $t/stack 2>/dev/null
      done
      kill -ABRT $pid; sleep 3  # faulthandler: every Python thread's stack on stderr
      kill -KILL $pid 2>/dev/null
      dmesg | tail -n 40 | sed 's/^/DMESG /'
    fi
  fi
  if [ -n "$stuck" ]; then rc=stuck; else wait $pid; rc=$?; fi  # stuck: wait could block
  echo "rc=$rc"
  sed 's/^/ERR /' $TMPDIR/err.log
  [ -n "$stuck" ] && break
  if [ $rc = 0 ] || [ $rc = 143 ]; then grep -q "Too many open files" $TMPDIR/err.log || break; fi
done
sec end
""".replace("@LIMITS@", " ".join(str(n) for n in LIMITS))
)


def test_an_ioctl_failing_during_the_build_is_one_line_and_exit_1(lab) -> None:
    out = lab(SCRIPT, timeout=900).stdout  # 1 lab CPU: each limit below the last fails in its first second
    found = sections(out)
    assert "end" in found, out
    assert "STUCK" not in out, out
    ioctl_failures = 0
    tried = [n for n in LIMITS if f"nofile={n}" in found]
    for n in tried:
        text = found[f"nofile={n}"]
        rc = int(re.search(r"^rc=(\d+)$", text, re.MULTILINE).group(1))
        errors = [line[4:] for line in text.splitlines() if line.startswith("ERR ")]
        assert "Traceback" not in text, text
        if n == tried[-1]:  # enough descriptors for the whole VM: it ran until stopped (or powered off)
            # 143: SIGTERM came while it was still building, before it handles the signal (a slow lab)
            assert rc in (0, 143) and errors in ([], ["pyvmm: stopped by SIGTERM"]), (n, text)
            continue
        assert len(errors) == 1 and errors[0].startswith("pyvmm: "), (n, text)
        # 143: out of descriptors while the VM ran, and the SIGTERM after 20 s came during its teardown
        ran_out = rc == 143 and errors[0].endswith("Too many open files")
        assert rc == (2 if "--kernel" in errors[0] else 1) or ran_out, (n, text)  # the kernel file: usage
        if re.search(r"pyvmm: KVM_\w+ failed: Too many open files$", errors[0]):
            ioctl_failures += 1
    assert ioctl_failures >= 1, out
