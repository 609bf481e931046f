"""`pyvmm-host`: prepare this host for passthrough. A thin shell over the `pyvmm.host` API."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from . import binding, hostfacts, restoring
from .actions import StepHook
from .errors import HostError, HostUsageError
from .inventory import DeviceInfo, describe_devices, group_json, iommu_groups
from .journal import BindMethod
from .outcome import Outcome
from .ownership import resolve_owner
from .pciids import load_pci_ids
from .preflight import Severity
from .sysfs import resolve

PROG = "pyvmm-host"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, exit 2, as for every usage error.
        self.exit(2, f"{self.prog}: {message} (see {PROG} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Prepare this host's PCI devices for VFIO passthrough.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    device_help = "01:00.0, 0000:01:00.0 or /sys/bus/pci/devices/0000:01:00.0/"
    dry_help = "print the commands and sysfs writes; change nothing"

    p = sub.add_parser("list", help="every PCI device with names, driver, IOMMU group and a verdict")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("groups", help="each IOMMU group with its members and their drivers")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("check", help="everything between each device and a guest, with its fix")
    p.add_argument("devices", nargs="*", metavar="DEVICE", help=f"{device_help} (default: all)")
    p.add_argument("--memory", metavar="SIZE", help="guest RAM (e.g. 512M, 2G): checks the memory-lock limit")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("bind", help="bind devices to vfio-pci (journalled, reversible)")
    p.add_argument("devices", nargs="+", metavar="DEVICE", help=device_help)
    p.add_argument("--group", action="store_true", help="take every endpoint of each device's IOMMU group")
    methods = [m.value for m in BindMethod]
    p.add_argument("--method", choices=methods, default=BindMethod.DRIVER_OVERRIDE.value,
                   help="driver_override + drivers_probe (default), or vfio-pci's new_id/bind/remove_id")
    p.add_argument("--allow-unsafe-interrupts", action="store_true",
                   help="set vfio_iommu_type1 allow_unsafe_interrupts (hosts without interrupt remapping)")
    p.add_argument("--dry-run", action="store_true", help=dry_help)
    p.add_argument("--force", action="store_true", help="take devices even when the host uses them")
    p.add_argument("--owner", metavar="USER",
                   help="hand each group's /dev/vfio/N to USER, who then runs pyvmm (given back by unbind)")
    p.add_argument("-v", "--verbose", action="store_true", help="print each change as it is made")

    p = sub.add_parser("unbind", help="give devices back to the driver they had before")
    p.add_argument("devices", nargs="+", metavar="DEVICE", help=device_help)
    p.add_argument("--dry-run", action="store_true", help=dry_help)
    p.add_argument("-v", "--verbose", action="store_true", help="print each change as it is made")

    p = sub.add_parser("restore", help="undo everything the journal under /run/pyvmm records")
    p.add_argument("devices", nargs="*", metavar="DEVICE", help="only these devices (default: all)")
    p.add_argument("--all", action="store_true", help="every journalled device, id and module parameter")
    p.add_argument("--dry-run", action="store_true", help=dry_help)
    p.add_argument("-v", "--verbose", action="store_true", help="print each change as it is made")
    return parser


def _print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=1)
    sys.stdout.write("\n")


def _table(rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        cells = [c.ljust(w) for c, w in zip(row, widths, strict=False)] + [row[-1]]
        print("  ".join(cells).rstrip())


def _name(info: DeviceInfo) -> str:
    f = info.function
    vendor = info.vendor_name or f"vendor {f.vendor_id:04x}"
    device = info.device_name or f"device {f.device_id:04x}"
    return f"{info.class_name or f'class {f.class_code >> 8:04x}'}: {vendor} {device}"


def cmd_list(args: argparse.Namespace) -> int:
    infos = describe_devices()
    if args.json:
        _print_json([i.to_json() for i in infos])
        return 0
    rows = [("DEVICE", "IDS", "REV", "DRIVER", "GROUP", "VERDICT", "NAME")]
    for i in infos:
        f = i.function
        group = "-" if f.iommu_group is None else str(f.iommu_group)
        driver = f.driver or "-"
        rows.append((str(f.bdf), f.ids, f"{f.revision:02x}", driver, group, i.verdict.value, _name(i)))
    _table(rows)
    return 0


def cmd_groups(args: argparse.Namespace) -> int:
    db = load_pci_ids()
    groups = iommu_groups()
    if args.json:
        _print_json([group_json(g, db) for g in groups])
        return 0
    if not groups:
        print("no IOMMU groups: the IOMMU is off (intel_iommu=on / amd_iommu=on) or absent")
    for g in groups:
        print(f"group {g.number}{'' if g.viable else ' (not viable for VFIO as it stands)'}")
        for m in g.members:
            klass = db.class_name(m.class_code) or f"class {m.class_code >> 8:04x}"
            print(f"  {m.bdf}  [{m.ids}]  {m.driver or 'no driver'}  {klass}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    memory = hostfacts.parse_size(args.memory) if args.memory else None
    bdfs = [resolve(d) for d in args.devices] if args.devices else None
    infos = describe_devices(bdfs, memory)
    if args.json:
        _print_json([i.to_json() for i in infos])
    else:
        # Host-wide findings are the same for every device: show them once, first.
        for finding in infos[0].host_findings if infos else ():
            print(f"host {finding.severity.name.lower()}: {finding.message}")
            print(f"  fix: {finding.fix}")
        for i in infos:
            print(f"{i.function.bdf}: {i.verdict.value}  ({_name(i)}, {i.function.driver or 'no driver'})")
            for finding in i.device_findings:
                print(f"  {finding.severity.name.lower()}: {finding.message}")
                print(f"    fix: {finding.fix}")
    blocked = any(f.severity is Severity.ERROR for i in infos for f in i.findings)
    return 1 if blocked else 0


def _step_printer(args: argparse.Namespace) -> StepHook | None:
    if args.dry_run or args.verbose:
        return lambda step: print(step.shell() if args.dry_run else f"+ {step.shell()}", flush=True)
    return None


def _report(outcome: Outcome, verb: str) -> int:
    for w in outcome.warnings:
        print(f"{PROG}: warning: {w}", file=sys.stderr)
    if outcome.dry_run:
        print(f"# dry run: {verb} changed nothing; the lines above are what it would do")
    for d in outcome.devices:
        suffix = f"; {d.vfio_group}" if d.vfio_group and d.driver_after == "vfio-pci" else ""
        print(f"{d.bdf}: {d.note}{suffix}")
    return 0


def cmd_bind(args: argparse.Namespace) -> int:
    outcome = binding.bind_to_vfio(
        args.devices,
        group=args.group,
        method=BindMethod(args.method),
        allow_unsafe_interrupts=args.allow_unsafe_interrupts,
        force=args.force,
        owner=resolve_owner(args.owner) if args.owner is not None else None,
        dry_run=args.dry_run,
        on_step=_step_printer(args),
    )
    return _report(outcome, "bind")


def cmd_unbind(args: argparse.Namespace) -> int:
    outcome = restoring.unbind(args.devices, dry_run=args.dry_run, on_step=_step_printer(args))
    return _report(outcome, "unbind")


def cmd_restore(args: argparse.Namespace) -> int:
    if args.all and args.devices:
        raise HostUsageError("restore: give DEVICEs or --all, not both")
    devices = args.devices or None
    outcome = restoring.restore(devices, dry_run=args.dry_run, on_step=_step_printer(args))
    if not outcome.devices and not outcome.steps:
        print("nothing to restore: the journal is empty")
        return 0
    return _report(outcome, "restore")


COMMANDS = {
    "list": cmd_list,
    "groups": cmd_groups,
    "check": cmd_check,
    "bind": cmd_bind,
    "unbind": cmd_unbind,
    "restore": cmd_restore,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except HostError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return int(e.exit_status)
    except OSError as e:  # anything the layers below did not foresee still gets one line
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130

