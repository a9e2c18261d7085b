#!/usr/bin/env python3
"""Explicitly quantized (QDQ) models on the CPU: kiln vs ONNX Runtime, and optionally an older
kiln binary, in interleaved rounds on the same model and input.

For every case of ``assets/qdq`` (``scripts/assets.py qdq``: ORT ``quantize_static`` QDQ
models of real models) and its FP32 source model (for scale), at each thread count: builds a
kiln plan per binary at the shape of the case's first evaluation batch
(``assets/calib/<case>/eval/000``), then runs ``kiln bench --json`` with each binary and an
ONNX Runtime session (``scripts/bench_cpu.py``'s settings) on that batch, in turns, and
reports the median of the round medians. Q/DQ speed numbers of docs/int8.md come from it.

    python3 scripts/bench_qdq.py [--before OLD_KILN] [--kiln target/release/kiln]
                                 [--rounds 3] [--seconds 2] [--threads 1,2] [--cases a,b]
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_cpu  # noqa: E402  (kiln_bench, ort_bench, load_ort, assets_dir)


def cases(assets: Path, wanted: list[str]):
    """(label, model, input .npy, shapes) for each QDQ case and its FP32 source."""
    for d in sorted(p for p in (assets / "qdq").iterdir() if p.is_dir()):
        if wanted and d.name not in wanted:
            continue
        info = json.loads((d / "info.json").read_text())
        x = assets / "calib" / d.name / "eval" / "000" / "x.npy"
        import numpy as np  # from assets/pyref (load_ort put it on the path)

        shapes = "x:" + "x".join(str(v) for v in np.load(x).shape)
        yield f"{d.name} QDQ", d / "model_qdq.onnx", x, shapes
        yield f"{d.name} FP32", assets / info["source"], x, shapes


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kiln", default=str(bench_cpu.ROOT / "target/release/kiln"))
    ap.add_argument("--before", help="an older kiln binary, timed on the QDQ models next to --kiln")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--cases", default="", help="comma-separated assets/qdq case names (default: all)")
    args = ap.parse_args()
    np, ort = bench_cpu.load_ort()
    assets = bench_cpu.assets_dir()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, model, x, shapes in cases(assets, [c for c in args.cases.split(",") if c]):
            bins = {"after": args.kiln}
            if args.before and label.endswith("QDQ"):
                bins = {"before": args.before, **bins}
            plans = {}
            for k, b in bins.items():
                plans[k] = Path(tmp) / f"{label.replace(' ', '_')}.{k}.plan"
                subprocess.run([b, "build", str(model), "-o", str(plans[k]), "-q", "--shapes", shapes],
                               check=True, capture_output=True)
            feeds = {"x": np.load(x)}
            for t in [int(v) for v in args.threads.split(",")]:
                times = {k: [] for k in [*bins, "ort"]}
                for _ in range(args.rounds):
                    for k, b in bins.items():
                        times[k].append(bench_cpu.kiln_bench(b, plans[k], {"x": x}, t, args.seconds))
                    times["ort"].append(bench_cpu.ort_bench(ort, np, model, feeds, t, args.seconds))
                rows.append((label, t, times))
                print(label, t, {k: [round(v, 2) for v in vs] for k, vs in times.items()}, flush=True)

    def cell(vs):
        return f"{statistics.median(vs):.2f} ({', '.join(f'{v:.2f}' for v in vs)})" if vs else "—"

    print()
    print(f"| model | threads | kiln before (ms) | kiln (ms) | ORT {ort.__version__} (ms) | kiln / ORT |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for label, t, times in rows:
        ratio = statistics.median(times["after"]) / statistics.median(times["ort"])
        print(f"| {label} | {t} | {cell(times.get('before', []))} | {cell(times['after'])} | "
              f"{cell(times['ort'])} | {ratio:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
