"""The API's routes: `/api/v1/<endpoint>`, its method and body rules, and each endpoint's answer, as
cloud-hypervisor gives them (docs/api.md#endpoints). Runs on the main thread (pyvmm.api.vmm.ApiVmm.run).

Endpoints pyvmm does not serve are answered as an unknown path is (404 ["Not Found"]), which is how
cloud-hypervisor answers an endpoint its build leaves out. Hot-plug (vm.add-device, vm.remove-device)
is the seam below: the routes exist and turn on once the running VM has `add_device`/`remove_device`.
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
    vm_config_from_json,
    vm_config_to_json,
    with_device,
)
from pyvmm.api.vmm import NOT_CREATED, NOT_RUNNING, ApiCallError, ApiVmm
from pyvmm.config import ConsoleMode, VmConfig
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
    config = vmm.config
    if config is None:
        raise ApiCallError(Status.INTERNAL_SERVER_ERROR, "The VM info is not available", NOT_CREATED)
    state = vmm.state
    assert state is not None
    info: dict[str, Any] = {}
    machine = vmm.machine
    if machine is None:
        info["config"] = vm_config_to_json(config)
    else:
        ids = device_ids(config)
        info["config"] = vm_config_to_json(config, {i: name for i, name in enumerate(ids[2])})
    info["state"] = state.value
    info["memory_actual_size"] = config.memory.size
    if machine is not None:
        info["device_tree"] = device_tree(config, machine)
    return json_response(Status.OK, info)


def device_ids(config: VmConfig) -> tuple[str | None, str, list[str]]:
    """The names of the console (None when off), the rng, and the disks + devices: their `id=` or, as CH
    names them, `_disk<n>` / `_vfio<n>` from one counter in creation order."""
    console = None if config.console.mode is ConsoleMode.OFF else (config.console.id or "__console")
    counter = 0
    names = []
    for prefix, items in (("_disk", config.disks), ("_vfio", config.devices)):
        for item in items:
            if item.id is not None:
                names.append(item.id)
            else:
                names.append(f"{prefix}{counter}")
                counter += 1
    return console, "__rng", names


_BAR_TYPES = {BarKind.IO: "Io", BarKind.MEM32: "Mmio32", BarKind.MEM64: "Mmio64"}


def device_tree(config: VmConfig, machine: Any) -> dict[str, Any]:
    """Every PCI device of the running VM by name: its BARs and `pci_bdf` (what Kata and ch-remote read).
    Passed-through functions as the VM has them now (hot-plugged ones in, ejected ones out), by the ids
    vm.remove-device takes."""
    console, rng, names = device_ids(config)
    virtio = ([console] if console is not None else []) + names[: len(config.disks)] + [rng]
    # the builder plugs the virtio devices first (console, disks, rng), then the boot-time --devices
    placed = list(zip(virtio, machine.pci_addresses[: len(virtio)], strict=True))
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


def _add_device(vmm: ApiVmm, request: Request) -> Response:
    """The hot-plug seam: the running VM plugs the device (vm.add-device)."""
    try:
        device = device_config_from_json(_json_body(request))
    except VmConfigError as exc:
        raise ApiCallError(Status.BAD_REQUEST, "The device could not be added to the VM", str(exc)) from None
    machine: Any = vmm.machine
    if machine is None:
        if vmm.config is None:
            raise ApiCallError(
                Status.INTERNAL_SERVER_ERROR, "The device could not be added to the VM", NOT_CREATED
            )
        try:  # before boot, as CH: the device joins the config (checked as a whole)
            vmm.config = with_device(vmm.config, device)
        except VmConfigError as exc:
            raise ApiCallError(
                Status.BAD_REQUEST, "The device could not be added to the VM", str(exc)
            ) from None
        return NO_CONTENT
    try:
        info = machine.add_device(device)  # PciDeviceInfo: {"id", "bdf"}
    except PyvmmError as exc:  # refused (a partial IOMMU group, no free slot, ...): the guest goes on
        status = Status.BAD_REQUEST if exc.exit_status == 2 else Status.INTERNAL_SERVER_ERROR
        raise ApiCallError(status, "The device could not be added to the VM", str(exc)) from None
    return json_response(Status.OK, info)


def _remove_device(vmm: ApiVmm, request: Request) -> Response:
    """The hot-plug seam: the running VM asks the guest to eject the device (vm.remove-device)."""
    document = _json_body(request)
    ident = document.get("id") if isinstance(document, dict) else None
    if not isinstance(ident, str):
        raise ApiCallError(Status.BAD_REQUEST, "Cannot deserialize JSON payload", "missing field `id`")
    machine: Any = vmm.machine
    if machine is None:
        raise ApiCallError(
            Status.INTERNAL_SERVER_ERROR, "The device could not be removed from the VM", NOT_RUNNING
        )
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
    "vm.add-device": Route("PUT", Body.REQUIRED, _add_device),
    "vm.remove-device": Route("PUT", Body.REQUIRED, _remove_device),
}
