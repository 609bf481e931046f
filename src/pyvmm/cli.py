"""`pyvmm`: parse and check the command line, build the VM, run it; one-line errors, exit 2 for usage."""

from __future__ import annotations

import logging
import sys

from pyvmm.config import check_paths, parse_command_line
from pyvmm.errors import ExitStatus, PyvmmError
from pyvmm.events import EventMonitor


def _setup_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="pyvmm: %(levelname)s: %(message)s", stream=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        command_line = parse_command_line(args)
        config = command_line.vm
        if config is not None:
            check_paths(config)
        _setup_logging(command_line.verbosity)
        events = EventMonitor.open(command_line.event_monitor)
        events.emit("vmm", "starting")
        try:
            if command_line.api_socket is not None:
                from pyvmm.api import serve

                return serve(command_line, events)
            assert config is not None
            # Imported here so that usage errors and --help never need KVM or ctypes set up.
            from pyvmm.vmm import run_vm

            return run_vm(config, events)
        finally:
            events.emit("vmm", "shutdown")
            events.close()
    except PyvmmError as exc:  # every failure a user can cause: one line, its own exit status
        print(f"pyvmm: {exc}", file=sys.stderr)
        return int(exc.exit_status)
    except OSError as exc:  # a host failure no layer foresaw (e.g. out of file descriptors): still one line
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"pyvmm: {where}{exc.strerror or exc}", file=sys.stderr)
        return int(ExitStatus.FAILURE)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
