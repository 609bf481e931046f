"""Kernel vhost backends: the guest's virtqueues served by the kernel, pyvmm on the control path only.

bindings.py mirrors linux/vhost.h and vhost_types.h; backend.py is the part every vhost device shares (owner,
features, the memory table from guest RAM, one vring from one virtqueue); net.py adds /dev/vhost-net's
backend (a tap per queue pair). docs/net.md describes the whole path.
"""
