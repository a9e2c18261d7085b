#!/usr/bin/env python3
"""Side-by-side CPU benchmark: kiln vs ONNX Runtime (and tract) on the real models.

For every reference case fetched by `cargo xtask fetch-assets` (assets/reference/), at 1 and
2 threads, the same inputs: builds a kiln plan specialised to the case's shapes, then runs
interleaved rounds of `kiln bench --json` and ONNX Runtime (its Python package from
assets/pyref, same thread count, all graph optimisations on) and reports the median
latencies, the ratio kiln / ORT per case and the geometric mean. tract (its Python package,
also in assets/pyref) runs in the same rounds where it loads the model, in the 1-thread rows
only (it computes on one thread); the models it cannot load are listed under the table.

    python3 scripts/bench_cpu.py [--rounds 3] [--seconds 2] [--threads 1,2] [--cases a,b]
                                 [--kiln target/release/kiln] [--markdown FILE] [--no-tract]
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def assets_dir() -> Path:
    return Path(os.environ.get("KILN_ASSETS", ROOT / "assets"))


def load_ort():
    """Imports onnxruntime and numpy from the reference environment."""
    sys.path.insert(0, str(assets_dir() / "pyref"))
    import numpy as np  # noqa: E402
    import onnxruntime as ort  # noqa: E402

    return np, ort


def kiln_bench(kiln: str, plan: Path, inputs: dict, threads: int, seconds: float) -> float:
    cmd = [kiln, "bench", str(plan), "--threads", str(threads), "--duration", str(seconds), "--json", "-q"]
    for name, path in inputs.items():
        cmd += ["--input", f"{name}={path}"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out)["latency_ms"]["median"]


def ort_bench(ort, np, model: Path, feeds: dict, threads: int, seconds: float) -> float:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    for _ in range(5):
        sess.run(None, feeds)
    times = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 10:
        t0 = time.perf_counter()
        sess.run(None, feeds)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def tract_load(model: Path, feeds: dict):
    """A tract runnable for `model` with input facts from `feeds`, or the reason it fails
    (tract does not load every model)."""
    try:
        import tract  # noqa: E402
    except ImportError as e:
        return None, f"tract not installed ({e})"
    dtypes = {"float32": "f32", "int64": "i64", "int32": "i32", "float64": "f64", "bool": "bool"}
    try:
        m = tract.onnx().load(str(model))
        order = []
        for i in range(m.input_count()):
            name = m.input_name(i)
            x = feeds[name]
            dims = ",".join(str(d) for d in x.shape)
            m.set_input_fact(i, m.fact(f"{dims},{dtypes[str(x.dtype)]}" if dims else dtypes[str(x.dtype)]))
            order.append(x)
        runnable = m.into_model().into_runnable()
        runnable.run(order)
        return (runnable, order), None
    except Exception as e:  # tract raises its own error type
        return None, str(e).splitlines()[0][:120]


def tract_bench(loaded, seconds: float) -> float:
    runnable, order = loaded
    for _ in range(3):
        runnable.run(order)
    times = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 10:
        t0 = time.perf_counter()
        runnable.run(order)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds per case and thread count")
    ap.add_argument("--seconds", type=float, default=2.0, help="timed seconds per run")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    ap.add_argument("--kiln", default=str(ROOT / "target/release/kiln"))
    ap.add_argument("--markdown", help="also write the table to this file")
    ap.add_argument("--no-tract", action="store_true", help="skip tract (its 1-thread column)")
    args = ap.parse_args()

    assets = assets_dir()
    index = assets / "reference/index.json"
    if not index.exists():
        print("no reference cases: run `cargo xtask fetch-assets` first", file=sys.stderr)
        return 2
    if not Path(args.kiln).exists():
        print(f"{args.kiln} not found: run `cargo build --release` first", file=sys.stderr)
        return 2
    np, ort = load_ort()
    cases = [c["name"] for c in json.loads(index.read_text())["cases"]]
    if args.cases:
        cases = [c for c in cases if c in args.cases.split(",")]
    threads = [int(t) for t in args.threads.split(",")]
    rows = []
    tract_notes = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in cases:
            case = json.loads((assets / f"reference/{name}/case.json").read_text())
            model = assets / case["model"]
            inputs = {k: assets / v for k, v in case["inputs"].items()}
            feeds = {k: np.load(v) for k, v in inputs.items()}
            plan = Path(tmp) / f"{name}.plan"
            build = [args.kiln, "build", str(model), "-o", str(plan), "-q"]
            if case.get("shapes"):
                build += ["--shapes", case["shapes"]]
            subprocess.run(build, check=True)
            loaded, why = (None, "--no-tract") if args.no_tract else tract_load(model, feeds)
            if why:
                tract_notes.append(f"{name}: {why}")
            for t in threads:
                k_times, o_times, t_times = [], [], []
                for _ in range(args.rounds):
                    k_times.append(kiln_bench(args.kiln, plan, inputs, t, args.seconds))
                    o_times.append(ort_bench(ort, np, model, feeds, t, args.seconds))
                    # tract runs on one thread: timed in the 1-thread rows only.
                    if loaded and t == 1:
                        t_times.append(tract_bench(loaded, args.seconds))
                k, o = statistics.median(k_times), statistics.median(o_times)
                tr = statistics.median(t_times) if t_times else None
                rows.append((name, t, k, o, k / o, tr))
                tract_txt = f"   tract {tr:9.3f} ms" if tr else ""
                print(f"{name:20s} threads={t}  kiln {k:9.3f} ms   ORT {o:9.3f} ms   ratio {k / o:6.2f}{tract_txt}", flush=True)
    lines = [
        f"| case | threads | kiln median (ms) | ORT {ort.__version__} median (ms) | kiln / ORT | tract median (ms) | kiln / tract |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, t, k, o, r, tr in rows:
        tcols = f"{tr:.3f} | {k / tr:.2f}" if tr else "— | —"
        lines.append(f"| {name} | {t} | {k:.3f} | {o:.3f} | {r:.2f} | {tcols} |")
    for t in threads:
        ratios = [row[4] for row in rows if row[1] == t]
        if ratios:
            g = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
            lines.append(f"| **geometric mean** | {t} | | | **{g:.2f}** | | |")
    for note in tract_notes:
        lines.append("")
        lines.append(f"tract did not run {note}")
    table = "\n".join(lines)
    print()
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
