"""Pre-flight scan of an image file list: find broken files before training starts.

One corrupt JPEG must not kill a multi-day run, and a decoder error deep inside DALI
names no file. So every file is checked once, up front, from its header and (JPEG) its
last few KiB rather than all its bytes:

- unreadable / zero-byte / not an image / truncated -> skipped (one warning that counts
  them and names the first few) or, with `strict=True`, one `ValueError`;
- images DALI's decoders may treat differently per device (CMYK JPEG, alpha or palette
  PNG, 16-bit, formats other than JPEG/PNG) -> flagged `convert`: they are converted to
  RGB with PIL and re-encoded losslessly when read, so both backends and both devices
  see the same pixels;
- plain RGB or grayscale JPEG/PNG -> decoded natively (grayscale becomes RGB in the
  decoder, `output_type=RGB`).
"""

from __future__ import annotations

import io
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image

# Formats and modes both DALI decoders ('cpu' and nvJPEG 'mixed') read as RGB directly.
_NATIVE = {("JPEG", "RGB"), ("JPEG", "L"), ("PNG", "RGB"), ("PNG", "L")}
_SHOW = 5  # how many bad files a message names


@dataclass(frozen=True)
class ScanResult:
    """Outcome of `scan_files`: which files to keep and how to read them."""

    keep: np.ndarray  # [N] bool, file is a usable image
    convert: np.ndarray  # [N] bool, read through PIL -> RGB -> PNG (see module doc)
    bad: list[tuple[str, str]]  # (path, reason) of every skipped file


# Bytes read from the end of a JPEG to find its end-of-image marker: one page, so the scan
# reads a header and a tail per file rather than the whole data set (~140 GB for ImageNet).
_TAIL = 4096


def _jpeg_complete(has_scan: bool, tail: bytes) -> bool:
    """Whether a JPEG ends properly, from its last `_TAIL` bytes (`tail`, [<= _TAIL] bytes).

    Entropy-coded data byte-stuffs 0xFF, so the end-of-image marker FFD9 can only appear
    as a marker: a complete JPEG has a start-of-scan (`has_scan`, found by PIL's header
    parse) and an EOI after its last SOS. Bytes after the EOI (zero padding, a camera's
    trailer) are allowed, as by the former whole-file check, while the EOI is in the tail.
    """
    return has_scan and tail.rfind(b"\xff\xd9") > tail.rfind(b"\xff\xda")


def check_file(path: str) -> tuple[str, str]:
    """Classify one file: ("native" | "convert" | "bad", reason).

    Reads the header (PIL parses it; `verify` decodes no JPEG data, it checks the chunk
    CRCs of a PNG) and, for a JPEG, the last `_TAIL` bytes; never the whole JPEG.
    """
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                return "bad", "empty file"
            try:
                with Image.open(f) as im:
                    fmt, mode, has_scan = im.format, im.mode, bool(im.tile)  # JPEG: no tile without an SOS
                    transparent = "transparency" in im.info
                    im.verify()  # checks PNG chunk CRCs, headers of other formats
            except Exception as e:  # PIL raises many types for non-images
                return "bad", f"not a readable image ({type(e).__name__})"
            if fmt == "JPEG":
                f.seek(max(0, size - _TAIL))
                if not _jpeg_complete(has_scan, f.read()):
                    return "bad", "truncated JPEG"
    except OSError as e:
        return "bad", f"unreadable ({e.strerror})"
    if fmt == "PNG" and mode in ("RGB", "L") and transparent:
        return "convert", "PNG with transparency"
    if (fmt, mode) in _NATIVE:
        return "native", ""
    try:  # e.g. CMYK, RGBA, palette, 16-bit: make sure PIL can actually decode it (rare: decodes fully)
        with Image.open(path) as im:
            im.convert("RGB").load()
    except Exception as e:
        return "bad", f"undecodable {fmt} {mode} ({type(e).__name__})"
    return "convert", f"{fmt} {mode}"


def scan_files(paths: list[str], threads: int = 8) -> ScanResult:
    """Check every file in `paths` (threads overlap the reads); keeps order."""
    with ThreadPoolExecutor(max_workers=threads) as pool:
        results = list(pool.map(check_file, paths))
    kinds = np.array([k for k, _ in results])
    bad = [(p, reason) for p, (k, reason) in zip(paths, results) if k == "bad"]
    return ScanResult(keep=kinds != "bad", convert=kinds == "convert", bad=bad)


def report_bad(bad: list[tuple[str, str]], empty_classes: list[str], where: str, strict: bool) -> None:
    """Raise (strict) or warn once about skipped files and empty class folders."""
    if not bad and not empty_classes:
        return
    parts = []
    if bad:
        named = "; ".join(f"{p} ({r})" for p, r in bad[:_SHOW])
        more = f" and {len(bad) - _SHOW} more" if len(bad) > _SHOW else ""
        parts.append(f"{len(bad)} unusable file(s) in {where}: {named}{more}")
    if empty_classes:
        parts.append(f"{len(empty_classes)} class folder(s) without images: {', '.join(empty_classes[:_SHOW])}")
    msg = ". ".join(parts)
    if strict:
        raise ValueError(f"{msg}. Fix or remove them, or pass strict=False to skip them.")
    warnings.warn(f"Skipping {msg}.", stacklevel=3)


def to_rgb_png(path: str) -> np.ndarray:
    """Read any PIL-readable image as RGB and re-encode it as PNG bytes [nbytes] uint8.

    PNG is lossless and RGB PNG is decoded the same way by every backend.
    """
    with Image.open(path) as im:
        rgb = im.convert("RGB")
    buf = io.BytesIO()
    rgb.save(buf, format="PNG", compress_level=1)  # speed over size: it only lives in memory
    return np.frombuffer(buf.getvalue(), dtype=np.uint8)
