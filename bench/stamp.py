"""Prefix every line of stdin with the wall-clock time it arrived (the lab's clock, not the guest's)."""

import sys
import time

for raw in sys.stdin.buffer:
    line = raw.decode(errors="replace").replace("\r", "")
    sys.stdout.write(f"{time.time():.3f} {line}")
    sys.stdout.flush()
