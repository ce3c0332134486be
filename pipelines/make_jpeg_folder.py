"""Generate an ImageNet-like folder of natural-looking JPEGs for tests and benchmarks.

    python -m carp_fast.pipelines.make_jpeg_folder OUT --classes 2 --per-class 300

Images are about 400 x 350 px and 100 KB: a smooth colour gradient, a few random
ellipses and rectangles, and fractal value noise summed over several octaves (coarse
blobs to fine texture) -- content a JPEG encoder and a decoder work on like a photo,
unlike white noise (incompressible) or flat colour (trivially small).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def _value_noise(rng: np.random.Generator, h: int, w: int, cell: int) -> np.ndarray:
    """Smooth noise [h, w] in [0, 1]: random values on a grid of `cell` px, bilinear-upsampled."""
    gh, gw = h // cell + 2, w // cell + 2
    grid = rng.random((gh, gw), dtype=np.float32)
    y = np.arange(h, dtype=np.float32) / cell
    x = np.arange(w, dtype=np.float32) / cell
    y0, x0 = y.astype(int), x.astype(int)
    fy, fx = (y - y0)[:, None], (x - x0)[None, :]
    fy, fx = fy * fy * (3 - 2 * fy), fx * fx * (3 - 2 * fx)  # smoothstep: no grid creases
    a, b = grid[y0][:, x0], grid[y0][:, x0 + 1]
    c, d = grid[y0 + 1][:, x0], grid[y0 + 1][:, x0 + 1]
    return (a * (1 - fx) + b * fx) * (1 - fy) + (c * (1 - fx) + d * fx) * fy


def natural_image(rng: np.random.Generator, h: int = 350, w: int = 400) -> np.ndarray:
    """One synthetic 'photo', uint8 [h, w, 3]."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    c0, c1 = rng.random(3) * 255, rng.random(3) * 255
    angle = rng.random() * 2 * np.pi
    t = (np.cos(angle) * xx / w + np.sin(angle) * yy / h + 1) / 2
    image = c0 * (1 - t[..., None]) + c1 * t[..., None]  # gradient [h, w, 3]
    canvas = Image.fromarray(image.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(rng.integers(3, 9)):  # a few objects
        x0, y0 = rng.integers(0, w), rng.integers(0, h)
        x1, y1 = x0 + rng.integers(w // 20 + 1, w // 2 + 2), y0 + rng.integers(h // 20 + 1, h // 2 + 2)
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=colour)
    image = np.asarray(canvas, dtype=np.float32)
    noise = np.zeros((h, w, 3), np.float32)
    for cell, amp in ((64, 40.0), (16, 30.0), (8, 30.0), (4, 36.0), (2, 40.0), (1, 36.0)):  # octaves, coarse to fine
        noise += amp * (np.stack([_value_noise(rng, h, w, cell) for _ in range(3)], -1) - 0.5)
    return (image + noise).clip(0, 255).astype(np.uint8)


def make_jpeg_folder(out: str | Path, classes: int = 2, per_class: int = 300, seed: int = 0,
                     size: tuple[int, int] = (350, 400), quality: int = 95) -> Path:
    """Write `out/class_XXX/img_XXXXX.JPEG` ImageNet-style; returns `out`."""
    if classes < 1 or per_class < 1:
        raise ValueError(f"classes and per_class must be >= 1, got {classes}, {per_class}")
    out = Path(out)
    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = out / f"class_{c:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(natural_image(rng, *size)).save(folder / f"img_{i:05d}.JPEG", quality=quality)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="output folder (created)")
    parser.add_argument("--classes", type=int, default=2)
    parser.add_argument("--per-class", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality (95 gives about 100 KB at 400 x 350)")
    args = parser.parse_args(argv)
    out = make_jpeg_folder(args.out, args.classes, args.per_class, args.seed, quality=args.quality)
    files = sorted(out.rglob("*.JPEG"))
    kb = sum(f.stat().st_size for f in files) / len(files) / 1024
    print(f"wrote {len(files)} JPEGs to {out} (mean {kb:.0f} KB)")


if __name__ == "__main__":
    main()
