"""Summarises a GPU check run (scripts/gpu_check.sh run): reads the logs in OUT and prints
the markdown tables recorded in docs/cuda.md."""
import json
import re
import sys

out = sys.argv[1]


def read(name):
    try:
        with open(f"{out}/{name}") as f:
            return f.read()
    except OSError:
        return ""


print("## Real models vs ONNX Runtime (gpu_models)\n")
rows = [l for l in read("models.log").splitlines() if l.startswith("| ")]
print("\n".join(rows) if rows else "(no table: see models.log)")
m = re.search(r"test result: (\w+)", read("models.log"))
print(f"\ngpu_models: {m.group(1) if m else 'did not finish'}")

print("\n## NVRTC kernels vs CPU reference (gpu_kernels)\n")
k = read("kernels.log")
fam = [l for l in k.splitlines() if re.match(r"^\s*\w+\s*:?\s+\d+ pass", l) or "family" in l]
print("\n".join(fam[-15:]) if fam else "\n".join(k.splitlines()[-12:]))
m = re.search(r"test result: (\w+)\. (\d+) passed; (\d+) failed", k)
print(f"gpu_kernels: {m.group(0) if m else 'did not finish'}")

print("\n## ONNX node suite, float cases, on the GPU (kiln-conformance --device cuda)\n")
conf = read("conformance.log").splitlines()
keep = [l for l in conf if not l.startswith("[") and not l.startswith("FAIL ")]
print("\n".join(keep[-10:]) if keep else "(not run)")
fails = [l for l in conf if l.startswith("FAIL ")]
if fails:
    print(f"\nfailing cases ({len(fails)}):")
    print("\n".join(fails[:60]))

print("\n## INT8 on the GPU, caches calibrated on the CPU (int8.md)\n")
print(read("int8.md") or "(not run)")

print("\n## ResNet-50 / BERT-base exported with torch, kiln vs PyTorch FP32 (CPU)\n")
print("| model | precision | rel L2 | argmax | result |")
print("| --- | --- | --- | --- | --- |")
for l in read("torch.log").splitlines():
    if l.startswith("{"):
        r = json.loads(l)
        print(f"| {r['model']} | {r['precision']} | {r.get('rel_l2', r.get('error', '?'))} | "
              f"{r.get('argmax_same', '-')} | {'pass' if r['pass'] else 'FAIL'} |")

print("\n## Throughput: kiln FP16 vs PyTorch (same run)\n")
peers = {}
for l in read("peers.log").splitlines():
    if l.startswith("[["):
        for name, mode, b, ms, per_s, build in json.loads(l):
            peers[(name, int(b), mode)] = (ms, per_s)
print("| workload | batch | kiln median latency ms (events) | kiln GPU compute ms | kiln samples/s | "
      "PyTorch eager ms | PyTorch eager samples/s | torch.compile samples/s |")
print("| --- | --- | --- | --- | --- | --- | --- | --- |")
profiles = []
for l in read("bench.jsonl").splitlines():
    if not l.startswith("{"):
        continue
    r = json.loads(l)
    name = r.get("workload", "?")
    b = r.get("batch", 1)
    lat = r.get("gpu_latency_ms", {}).get("median", float("nan"))
    comp = r.get("gpu_compute_ms", {}).get("median", float("nan"))
    sps = b * 1e3 / lat if lat == lat and lat > 0 else float("nan")
    e = peers.get((name, b, "eager"), (float("nan"), float("nan")))
    c = peers.get((name, b, "compile"), (float("nan"), float("nan")))
    print(f"| {name} | {b} | {lat:.3f} | {comp:.3f} | {sps:.0f} | {e[0]:.3f} | {e[1]:.0f} | {c[1]:.0f} |")
    if r.get("profile"):
        profiles.append((name, b, r["profile"][:8], r.get("gpu", {})))
for name, b, prof, gpu in profiles:
    print(f"\n### Slowest layers: {name} batch {b} (fallback layers: {gpu.get('fallback_layers')})\n")
    print("| layer | op | tactic | ms | share |")
    print("| --- | --- | --- | --- | --- |")
    for p in prof:
        print(f"| {p['layer']} | {p['op']} | {p['tactic']} | {p['ms']:.3f} | {100 * p['share']:.1f}% |")
