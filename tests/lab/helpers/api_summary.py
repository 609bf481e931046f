"""What the API lab test reads, one line each: `counters` (vm.counters: disk.counter=value ...), `tree`
(vm.info's device_tree: id=bdf ...), `config` (vm.info's config: disks=id,... devices=id,...), `events`
(an --event-monitor file: source/event[:id] ...); JSON on stdin."""

from __future__ import annotations

import json
import sys


def main(kind: str, text: str) -> str:
    if kind == "counters":
        return " ".join(f"{d}.{k}={v}" for d, c in json.loads(text).items() for k, v in c.items())
    if kind == "tree":
        tree = json.loads(text)["device_tree"]
        return " ".join(f"{name}={node['pci_bdf']}" for name, node in sorted(tree.items()))
    if kind == "config":
        config = json.loads(text)["config"]
        return " ".join(f"{key}=" + ",".join(str(d.get("id")) for d in config.get(key) or [])
                        for key in ("disks", "devices"))
    if kind == "events":
        events = [json.loads(chunk) for chunk in text.split("\n\n") if chunk.strip()]
        return " ".join(
            f"{e['source']}/{e['event']}" + ("" if e["properties"] is None else f":{e['properties']['id']}")
            for e in events
        )
    raise SystemExit(f"unknown kind {kind}")


if __name__ == "__main__":
    print(main(sys.argv[1], sys.stdin.read()))
