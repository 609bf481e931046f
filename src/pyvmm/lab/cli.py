"""`pyvmm-lab`: build the lab, run commands in it, open a shell in it, list its devices."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from pyvmm.lab.assets import BuildError, LabBuilder
from pyvmm.lab.debian import PackageError
from pyvmm.lab.devices import CATALOGUE, DEFAULT_DEVICES, DeviceSpecError, parse_device_spec
from pyvmm.lab.runner import DEFAULT_LAB_CPUS, Lab, LabError, LabOptions, default_lab_cpus

USAGE_ERROR = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2, no usage dump
        print(f"pyvmm-lab: {message}", file=sys.stderr)
        raise SystemExit(USAGE_ERROR)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="pyvmm-lab", description="A virtual VFIO host: QEMU (TCG) with an emulated Intel IOMMU, "
                "a Debian kernel with vfio-pci and nested KVM, and emulated PCI devices on their drivers.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    sub.add_parser("build", help="download and build the lab's kernel, initramfs, guest images (cached)")

    def lab_options(sp: argparse.ArgumentParser) -> None:
        default = ",".join(DEFAULT_DEVICES)
        sp.add_argument("--devices", metavar="SPEC",
                        help=f"comma-separated lab devices (default: {default}; see `devices`)")
        sp.add_argument("--memory", type=int, default=2048, metavar="MIB", help="lab RAM in MiB (2048)")
        sp.add_argument("--cpus", type=int, default=default_lab_cpus(), metavar="N",
                        help=f"lab CPUs ({DEFAULT_LAB_CPUS}, or 1 on a single-core machine; enough for a "
                        "4-vCPU guest)")
        sp.add_argument("--timeout", type=float, default=900, metavar="S",
                        help="give up after S seconds (900)")
        sp.add_argument("--npt", choices=("on", "off"), default="on",
                        help="nested paging in the lab's KVM (kvm_amd npt; on)")
        sp.add_argument("-v", "--verbose", action="store_true", help="show the lab's boot messages")

    run = sub.add_parser("run", help="boot the lab and run a command in it as root")
    lab_options(run)
    run.add_argument("--stall-timeout", type=float, metavar="S",
                     help="give up when the command prints nothing for S seconds (off)")
    run.add_argument("--pulse-timeout", type=float, default=LabOptions.pulse_timeout, metavar="S",
                     help=f"the lab has stalled when it answers no pulse for S seconds "
                     f"({LabOptions.pulse_timeout:.0f})")
    run.add_argument("--restarts", type=int, default=LabOptions.restarts, metavar="N",
                     help=f"run the command again in up to N new labs when its lab stalls, is reset or "
                     f"panics "
                     f"({LabOptions.restarts})")
    run.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD [ARG...]")
    shell = sub.add_parser("shell", help="boot the lab with an interactive shell")
    lab_options(shell)
    sub.add_parser("devices", help="list the devices a lab can carry")
    return p


def _options(args: argparse.Namespace) -> LabOptions:
    if args.memory < 512:
        raise DeviceSpecError("--memory: the lab needs at least 512 MiB")
    if not 1 <= args.cpus <= 8:
        raise DeviceSpecError("--cpus: choose 1 to 8 lab CPUs")
    stall = getattr(args, "stall_timeout", None)
    if stall is not None and stall <= 0:
        raise DeviceSpecError("--stall-timeout: give a number of seconds above 0")
    pulse = getattr(args, "pulse_timeout", LabOptions.pulse_timeout)
    if pulse <= 0:
        raise DeviceSpecError("--pulse-timeout: give a number of seconds above 0")
    restarts = getattr(args, "restarts", LabOptions.restarts)
    if restarts < 0:
        raise DeviceSpecError("--restarts: give 0 or more")
    return LabOptions(devices=parse_device_spec(args.devices), memory_mib=args.memory, cpus=args.cpus,
                      timeout=args.timeout, stall_timeout=stall, pulse_timeout=pulse, restarts=restarts,
                      npt=args.npt == "on", verbose=args.verbose)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "build":
            manifest = LabBuilder().build()
            print(f"pyvmm-lab: ready ({manifest.kernel_package})")
            return 0
        if args.command == "devices":
            for dev in CATALOGUE.values():
                default = " (default)" if dev.name in DEFAULT_DEVICES else ""
                print(f"{dev.name:10} {dev.stands_for}; host driver: {dev.native_driver}{default}")
            return 0
        options = _options(args)
        if args.command == "shell":
            return Lab().shell(options)
        cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
        if not cmd:
            print("pyvmm-lab: run needs a command: pyvmm-lab run -- CMD [ARG...]", file=sys.stderr)
            return USAGE_ERROR
        return Lab().run(cmd, options)
    except DeviceSpecError as exc:
        print(f"pyvmm-lab: {exc}", file=sys.stderr)
        return USAGE_ERROR
    except (LabError, BuildError, PackageError) as exc:
        print(f"pyvmm-lab: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
