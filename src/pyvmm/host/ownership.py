"""`pyvmm-host bind --owner USER`: an IOMMU group's VFIO node (/dev/vfio/<group>) handed to one user, so
that pyvmm can run as that user (libvirt's model: it chowns the node to the VM's user); journalled before
the change and given back by `unbind` and `restore` (README.md, "Running pyvmm as an ordinary user")."""

from __future__ import annotations

import os
import pwd
import stat

from pyvmm.pci_sysfs import DEV_VFIO

from .actions import Changer, Step
from .errors import HostError, HostUsageError
from .journal import Journal, NodeRecord


def resolve_owner(name: str) -> int:
    """A user name or a numeric uid -> uid; HostUsageError when there is no such user."""
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        pass
    if name.isdigit():
        return int(name)
    raise HostUsageError(f"--owner {name}: no such user (a user name or a numeric uid)")


def _node_stat(group: str) -> os.stat_result | None:
    path = DEV_VFIO / group
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISCHR(st.st_mode):
        raise HostError(f"{path} is not a character device (a symlink or file planted there?); remove it")
    return st


def _set(changer: Changer, group: str, uid: int, gid: int, mode: int) -> None:
    path = DEV_VFIO / group
    changer.note(Step(f"group {group}", argv=("chown", f"{uid}:{gid}", str(path))))
    changer.note(Step(f"group {group}", argv=("chmod", f"{mode:04o}", str(path))))
    if changer.dry_run:
        return
    try:
        os.chown(path, uid, gid, follow_symlinks=False)
        os.chmod(path, mode)  # the node was checked to be a character device, never a link
    except OSError as e:
        raise HostError(f"{path}: cannot set its owner: {e.strerror}") from None


def hand_over(changer: Changer, journal: Journal, group: str, uid: int) -> None:
    """Make /dev/vfio/<group> read-write for `uid` alone (owner uid, mode 0600), journalled first."""
    st = _node_stat(group)
    if st is None:
        if changer.dry_run:
            return
        raise HostError(f"{DEV_VFIO / group} did not appear: is the group bound to vfio-pci?")
    journal.record_node(NodeRecord(group, st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)))
    _set(changer, group, uid, st.st_gid, 0o600)


def give_back_node(changer: Changer, journal: Journal, group: str) -> None:
    """The node's journalled owner and mode back (if the node still exists), then forget the record."""
    record = journal.state.nodes.get(group)
    if record is None:
        return
    if _node_stat(group) is not None:
        _set(changer, group, record.uid, record.gid, record.mode)
    journal.forget_node(group)
