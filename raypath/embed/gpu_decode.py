"""``raypath embed --decode gpu``: read tasks ship compressed tiles, the model actor decodes them.

CPU decoding bounds the GPU pipeline (ViT-B/16 on an H100 ran at 0.78 of model-only
speed, decode bound).  With ``decode="gpu"`` a read task does only I/O and planning:
for each requested tile it sends a *packet* -- the complete JPEG streams of the stored
tiles the tile needs (tables and colour transform merged in, see
:func:`raypath.wsi.jpeg.jpeg_stream`) and where each goes in the read square.  The
actor decodes every distinct stored tile of its batch in one
``torchvision.io.decode_jpeg(list, device="cuda")`` call (nvJPEG), assembles the read
squares and resizes them to ``tile_px`` on the device (bilinear, antialiased), and the
uint8 tiles never leave the GPU before the model.  On a CPU actor the same code decodes
with libjpeg-turbo (the smoke test that keeps this path working without a GPU).

Slides whose pages the fast reader cannot plan (not tiled, not JPEG) are decoded by the
read task as usual and shipped as raw pixels in the same packet column.

Pixels differ slightly from the CPU reader (decoder IDCT and the device resize instead of
PIL's): the decode mode is part of the feature identity
(:func:`raypath.embed.identity.decode_id`).  Damaged tiles: a stream nvJPEG cannot decode
fails its slide; libjpeg's *warnings* (recoverable corrupt data), which the CPU paths
report per tile, are not seen here -- use ``--decode full|scaled`` to audit a cohort.
"""

from __future__ import annotations

import pickle
from typing import Iterator

import numpy as np
import pandas as pd

from raypath.io.storage import S3Options


def _packet_parts(L, keys, origin, side: int, blobs: dict, stream_of) -> tuple[list, dict]:
    """Placement of each stored tile in the read square, and its complete JPEG stream."""
    parts, streams = [], {}
    rx0, ry0 = int(origin[0]), int(origin[1])
    for k in keys:
        row, c = divmod(k[1], L.across)
        tx0, ty0 = c * L.tile_w, row * L.tile_h
        ax0, ax1 = max(tx0, rx0, 0), min(tx0 + L.tile_w, rx0 + side, L.width)
        ay0, ay1 = max(ty0, ry0, 0), min(ty0 + L.tile_h, ry0 + side, L.height)
        if ax1 <= ax0 or ay1 <= ay0:
            continue
        key = (int(k[0]), int(k[1]))
        streams[key] = stream_of(key, blobs[key])
        parts.append((key, ax0 - tx0, ay0 - ty0, ax0 - rx0, ay0 - ry0, ax1 - ax0, ay1 - ay0))
    return parts, streams


def slide_packets(uri: str, tiles: pd.DataFrame, batch_tiles: int = 64,
                  s3: S3Options | None = None) -> Iterator[tuple[np.ndarray, list[bytes]]]:
    """Yield ``(tile_ids, packets)`` batches of one slide in slide order (see the module docstring)."""
    from raypath.wsi.jpeg import jpeg_stream
    from raypath.wsi.reader import SlideReader, _fetch_keys, _plan_pass

    with SlideReader(uri, s3=s3) as r:
        p = _plan_pass(r, tiles, max(1, int(batch_tiles)))
        levels = {int(lv): r.level(int(lv)) for lv in np.unique(p.lv)}
        if any(L is None or not L.jpeg for L in levels.values()):  # CPU decode, raw pixels in the packet
            for tid, imgs in r.read(tiles, batch_tiles=batch_tiles):
                yield tid, [pickle.dumps({"raw": np.ascontiguousarray(im)}) for im in imgs]
            return

        def stream_of(key, data):
            L = levels[key[0]]
            return jpeg_stream(data, L.tables, L.colorspace[0]) if data else b""

        held: dict[tuple[int, int], bytes] = {}  # compressed bytes while later tiles still need them
        for (a, b), new in zip(p.bounds, p.new_keys):
            held.update(r._fetch(_fetch_keys(new)))
            packets = []
            for i in range(a, b):
                L = levels[int(p.lv[i])]
                parts, streams = _packet_parts(L, p.needs[i], p.origin[i], int(p.side[i]), held, stream_of)
                packets.append(pickle.dumps({"side": int(p.side[i]), "tile_px": int(p.tp[i]), "parts": parts,
                                             "streams": streams, "tile_hw": (L.tile_h, L.tile_w)}))
                for k in p.needs[i]:
                    if p.last_use.get(k) == i:
                        held.pop(k[:2], None)
            yield p.tid[a:b].copy(), packets


def decode_packets(packets, ok: np.ndarray, device: str):
    """uint8 ``[n, tile_px, tile_px, 3]`` torch tensor on ``device`` from packets (rows not ``ok``: zeros).

    Every distinct stored tile of the batch is decoded once, in one ``decode_jpeg`` call.
    """
    import torch
    import torch.nn.functional as F
    from torchvision.io import ImageReadMode, decode_jpeg

    metas = [pickle.loads(bytes(pk)) if good else None for pk, good in zip(packets, ok)]
    tile_px = next((m.get("tile_px") or m["raw"].shape[0] for m in metas if m is not None), 224)
    order: dict[tuple[int, int], int] = {}
    datas = []
    for m in metas:
        for key, stream in (m or {}).get("streams", {}).items():
            if key not in order and stream:
                order[key] = len(datas)
                datas.append(torch.frombuffer(bytearray(stream), dtype=torch.uint8))
    decoded = decode_jpeg(datas, mode=ImageReadMode.RGB, device=device) if datas else []
    out = torch.zeros((len(metas), 3, tile_px, tile_px), dtype=torch.uint8, device=device)
    for i, m in enumerate(metas):
        if m is None:
            continue
        if "raw" in m:
            out[i] = torch.from_numpy(m["raw"]).permute(2, 0, 1).to(device)
            continue
        side = m["side"]
        sq = torch.zeros((3, side, side), dtype=torch.uint8, device=device)
        for key, sx, sy, dx, dy, w, h in m["parts"]:
            if key in order:  # an empty (sparse) stored tile stays 0, as tifffile fills it
                sq[:, dy : dy + h, dx : dx + w] = decoded[order[key]][:, sy : sy + h, sx : sx + w]
        if side != tile_px:
            sq = F.interpolate(sq[None].float(), size=(tile_px, tile_px), mode="bilinear", align_corners=False,
                               antialias=True)[0].round().clamp(0, 255).to(torch.uint8)
        out[i] = sq
    return out.permute(0, 2, 3, 1)
