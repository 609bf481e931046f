"""Runs in the lab for its whole life: holds one KVM VM (in-kernel irqchip, one vCPU that never runs).

Creating the first VM and destroying the last flip kernel static keys: KVM's preempt notifiers, which sit in
the scheduler's context switch, and the local APIC's "software disabled" key. Each flip rewrites kernel code
on every CPU (text_poke: int3, then IPIs). Under QEMU's multi-threaded TCG that patching of the scheduler
has livelocked the lab (soft lockups on both CPUs, a CPU taking int3 in __schedule). With this VM alive
the keys stay on, so starting and stopping VMMs in the lab patches nothing.

    python3 -m pyvmm.lab.anchor READY_FILE   (the lab's setup starts it; READY_FILE gets its pid)
"""

import os
import signal
import sys

from pyvmm.kvm.system import Kvm


def main() -> None:
    vm = Kvm().create_vm()
    vm.create_irqchip()
    vm.create_vcpu(0)
    with open(sys.argv[1], "w") as ready:
        ready.write(f"{os.getpid()}\n")
    while True:
        signal.pause()


if __name__ == "__main__":
    main()
