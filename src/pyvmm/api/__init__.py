"""cloud-hypervisor's REST API on `--api-socket` (docs/api.md): http.py (request parsing, CH's response
framing), server.py (the socket and its thread), vmconfig.py (VmConfig JSON <-> pyvmm's VmConfig),
vmm.py (the VMM state the calls change, on the main thread), endpoints.py (routes and answers),
client.py (the client side, for `pyvmm-remote`).
"""

from __future__ import annotations

import logging

from pyvmm.config import CommandLine
from pyvmm.events import EventMonitor

log = logging.getLogger("pyvmm.api")


def serve(command_line: CommandLine, events: EventMonitor | None = None) -> int:
    """`pyvmm --api-socket ...`: serve the API; boot the command line's VM, if it has one, at once."""
    from pyvmm import seccomp
    from pyvmm.api.server import ApiServer, open_listener
    from pyvmm.api.vmm import ApiCallError, ApiVmm, report_exit
    from pyvmm.errors import PyvmmError, VmError
    from pyvmm.sandbox import SeccompMode, ThreadKind
    from pyvmm.vhost.spawner import start_spawner, stop_spawner
    from pyvmm.vhost.storage_daemon import storage_daemon_binary

    api = command_line.api_socket
    assert api is not None
    vmm = ApiVmm(command_line.verbosity, events)
    listener = open_listener(api)
    server = ApiServer(listener, vmm.submit, path=api.path)
    # Before the first call is served: VMs are built and hot-plugged under the API_VMM filter, and the
    # server thread takes its own as it starts (docs/seccomp.md#when). The filter allows no new program:
    # the disks' qemu-storage-daemons are started by a spawner started now (vhost/spawner.py).
    if command_line.seccomp is not SeccompMode.FALSE:
        start_spawner(storage_daemon_binary())
    seccomp.install(command_line.seccomp, ThreadKind.API_VMM)
    server.start()
    try:
        if command_line.vm is not None:
            vmm.create(command_line.vm)
            try:
                vmm.boot()
            except ApiCallError as exc:  # ends pyvmm as the same error would without --api-socket
                if isinstance(exc.__cause__, PyvmmError):
                    raise exc.__cause__ from None
                raise VmError(exc.reason) from None
        result = vmm.run()
    finally:
        server.close()
        stop_spawner()
    return report_exit(result)
