"""`pyvmm-remote --api-socket P <command> [args]`: drive a pyvmm (or cloud-hypervisor) through its API socket,
with ch-remote's subcommands and argument syntax; prints the response body (docs/api.md#pyvmm-remote).
Exit status: 0 on success, 1 when the VMM refused the call or could not be reached, 2 for usage errors.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from pyvmm.api.client import ApiClient, ApiClientError

# subcommand -> (method, endpoint); the body-less ones
_SIMPLE: dict[str, tuple[str, str]] = {
    "ping": ("GET", "vmm.ping"),
    "info": ("GET", "vm.info"),
    "counters": ("GET", "vm.counters"),
    "shutdown-vmm": ("PUT", "vmm.shutdown"),
    **{
        name: ("PUT", f"vm.{name}")
        for name in ("boot", "delete", "shutdown", "reboot", "pause", "resume", "power-button", "nmi")
    },
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        print(f"pyvmm-remote: {message} (see pyvmm-remote --help)", file=sys.stderr)
        sys.exit(2)


def _create_body(args: argparse.Namespace) -> bytes:
    source = args.path
    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text()
    except OSError as exc:
        raise _Usage(f"create {source}: {exc.strerror}") from None
    return text.encode()


def _add_device_body(args: argparse.Namespace) -> bytes:
    from pyvmm.api.vmconfig import device_json
    from pyvmm.config import parse_device
    from pyvmm.options import OptionError

    try:
        device = parse_device(args.config)
    except OptionError as exc:
        raise _Usage(f"add-device {args.config}: {exc}") from None
    return json.dumps(device_json(device)).encode()


def _add_disk_body(args: argparse.Namespace) -> bytes:
    from pyvmm.api.vmconfig import disk_json
    from pyvmm.config import parse_disk
    from pyvmm.options import OptionError

    try:
        disk = parse_disk(args.config)
    except OptionError as exc:
        raise _Usage(f"add-disk {args.config}: {exc}") from None
    return json.dumps(disk_json(disk)).encode()


def _add_net(args: argparse.Namespace) -> tuple[bytes, list[int]]:
    """add-net with --net's syntax: the NetConfig JSON, and the fds of `fd=[...]` (this process's own,
    left open by whoever started pyvmm-remote) sent with the request, as ch-remote sends them."""
    from pyvmm.api.vmconfig import net_json
    from pyvmm.config import parse_net
    from pyvmm.options import OptionError

    try:
        net = parse_net(args.config)
    except OptionError as exc:
        raise _Usage(f"add-net {args.config}: {exc}") from None
    for fd in net.fds:
        try:
            os.fstat(fd)
        except OSError as exc:
            raise _Usage(f"add-net {args.config}: fd {fd} is not open in pyvmm-remote ({exc.strerror})") \
                from None
    return json.dumps(net_json(net)).encode(), list(net.fds)


def _remove_device_body(args: argparse.Namespace) -> bytes:
    return json.dumps({"id": args.id}).encode()


class _Usage(Exception):
    pass


_WITH_BODY: dict[str, tuple[str, Callable[[argparse.Namespace], bytes]]] = {
    "create": ("vm.create", _create_body),
    "add-device": ("vm.add-device", _add_device_body),
    "add-disk": ("vm.add-disk", _add_disk_body),
    "remove-device": ("vm.remove-device", _remove_device_body),
}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="pyvmm-remote", description="Drive a VMM through its API socket (ch-remote's syntax)."
    )
    parser.add_argument("--api-socket", required=True, metavar="PATH", help="the VMM's API socket")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in _SIMPLE:
        sub.add_parser(name)
    sub.add_parser("create", help="vm.create with a VmConfig JSON file (- for stdin)").add_argument("path")
    sub.add_parser("add-device", help="vm.add-device path=<sysfs dir>[,...] (--device syntax)").add_argument(
        "config"
    )
    sub.add_parser("add-disk", help="vm.add-disk path=<image>[,...] (--disk syntax)").add_argument("config")
    sub.add_parser("add-net", help="vm.add-net tap=<name>|fd=[<n>,...][,...] (--net syntax; fd= sends "
                                   "those fds of this process)").add_argument("config")
    sub.add_parser("remove-device", help="vm.remove-device <id>").add_argument("id")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        fds: list[int] = []
        if args.command in _SIMPLE:
            method, endpoint = _SIMPLE[args.command]
            body = None
        else:
            if args.command == "add-net":
                endpoint, method = "vm.add-net", "PUT"
                body, fds = _add_net(args)
            else:
                endpoint, make_body = _WITH_BODY[args.command]
                method, body = "PUT", make_body(args)
    except _Usage as exc:
        print(f"pyvmm-remote: {exc}", file=sys.stderr)
        return 2
    try:
        with ApiClient(args.api_socket) as client:
            response = client.request(method, endpoint, body, fds)
    except (OSError, ApiClientError) as exc:
        print(f"pyvmm-remote: {args.api_socket}: {exc}", file=sys.stderr)
        return 1
    text = response.body.decode("utf-8", "replace")
    if not response.ok:
        print(f"pyvmm-remote: {endpoint}: the VMM answered {response.status}: {text}", file=sys.stderr)
        return 1
    if text:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
