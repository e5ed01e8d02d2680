"""Mutants of a real slide for the fault tests: truncations, bit flips in tile data and
header, zeroed blocks, tags that lie (image width, tile offsets, compression), a cut
inside the image description.  Deterministic for a seed."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

KINDS = (
    "truncate", "cut_description", "bitflip_tiles", "bitflip_header", "zero_block", "garbage_tile",
    "tag_width", "tag_tile_offsets", "tag_compression", "tag_byte_counts", "bitflip_any",
)


@dataclass
class Layout:
    """Where the bytes of interest are in a TIFF (level 0 = first page)."""

    byteorder: str
    ifd_offset: int
    tags: dict[int, tuple[int, int, int, int]]  # code -> (entry offset, dtype, count, value offset)
    tile_offsets: np.ndarray
    tile_bytes: np.ndarray
    description: tuple[int, int] | None


def layout(data: bytes) -> Layout:
    bo = "<" if data[:2] == b"II" else ">"
    (ifd,) = struct.unpack(bo + "I", data[4:8])
    (n,) = struct.unpack(bo + "H", data[ifd : ifd + 2])
    sizes = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 7: 1, 16: 8}
    tags = {}
    for i in range(n):
        e = ifd + 2 + 12 * i
        code, dtype, count = struct.unpack(bo + "HHI", data[e : e + 8])
        nbytes = sizes.get(dtype, 1) * count
        (voff,) = struct.unpack(bo + "I", data[e + 8 : e + 12]) if nbytes > 4 else (e + 8,)
        tags[code] = (e, dtype, count, voff)

    def values(code):
        e, dtype, count, voff = tags[code]
        fmt = {3: "H", 4: "I", 16: "Q"}[dtype]
        return np.array(struct.unpack(bo + fmt * count, data[voff : voff + struct.calcsize(fmt) * count]), np.int64)

    desc = (tags[270][3], tags[270][2]) if 270 in tags else None
    return Layout(bo, ifd, tags, values(324), values(325), desc)


def _set_tag_value(b: bytearray, lay: Layout, code: int, value: int) -> None:
    e, dtype, count, voff = lay.tags[code]
    fmt = {3: "H", 4: "I"}[dtype]
    struct.pack_into(lay.byteorder + fmt, b, voff, value)


def mutate(data: bytes, kind: str, rng: np.random.Generator) -> bytes:
    """One mutant of ``data`` of the given ``kind``."""
    lay = layout(data)
    b = bytearray(data)
    tiles = [(int(o), int(n)) for o, n in zip(lay.tile_offsets, lay.tile_bytes) if n > 64]
    if kind == "truncate":
        return bytes(b[: int(rng.integers(16, len(b) - 1))])
    if kind == "cut_description" and lay.description:
        off, n = lay.description
        return bytes(b[: off + int(rng.integers(1, max(n - 1, 2)))])
    if kind == "bitflip_tiles":
        for _ in range(int(rng.integers(1, 6))):
            o, n = tiles[int(rng.integers(len(tiles)))]
            i = o + int(rng.integers(n // 8, n - 2))
            b[i] ^= 1 << int(rng.integers(8))
    elif kind == "bitflip_header":
        start = lay.ifd_offset
        for _ in range(int(rng.integers(1, 4))):
            i = start + int(rng.integers(0, 2 + 12 * len(lay.tags)))
            b[i] ^= 1 << int(rng.integers(8))
    elif kind == "zero_block":
        o, n = tiles[int(rng.integers(len(tiles)))]
        s = o + int(rng.integers(0, n // 2))
        length = int(rng.integers(16, max(17, n // 2)))
        b[s : s + length] = bytes(length)
    elif kind == "garbage_tile":
        o, n = tiles[int(rng.integers(len(tiles)))]
        b[o + 2 : o + n - 2] = rng.integers(0, 256, n - 4, dtype=np.uint8).tobytes()
    elif kind == "tag_width":
        _set_tag_value(b, lay, 256, int(rng.choice([65535, 30000, 4 * 2220])))
    elif kind == "tag_tile_offsets":
        e, dtype, count, voff = lay.tags[324]
        i = int(rng.integers(count))
        struct.pack_into(lay.byteorder + "I", b, voff + 4 * i, len(b) + int(rng.integers(1, 10**6)))
    elif kind == "tag_compression":
        _set_tag_value(b, lay, 259, int(rng.choice([34712, 33003, 50000, 6, 1])))
    elif kind == "tag_byte_counts":  # a stored tile's length halved: the decoder sees a cut stream
        e, dtype, count, voff = lay.tags[325]
        i = int(rng.integers(count))
        struct.pack_into(lay.byteorder + "I", b, voff + 4 * i, int(lay.tile_bytes[i]) // 2)
    else:  # bitflip_any
        for _ in range(int(rng.integers(1, 20))):
            i = int(rng.integers(0, len(b)))
            b[i] ^= 1 << int(rng.integers(8))
    return bytes(b)


def write_mutants(src: Path, out_dir: Path, n: int, seed: int = 0) -> list[tuple[Path, str]]:
    """``n`` mutants of ``src`` in ``out_dir`` (kinds in turn), as (path, kind)."""
    data = Path(src).read_bytes()
    rng = np.random.default_rng(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        p = out_dir / f"m{i:03d}_{kind}.svs"
        p.write_bytes(mutate(data, kind, rng))
        out.append((p, kind))
    return out
