"""Read an 8-bit, non-interlaced RGB or RGBA PNG into pixel rows with zlib and struct alone."""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path

SIGNATURE = b"\x89PNG\r\n\x1a\n"
_CHANNELS = {2: 3, 6: 4}  # colour type: bytes per pixel at bit depth 8


def _add(a: int, b: int) -> int:
    return (a + b) & 0xFF


def _paeth(filtered: bytes, prior: bytes, bpp: int) -> bytearray:
    row = bytearray(filtered)
    for i in range(len(row)):
        a = row[i - bpp] if i >= bpp else 0
        b = prior[i]
        c = prior[i - bpp] if i >= bpp else 0
        p = a + b - c
        pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
        near = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
        row[i] = (row[i] + near) & 0xFF
    return row


def _average(filtered: bytes, prior: bytes, bpp: int) -> bytearray:
    row = bytearray(filtered)
    for i in range(len(row)):
        left = row[i - bpp] if i >= bpp else 0
        row[i] = (row[i] + ((left + prior[i]) >> 1)) & 0xFF
    return row


def _unfilter(kind: int, filtered: bytes, prior: bytes, bpp: int) -> bytes:
    if kind == 0:
        return filtered
    if kind == 1:  # Sub: a running sum per channel
        row = bytearray(len(filtered))
        for channel in range(bpp):
            sums: list[int] = list(accumulate(filtered[channel::bpp], _add))
            row[channel::bpp] = bytes(sums)
        return bytes(row)
    if kind == 2:  # Up
        return bytes((a + b) & 0xFF for a, b in zip(filtered, prior, strict=True))
    if kind == 3:
        return bytes(_average(filtered, prior, bpp))
    if kind == 4:
        return bytes(_paeth(filtered, prior, bpp))
    raise ValueError(f"unknown PNG filter type {kind}")


def read_png(path: Path) -> tuple[int, int, int, list[bytes]]:
    """Width, height, bytes per pixel and the unfiltered rows of the image."""
    data = path.read_bytes()
    if not data.startswith(SIGNATURE):
        raise ValueError(f"{path} is not a PNG")
    at, header, compressed = len(SIGNATURE), b"", bytearray()
    while at < len(data):
        (size,) = struct.unpack(">I", data[at : at + 4])
        kind, body = data[at + 4 : at + 8], data[at + 8 : at + 8 + size]
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            compressed += body
        elif kind == b"IEND":
            break
        at += 12 + size
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", header)
    if depth != 8 or colour not in _CHANNELS or interlace:
        raise ValueError(f"unsupported PNG: depth {depth}, colour type {colour}")
    bpp = _CHANNELS[colour]
    raw = zlib.decompress(bytes(compressed))
    stride = width * bpp
    rows, prior = [], bytes(stride)
    for y in range(height):
        start = y * (stride + 1)
        prior = _unfilter(raw[start], raw[start + 1 : start + 1 + stride], prior, bpp)
        rows.append(prior)
    return width, height, bpp, rows


@dataclass(frozen=True)
class Census:
    """An image's size, the distinct colours it has and how many pixels are not pure white."""

    width: int
    height: int
    colours: set[bytes]
    not_white: int


def colour_census(path: Path) -> Census:
    """Count the colours (RGB, alpha ignored) and the pixels that are not pure white."""
    width, height, bpp, rows = read_png(path)
    colours: set[bytes] = set()
    white = b"\xff" * 3
    not_white = 0
    for row in rows:
        for x in range(0, width * bpp, bpp):
            pixel = row[x : x + 3]
            colours.add(pixel)
            if pixel != white:
                not_white += 1
    return Census(width, height, colours, not_white)
