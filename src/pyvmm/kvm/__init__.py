"""KVM through ctypes.

bindings  structs, ioctl numbers and constants mirroring <linux/kvm.h> / <asm/kvm.h> (on pyvmm.ioctl)
system    Kvm (/dev/kvm), Vm (VM fd), Vcpu (vCPU fd + kvm_run page)
routing   GSI routing entries (irqchip / MSI) and KVM's default irqchip table
runloop   the per-vCPU run loop dispatching exits to the I/O buses, and its stop/kick mechanism
bus       Bus: what the run loop needs of an I/O bus (read/write by address; devices.bus.IoBus is one)
regs      register dumps for error reports
selftest  `python -m pyvmm.kvm.selftest`: a real-mode guest through the whole stack
"""
