#!/usr/bin/env python3
"""kiln A/B on a loaded machine: CPU time per inference at 1 thread.

For each kiln binary and reference case: `kiln build` the case's model at its shapes, then
run `kiln bench PLAN --threads 1 -n N` for two iteration counts and report the difference
of the process's user+sys CPU time divided by the difference of N (three pairs, sorted).
Time spent waiting for a core does not count, so the figure stays within about ±1 % under
load from other processes, where wall-clock latency swings by tens of percent. It says
nothing about multi-thread scaling, and shared caches still couple to other load.

    python3 scripts/bench_cpu_time.py OLD_KILN,NEW_KILN orientation_b1,ppocr_cls_b6
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def cpu_seconds(cmd):
    """User + system CPU seconds of one run of `cmd` (output discarded)."""
    pid = os.fork()
    if pid == 0:
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.execv(cmd[0], cmd)
    _, status, usage = os.wait4(pid, 0)
    if status != 0:
        sys.exit(f"failed: {' '.join(cmd)}")
    return usage.ru_utime + usage.ru_stime


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    bins, cases = sys.argv[1].split(","), sys.argv[2].split(",")
    assets = Path(os.environ.get("KILN_ASSETS", ROOT / "assets"))
    tmp = tempfile.mkdtemp()
    for case_name in cases:
        case = json.loads((assets / "reference" / case_name / "case.json").read_text())
        lo, hi = (3, 13) if "det" in case_name else (20, 220)
        for b in bins:
            plan = f"{tmp}/{Path(b).name}_{case_name}.plan"
            subprocess.run(
                [b, "build", str(assets / case["model"]), "--shapes", case["shapes"], "-o", plan, "-q"],
                check=True,
            )
            per = []
            for _ in range(3):
                a = cpu_seconds([b, "bench", plan, "--threads", "1", "-n", str(lo), "-w", "2", "-q"])
                z = cpu_seconds([b, "bench", plan, "--threads", "1", "-n", str(hi), "-w", "2", "-q"])
                per.append((z - a) / (hi - lo) * 1e3)
            per.sort()
            print(f"{case_name:18s} {b:40s} CPU ms/inference: " + " ".join(f"{x:.3f}" for x in per), flush=True)


if __name__ == "__main__":
    main()
