"""The API's routes: `/api/v1/<endpoint>`, its method and body rules, and each endpoint's answer, as
cloud-hypervisor gives them (docs/api.md#endpoints). Runs on the main thread (pyvmm.api.vmm.ApiVmm.run).

Endpoints pyvmm does not serve are answered as an unknown path is (404 ["Not Found"]), which is how
cloud-hypervisor answers an endpoint its build leaves out. Hot-plug (vm.add-device, vm.add-disk,
vm.add-net, vm.remove-device), vm.power-button and vm.counters are carried out by the running
VirtualMachine.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

from pyvmm import __version__
from pyvmm.api.http import NO_CONTENT, Request, Response, Status, error_response, json_response
from pyvmm.api.vmconfig import (
    VmConfigError,
    device_config_from_json,
    disk_config_from_json,
    net_config_from_json,
    vm_config_from_json,
    vm_config_to_json,
    with_device,
)
from pyvmm.api.vmm import NOT_CREATED, NOT_RUNNING, ApiCallError, ApiVmm
from pyvmm.config import ConsoleMode, DeviceConfig, DiskConfig, NetConfig, VmConfig
from pyvmm.device_ids import BootNames, vm_boot_ids
from pyvmm.errors import PyvmmError
from pyvmm.pci.bar import BarKind

API_PREFIX = "/api/v1/"
NOT_FOUND = error_response(Status.NOT_FOUND, ["Not Found"])


class Body(Enum):
    NONE = "none"  # a body is a 400
    REQUIRED = "required"  # a missing body is a 400


@dataclass(frozen=True)
class Route:
    method: str
    body: Body
    handle: Callable[[ApiVmm, Request], Response]
    # CH's own handlers of these answer a bad request with ["Bad Request"], the generic one with no body
    named_bad_request: bool = False


def route(vmm: ApiVmm, request: Request) -> Response:
    """The response to one request."""
    if not request.path.startswith(API_PREFIX):
        return NOT_FOUND
    endpoint = ROUTES.get(request.path[len(API_PREFIX) :])
    if endpoint is None:
        return NOT_FOUND
    bad = (
        error_response(Status.BAD_REQUEST, ["Bad Request"])
        if endpoint.named_bad_request
        else Response(Status.BAD_REQUEST)
    )
    if request.method != endpoint.method:
        return bad
    if endpoint.body is Body.NONE and request.body:
        return bad
    if endpoint.body is Body.REQUIRED and not request.body:
        return bad
    return endpoint.handle(vmm, request)


def _json_body(request: Request) -> Any:
    try:
        return json.loads(request.body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ApiCallError(Status.BAD_REQUEST, "Cannot deserialize JSON payload", str(exc)) from None


# --- handlers --------------------------------------------------------------------------------------------


def _ping(vmm: ApiVmm, request: Request) -> Response:
    return json_response(
        Status.OK,
        {"build_version": f"v{__version__}", "version": __version__, "pid": os.getpid(), "features": ["kvm"]},
    )


def _shutdown_vmm(vmm: ApiVmm, request: Request) -> Response:
    vmm.shutdown_vmm()
    return Response(Status.OK)  # CH answers 200 with an empty body here (not 204)


def _create(vmm: ApiVmm, request: Request) -> Response:
    document = _json_body(request)
    try:
        config = vm_config_from_json(document, vmm.verbosity)
    except VmConfigError as exc:
        raise ApiCallError(Status.BAD_REQUEST, "The VM could not be created", str(exc)) from None
    vmm.create(config)  # fds sent with vm.create are not used (as CH); the server closes them
    return NO_CONTENT


def _action(action: Callable[[ApiVmm], None]) -> Callable[[ApiVmm, Request], Response]:
    def handle(vmm: ApiVmm, request: Request) -> Response:
        action(vmm)
        return NO_CONTENT

    return handle


def _info(vmm: ApiVmm, request: Request) -> Response:
    booted = vmm.config
    config = vmm.current_config()  # a running VM's disks and devices as they are now, with their ids
    if booted is None or config is None:
        raise ApiCallError(Status.INTERNAL_SERVER_ERROR, "The VM info is not available", NOT_CREATED)
    state = vmm.state
    assert state is not None
    info: dict[str, Any] = {}
    machine = vmm.machine
    info["config"] = vm_config_to_json(config)
    info["state"] = state.value
    info["memory_actual_size"] = config.memory.size
    if machine is not None:
        info["device_tree"] = device_tree(booted, machine)
    return json_response(Status.OK, info)


def device_ids(config: VmConfig) -> tuple[str | None, str, BootNames]:
    """The names of the console (None when off), the rng, and the other boot-time devices: their `id=`
    or, as CH names them, `_disk<n>`, `_net<n>`, `_fs<n>`, `_vsock<n>`, `_vfio<n>` from one counter in
    creation order (pyvmm.device_ids)."""
    console = None if config.console.mode is ConsoleMode.OFF else (config.console.id or "__console")
    _ids, names = vm_boot_ids(config)
    return console, "__rng", names


_BAR_TYPES = {BarKind.IO: "Io", BarKind.MEM32: "Mmio32", BarKind.MEM64: "Mmio64"}


def device_tree(config: VmConfig, machine: Any) -> dict[str, Any]:
    """Every PCI device of the running VM by name: its BARs and `pci_bdf` (what Kata and ch-remote read).
    Passed-through functions as the VM has them now (hot-plugged ones in, ejected ones out), by the ids
    vm.remove-device takes."""
    console, rng, names = device_ids(config)
    # the builder plugs the console, the disks, the nets, the rng, the --fs and the --vsock first, then the
    # boot-time --devices; disks, nets and devices as the VM has them now (hot-plugged in, ejected out)
    # come from its hot-plug side
    addresses = machine.pci_addresses
    placed = [] if console is None else [(console, addresses[0])]
    rng_at = len(placed) + len(config.disks) + len(config.nets)
    placed.append((rng, addresses[rng_at]))
    placed += [(name, addresses[rng_at + 1 + i]) for i, name in enumerate(names.fs + names.vsock)]
    placed += sorted(machine.hotplug.devices().items(), key=lambda item: (item[1].segment, item[1].slot))
    tree: dict[str, Any] = {}
    for name, address in placed:
        resources = [
            {
                "PciBar": {
                    "index": p.index,
                    "base": p.address,
                    "size": p.size,
                    "type_": _BAR_TYPES.get(p.kind, "Mmio32"),
                }
            }
            for p in machine.platform.placements(address)
        ]
        tree[name] = {
            "id": name,
            "resources": resources,
            "parent": None,
            "children": [],
            "pci_bdf": str(address),
        }
    return tree


def _add(kind: str, parse: Callable[[Any], DeviceConfig | DiskConfig]) -> Callable[[ApiVmm, Request],
                                                                                  Response]:
    """vm.add-device / vm.add-disk: the running VM plugs it (200 PciDeviceInfo), or before boot it joins
    the stored config (204), as in CH."""
    context = f"The {kind} could not be added to the VM"

    def handle(vmm: ApiVmm, request: Request) -> Response:
        try:
            device = parse(_json_body(request))
        except VmConfigError as exc:
            raise ApiCallError(Status.BAD_REQUEST, context, str(exc)) from None
        machine: Any = vmm.machine
        if machine is None:
            if vmm.config is None:
                raise ApiCallError(Status.INTERNAL_SERVER_ERROR, context, NOT_CREATED)
            try:  # before boot: the device joins the config (checked as a whole)
                vmm.config = with_device(vmm.config, device)
            except VmConfigError as exc:
                raise ApiCallError(Status.BAD_REQUEST, context, str(exc)) from None
            return NO_CONTENT
        try:  # PciDeviceInfo: {"id", "bdf"}
            info = machine.add_disk(device) if isinstance(device, DiskConfig) else machine.add_device(device)
        except PyvmmError as exc:  # refused (a partial IOMMU group, no free slot, ...): the guest goes on
            status = Status.BAD_REQUEST if exc.exit_status == 2 else Status.INTERNAL_SERVER_ERROR
            raise ApiCallError(status, context, str(exc)) from None
        return json_response(Status.OK, info)

    return handle


def _add_net(vmm: ApiVmm, request: Request) -> Response:
    """vm.add-net: a NetConfig with the tap's queue files attached (SCM_RIGHTS, as Kata sends them) or a
    `tap` name. Before boot the NIC joins the config (204), after boot it is hot-plugged (200
    PciDeviceInfo). The received fds are this call's: refused, they are closed; accepted, the VMM keeps
    them while a config has the NIC (docs/api.md#vmadd-net)."""
    context = "The net could not be added to the VM"
    fds, request.fds = list(request.fds), []  # ours now, not the server's to close
    try:
        net = _net_request(vmm, request, fds, context)
        machine: Any = vmm.machine
        if machine is None:
            if vmm.config is None:
                raise ApiCallError(Status.INTERNAL_SERVER_ERROR, context, NOT_CREATED)
            try:
                config = with_device(vmm.config, net)
            except VmConfigError as exc:
                raise ApiCallError(Status.BAD_REQUEST, context, str(exc)) from None
            vmm.set_config(config)  # takes the fds
            return NO_CONTENT
        try:
            info = machine.add_net(net)
        except PyvmmError as exc:  # refused (no free slot, a taken id, vhost-net missing): the guest goes on
            status = Status.BAD_REQUEST if exc.exit_status == 2 else Status.INTERNAL_SERVER_ERROR
            raise ApiCallError(status, context, str(exc)) from None
        vmm.keep_fds(fds)  # the running VM has the NIC: vm.info shows it and vm.reboot reopens the tap
        return json_response(Status.OK, info)
    except BaseException:
        vmm.close_unowned(fds)
        raise


def _net_request(vmm: ApiVmm, request: Request, fds: list[int], context: str) -> NetConfig:
    """The NetConfig of an add-net request, its fds checked as --net fd=[...] (check_tap_fds)."""
    from pyvmm.host.tap import TapError, check_tap_fds

    try:
        net = net_config_from_json(_json_body(request), fds=tuple(fds))
    except VmConfigError as exc:
        raise ApiCallError(Status.BAD_REQUEST, context, str(exc)) from None
    if net.tap is None and not net.fds:
        raise ApiCallError(Status.BAD_REQUEST, context, "give the tap's queue files with the request "
                                                        "(SCM_RIGHTS) or name it with tap")
    if fds:
        try:
            check_tap_fds(fds)
        except TapError as exc:
            raise ApiCallError(Status.BAD_REQUEST, context, str(exc)) from None
    return net


def _running(vmm: ApiVmm, context: str) -> Any:
    if vmm.machine is None:
        raise ApiCallError(Status.INTERNAL_SERVER_ERROR, context, NOT_RUNNING)
    return vmm.machine


def _power_button(vmm: ApiVmm, request: Request) -> Response:
    _running(vmm, "Error triggering power button").power_button()
    return NO_CONTENT


def _counters(vmm: ApiVmm, request: Request) -> Response:
    return json_response(Status.OK, _running(vmm, "The VM counters are not available").counters())


def _remove_device(vmm: ApiVmm, request: Request) -> Response:
    """vm.remove-device: a running VM asks the guest to eject the device (the hot-plug seam); before boot
    the device leaves the stored config."""
    document = _json_body(request)
    ident = document.get("id") if isinstance(document, dict) else None
    if not isinstance(ident, str):
        raise ApiCallError(Status.BAD_REQUEST, "Cannot deserialize JSON payload", "missing field `id`")
    machine: Any = vmm.machine
    if machine is None:  # not booted: the device leaves the config
        vmm.remove_from_config(ident)
        return NO_CONTENT
    try:
        machine.remove_device(ident)
    except PyvmmError as exc:  # no such device
        status = Status.BAD_REQUEST if exc.exit_status == 2 else Status.INTERNAL_SERVER_ERROR
        raise ApiCallError(status, "The device could not be removed from the VM", str(exc)) from None
    return NO_CONTENT


ROUTES: dict[str, Route] = {
    "vmm.ping": Route("GET", Body.NONE, _ping, named_bad_request=True),
    "vmm.shutdown": Route("PUT", Body.NONE, _shutdown_vmm, named_bad_request=True),
    "vm.create": Route("PUT", Body.REQUIRED, _create, named_bad_request=True),
    "vm.info": Route("GET", Body.NONE, _info, named_bad_request=True),
    "vm.boot": Route("PUT", Body.NONE, _action(ApiVmm.boot)),
    "vm.shutdown": Route("PUT", Body.NONE, _action(ApiVmm.shutdown)),
    "vm.reboot": Route("PUT", Body.NONE, _action(ApiVmm.reboot)),
    "vm.delete": Route("PUT", Body.NONE, _action(ApiVmm.delete)),
    "vm.pause": Route("PUT", Body.NONE, _action(ApiVmm.pause)),
    "vm.resume": Route("PUT", Body.NONE, _action(ApiVmm.resume)),
    "vm.power-button": Route("PUT", Body.NONE, _power_button),
    "vm.counters": Route("GET", Body.NONE, _counters),
    "vm.add-device": Route("PUT", Body.REQUIRED, _add("device", device_config_from_json)),
    "vm.add-disk": Route("PUT", Body.REQUIRED, _add("disk", disk_config_from_json)),
    "vm.add-net": Route("PUT", Body.REQUIRED, _add_net),
    "vm.remove-device": Route("PUT", Body.REQUIRED, _remove_device),
}
