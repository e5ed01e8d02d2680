"""QC images of tiling: thumbnail, tissue outline and tile grid, one PNG per slide.

Drawn with PIL (no matplotlib figure state, safe in Ray workers).  A person
looking at ``<workdir>/qc/<slide_id>.png`` should see at once whether tiles
sit on tissue and not on glass, pen or background.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageFont

#: Long side of the saved QC image (the thumbnail is scaled to it).
QC_MAX_PX = 1400
OUTLINE_RGB = (0, 200, 0)
TILE_RGBA = (255, 170, 0, 255)
TITLE_BG = (30, 30, 30)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no sized default font
        return ImageFont.load_default()


def mask_outline(mask: np.ndarray) -> np.ndarray:
    """Boundary pixels of a boolean mask (inside pixels with an outside 4-neighbour)."""
    m = np.pad(mask.astype(bool), 1)
    inner = m[1:-1, 1:-1]
    neighbours_in = m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    return inner & ~neighbours_in


def render_qc(
    thumbnail: np.ndarray,
    mask: np.ndarray,
    downsample_x: float,
    downsample_y: float,
    x: np.ndarray,
    y: np.ndarray,
    tile_l0_px: float,
    title: str = "",
) -> bytes:
    """PNG bytes: the thumbnail, the tissue outline (green), the kept tiles
    (yellow rectangles), under a title bar.

    Parameters
    ----------
    thumbnail
        ``(H, W, 3)`` uint8 RGB.
    mask
        ``(H, W)`` bool tissue mask at thumbnail resolution.
    downsample_x, downsample_y
        Level-0 px per thumbnail px.
    x, y
        Kept tiles' top-left corners in level-0 px.
    tile_l0_px
        Tile side in level-0 px.
    title
        Text of the title bar (slide id, tile count, level, mpp).
    """
    h, w = mask.shape
    scale = min(1.0, QC_MAX_PX / max(h, w)) if max(h, w) > QC_MAX_PX else max(1.0, 600 / max(h, w))
    out_w, out_h = max(int(round(w * scale)), 1), max(int(round(h * scale)), 1)
    base = Image.fromarray(np.ascontiguousarray(thumbnail[..., :3]).astype(np.uint8)).resize(
        (out_w, out_h), Image.Resampling.BILINEAR
    )
    # outline at display resolution so it stays one pixel wide and visible
    mask_img = Image.fromarray(mask.astype(np.uint8) * 255).resize((out_w, out_h), Image.Resampling.NEAREST)
    outline = mask_outline(np.asarray(mask_img) > 0)
    outline = outline | np.roll(outline, 1, axis=0) | np.roll(outline, 1, axis=1)
    arr = np.asarray(base).copy()
    arr[outline] = OUTLINE_RGB
    img = Image.fromarray(arr).convert("RGBA")

    overlay = Image.new("RGBA", img.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    sx = scale / downsample_x
    sy = scale / downsample_y
    for tx, ty in zip(np.asarray(x), np.asarray(y)):
        x0, y0 = tx * sx, ty * sy
        draw.rectangle([x0, y0, x0 + tile_l0_px * sx, y0 + tile_l0_px * sy], outline=TILE_RGBA, width=1)
    img = Image.alpha_composite(img, overlay).convert("RGB")

    font_px = max(12, min(22, out_w // 45))
    bar_h = font_px * 2
    canvas = Image.new("RGB", (out_w, out_h + bar_h), TITLE_BG)
    canvas.paste(img, (0, bar_h))
    ImageDraw.Draw(canvas).text((6, font_px // 2), title, fill=(255, 255, 255), font=_font(font_px))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG", optimize=True)
    return buf.getvalue()
