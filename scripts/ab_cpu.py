#!/usr/bin/env python3
"""Interleaved A/B of two kiln binaries on the benchmark cases (the machine is noisy: only
runs interleaved in one process are compared).

    python3 scripts/ab_cpu.py --cases ppocr_det_640 --threads 1,2 --rounds 5 OLD_KILN NEW_KILN

Each binary builds its own plan (its own tuner) for each case, then `kiln bench` alternates
between them, A B B A ..., `--seconds` each; prints the median of the round medians and the
change B / A.
"""
import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def bench(kiln: str, plan: Path, inputs: dict, threads: int, seconds: float) -> float:
    cmd = [kiln, "bench", str(plan), "--threads", str(threads), "--duration", str(seconds), "--json", "-q"]
    for name, path in inputs.items():
        cmd += ["--input", f"{name}={path}"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out)["latency_ms"]["median"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", help="kiln binary A (before)")
    ap.add_argument("b", help="kiln binary B (after)")
    ap.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=1.5)
    args = ap.parse_args()
    assets = ROOT / "assets"
    index = assets / "reference/index.json"
    if not index.exists():
        print("no reference cases: run `cargo xtask fetch-assets` first", file=sys.stderr)
        return 2
    cases = [c["name"] for c in json.loads(index.read_text())["cases"]]
    if args.cases:
        want = args.cases.split(",")
        cases = [c for c in cases if c in want]
    print(f"{'case':20s} thr  {'A ms':>9s} {'B ms':>9s}  B/A")
    with tempfile.TemporaryDirectory() as tmp:
        for name in cases:
            case = json.loads((assets / f"reference/{name}/case.json").read_text())
            inputs = {k: assets / v for k, v in case["inputs"].items()}
            plans = []
            for tag, kiln in (("a", args.a), ("b", args.b)):
                plan = Path(tmp) / f"{name}.{tag}.plan"
                cmd = [kiln, "build", str(assets / case["model"]), "-o", str(plan), "-q"]
                if case.get("shapes"):
                    cmd += ["--shapes", case["shapes"]]
                subprocess.run(cmd, check=True)
                plans.append(plan)
            for t in [int(x) for x in args.threads.split(",")]:
                ta, tb = [], []
                for r in range(args.rounds):
                    order = [(0, ta), (1, tb)] if r % 2 == 0 else [(1, tb), (0, ta)]
                    for i, acc in order:
                        acc.append(bench((args.a, args.b)[i], plans[i], inputs, t, args.seconds))
                a, b = statistics.median(ta), statistics.median(tb)
                print(f"{name:20s} {t:3d}  {a:9.3f} {b:9.3f}  {b / a:5.3f}   A {['%.2f' % v for v in ta]} B {['%.2f' % v for v in tb]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
