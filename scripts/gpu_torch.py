"""kiln's GPU check, PyTorch side (runs on the GPU machine).

  gpu_torch.py export DIR        export ResNet-50 (torchvision) and BERT-base (transformers)
                                 to ONNX with a dynamic batch, and save inputs and PyTorch's
                                 FP32 CPU outputs as .npy
  gpu_torch.py compare DIR RUNS  compare kiln's outputs (RUNS/out_<model>_<precision>/*.npy)
                                 with PyTorch's; prints one JSON object per line
"""
import json
import os
import sys

import numpy as np


def export(d):
    import torch
    import torchvision
    from transformers import BertConfig, BertModel

    os.makedirs(d, exist_ok=True)
    torch.manual_seed(0)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False

    m = torchvision.models.resnet50().eval()
    x = torch.randn(2, 3, 224, 224)
    torch.onnx.export(m, (x,), f"{d}/resnet50.onnx", input_names=["x"], output_names=["logits"],
                      dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
                      opset_version=17, dynamo=False)
    with torch.inference_mode():
        np.save(f"{d}/resnet50_x.npy", x.numpy())
        np.save(f"{d}/resnet50_logits.npy", m(x).numpy())

    class Wrap(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids):
            o = self.m(input_ids=input_ids)
            return o.last_hidden_state, o.pooler_output

    b = Wrap(BertModel(BertConfig()).eval()).eval()
    ids = torch.randint(0, 30000, (2, 128))
    torch.onnx.export(b, (ids,), f"{d}/bert.onnx", input_names=["input_ids"],
                      output_names=["last_hidden_state", "pooler_output"],
                      dynamic_axes={"input_ids": {0: "batch"}, "last_hidden_state": {0: "batch"},
                                    "pooler_output": {0: "batch"}},
                      opset_version=17, dynamo=False)
    with torch.inference_mode():
        h, p = b(ids)
    np.save(f"{d}/bert_input_ids.npy", ids.numpy())
    np.save(f"{d}/bert_last_hidden_state.npy", h.numpy())
    np.save(f"{d}/bert_pooler_output.npy", p.numpy())
    print("exported", sorted(os.listdir(d)), flush=True)


def rel_l2(a, b):
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def compare(d, runs):
    outs = {"resnet50": ["logits"], "bert": ["last_hidden_state", "pooler_output"]}
    for model, names in outs.items():
        for prec in ["fp32", "fp16"]:
            od = f"{runs}/out_{model}_{prec}"
            row = {"model": model, "precision": prec}
            worst = 0.0
            try:
                for n in names:
                    got = np.load(f"{od}/{n}.npy")
                    want = np.load(f"{d}/{model}_{n}.npy")
                    if got.shape != want.shape:
                        worst = float("inf")
                        continue
                    e = rel_l2(got, want)
                    worst = max(worst, e) if not np.isnan(e) else float("nan")
                    if model == "resnet50":
                        row["argmax_same"] = bool((got.argmax(-1) == want.argmax(-1)).all())
                row["rel_l2"] = worst
            except Exception as e:  # missing output: kiln failed
                row["error"] = str(e)
            tol = 1e-3 if prec == "fp32" else 1e-2
            row["pass"] = ("error" not in row and row["rel_l2"] <= tol
                           and row.get("argmax_same", True))
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "export":
        export(sys.argv[2])
    elif len(sys.argv) >= 4 and sys.argv[1] == "compare":
        compare(sys.argv[2], sys.argv[3])
    else:
        sys.exit(__doc__)
