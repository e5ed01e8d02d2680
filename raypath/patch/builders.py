"""Builders of patch tables from what users have.

* :func:`from_point_annotations`: cell centres on slides, as MIDOG-style JSON
  (COCO-like: ``images`` with ``file_name``, ``annotations`` with ``bbox``
  ``[x1, y1, x2, y2]`` and ``category_id``, ``categories`` with names) or a
  CSV/TSV/parquet of ``slide_id, x, y, label`` (+ ``domain``), plus an
  optional slide table (``slide_id, uri, patient_id, cohort``) that says where
  each slide is, whose patient it is and which domain (``cohort``) it is in.
* :func:`from_image_folder`: ``root/<label>/*.png`` or
  ``root/<domain>/<label>/*.png`` (``domain_level=True``), with an optional
  CSV ``image, slide_id, patient_id`` saying which slide/patient an image
  comes from (without it, each image is its own slide and patient).
* :func:`from_tiles`: ``tiles.parquet`` with a label column (joined with
  ``slides.parquet`` for uri, patient and cohort): one patch per tile.

Each returns a validated patch table (:mod:`raypath.patch.table`).  Bad
input raises a :class:`~raypath.errors.RaypathError` naming the file and
the row (or JSON entry) and the remedy.
"""

from __future__ import annotations

import json
import os
import posixpath
import re

import numpy as np
import pandas as pd

from raypath.errors import RaypathError
from raypath.io.storage import S3Options, join, open_file
from raypath.patch.table import IMAGE_SUFFIXES, rows_text, validate_patch_table
from raypath.wsi.cohort import _parent, read_cohort, read_table, resolve_uri

_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def label_name(name: str) -> str:
    """A category name as a label: lower case, spaces -> ``_`` (``"mitotic figure"`` -> ``mitotic_figure``)."""
    return _SAFE.sub("_", str(name).strip().lower()).strip("_") or "unnamed"


def _slide_id_of(file_name: str) -> str:
    stem = posixpath.basename(str(file_name).replace("\\", "/"))
    stem = stem.rsplit(".", 1)[0] if "." in stem else stem
    sid = _SAFE.sub("_", stem).lstrip("-.")
    return sid or "slide"


# --------------------------------------------------------------------------- point annotations


def _load_json(uri: str, s3: S3Options | None) -> dict:
    try:
        with open_file(uri, "rb", s3) as f:
            raw = f.read()
    except FileNotFoundError:
        raise RaypathError(f"annotation file {uri!r} not found: pass a MIDOG-style .json or a .csv of cell centres") from None
    try:
        doc = json.loads(raw.decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        where = f" (line {e.lineno}, column {e.colno})" if isinstance(e, json.JSONDecodeError) else ""
        raise RaypathError(f"annotation file {uri!r} is not valid JSON{where}: {e}; fix the file or export it again") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list) or not isinstance(doc.get("annotations"), list):
        raise RaypathError(
            f"annotation file {uri!r}: expected a MIDOG/COCO-style object with `images` and `annotations` lists"
        )
    return doc


def _json_images(doc: dict, uri: str) -> dict:
    images = {}
    for k, im in enumerate(doc["images"], start=1):
        if not isinstance(im, dict) or "id" not in im or not im.get("file_name"):
            raise RaypathError(f"annotation file {uri!r}: images entry {k} has no `id` or `file_name`; every image needs both")
        images[im["id"]] = im
    return images


def _json_rows(doc: dict, uri: str, bbox_format: str) -> pd.DataFrame:
    """One row per annotation: slide file, centre, label, domain/patient if the image says."""
    images = _json_images(doc, uri)
    cats = {c.get("id"): label_name(c.get("name", c.get("id"))) for c in doc.get("categories", []) if isinstance(c, dict)}
    rows = []
    for k, a in enumerate(doc["annotations"], start=1):
        ident = f"annotations entry {k}" + (f" (id {a.get('id')})" if isinstance(a, dict) and "id" in a else "")
        if not isinstance(a, dict):
            raise RaypathError(f"annotation file {uri!r}: {ident} is not an object")
        box, img = a.get("bbox"), images.get(a.get("image_id"))
        if img is None:
            raise RaypathError(f"annotation file {uri!r}: {ident} names image_id {a.get('image_id')!r}, which is not in `images`")
        if not (isinstance(box, (list, tuple)) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
            raise RaypathError(f"annotation file {uri!r}: {ident} has no valid `bbox` (4 numbers); got {box!r}")
        cat = a.get("category_id")
        if cats and cat not in cats:
            raise RaypathError(f"annotation file {uri!r}: {ident} has category_id {cat!r}, not in `categories` {sorted(cats)}")
        x1, y1, b3, b4 = (float(v) for v in box)
        x2, y2 = (x1 + b3, y1 + b4) if bbox_format == "xywh" else (b3, b4)
        if x2 < x1 or y2 < y1:
            raise RaypathError(f"annotation file {uri!r}: {ident} bbox {box} has x2 < x1 or y2 < y1; "
                               f"is it [x, y, w, h]? then pass bbox_format='xywh'")
        rows.append({"file_name": img["file_name"], "x": (x1 + x2) / 2, "y": (y1 + y2) / 2,
                     "label": cats.get(cat, label_name(cat)), "ann": ident,
                     "image_domain": img.get("tumor_type", img.get("domain")), "image_patient": img.get("patient_id")})
    if not rows:
        raise RaypathError(f"annotation file {uri!r} holds no annotations")
    return pd.DataFrame(rows)


def _csv_rows(uri: str, s3: S3Options | None) -> pd.DataFrame:
    df = read_table(uri, kind="annotation", required=("slide_id", "x", "y", "label"),
                    id_columns=("label", "domain"), s3=s3)
    for c in ("x", "y"):
        v = pd.to_numeric(df[c], errors="coerce")
        bad = (v.isna() | (v < 0)).to_numpy(dtype=bool)
        if bad.any():
            raise RaypathError(f"annotation file {uri!r}: `{c}` is not a number >= 0 in {rows_text(df, bad, 'slide_id')}: "
                               "give cell centres in level-0 pixels")
        df[c] = v.astype(float)
    bad = df["label"].isna().to_numpy(dtype=bool)
    if bad.any():
        raise RaypathError(f"annotation file {uri!r}: empty `label` in {rows_text(df, bad, 'slide_id')}: label every cell")
    df["ann"] = [f"row {i + 1}" for i in range(len(df))]
    return df


def _join_slides(ann: pd.DataFrame, slides: pd.DataFrame | None, uri: str, base: str) -> pd.DataFrame:
    """Attach uri, patient_id and domain to each annotation."""
    if slides is None:
        if "file_name" not in ann.columns:
            raise RaypathError(f"annotation file {uri!r} names slides by slide_id only: also pass the slide table "
                               "(slide_id, uri, patient_id, cohort)")
        ann["uri"] = [resolve_uri(f, base) for f in ann["file_name"]]
        ann["patient_id"] = [str(p) if p is not None and not pd.isna(p) else s
                             for p, s in zip(ann["image_patient"], ann["slide_id"])]
        ann["domain"] = [str(d) if d is not None and not pd.isna(d) else "all" for d in ann["image_domain"]]
        return ann
    known = slides.set_index("slide_id")
    missing = ~ann["slide_id"].isin(known.index).to_numpy(dtype=bool)
    if missing.any():
        first = ann.loc[missing].iloc[0]
        raise RaypathError(
            f"annotation file {uri!r}: {int(missing.sum())} annotation(s) name slides not in the slide table, "
            f"first {first['ann']} (slide {first['slide_id']!r}): add the slides to the table or fix the names"
        )
    ann["uri"] = known.loc[ann["slide_id"], "uri"].to_numpy()
    ann["patient_id"] = known.loc[ann["slide_id"], "patient_id"].to_numpy()
    dom = ann["domain"] if "domain" in ann.columns else pd.Series([None] * len(ann))
    ann["domain"] = [d if isinstance(d, str) and d else c for d, c in zip(dom, known.loc[ann["slide_id"], "cohort"])]
    return ann


def from_point_annotations(
    annotations: str,
    slides: str | None = None,
    mpp: float | None = None,
    bbox_format: str = "xyxy",
    s3: S3Options | None = None,
) -> pd.DataFrame:
    """A patch table from cell annotations on slides (one patch centred on each cell).

    Parameters
    ----------
    annotations
        MIDOG-style ``.json`` or a table (``slide_id, x, y, label`` [+ ``domain``]).
    slides
        Slide table (cohort-table layout: ``slide_id, uri, patient_id, cohort``).
        Optional for JSON, whose ``images[].file_name`` then locate the slides
        (relative to the JSON's folder) and ``tumor_type`` gives the domain.
    mpp
        Target um/px written in the ``mpp`` column (``None``: the run decides).
    bbox_format
        ``"xyxy"`` (MIDOG) or ``"xywh"`` (COCO).
    """
    if bbox_format not in ("xyxy", "xywh"):
        raise RaypathError(f"bbox_format {bbox_format!r}: use 'xyxy' (MIDOG) or 'xywh' (COCO)")
    slide_table = read_cohort(slides, s3=s3) if slides else None
    if str(annotations).lower().endswith(".json"):
        ann = _json_rows(_load_json(annotations, s3), annotations, bbox_format)
        ann["slide_id"] = [_slide_id_of(f) for f in ann["file_name"]]
    else:
        ann = _csv_rows(annotations, s3)
    ann = _join_slides(ann, slide_table, annotations, _parent(annotations))
    ann = ann.sort_values(["slide_id", "y", "x"], kind="stable").reset_index(drop=True)
    counter = ann.groupby("slide_id").cumcount()
    table = pd.DataFrame({
        "patch_id": [f"{s}_{i:05d}" for s, i in zip(ann["slide_id"], counter)],
        "uri": ann["uri"], "label": ann["label"].astype(str), "domain": ann["domain"].astype(str),
        "slide_id": ann["slide_id"], "patient_id": ann["patient_id"].astype(str),
        "x": ann["x"].round(1), "y": ann["y"].round(1),
    })
    if mpp is not None:
        table["mpp"] = float(mpp)
    return validate_patch_table(table, source=str(annotations))


# --------------------------------------------------------------------------- image folders


def _list_images(root: str) -> list[str]:
    out = []
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            if f.lower().endswith(IMAGE_SUFFIXES):
                out.append(os.path.relpath(os.path.join(dirpath, f), root))
    return sorted(out)


def from_image_folder(root: str, domain_level: bool = False, groups: str | None = None,
                      domain: str = "all") -> pd.DataFrame:
    """A patch table from ``root/<label>/*`` (or ``root/<domain>/<label>/*`` with ``domain_level``).

    ``groups`` is an optional table ``image, slide_id, patient_id`` (``image``
    relative to ``root``); without it every image is its own slide and patient,
    and splits cannot keep patches of one patient together: say so in results.
    """
    if not os.path.isdir(root):
        raise RaypathError(f"image folder {root!r} not found: pass a folder with one sub-folder per class")
    rows = []
    depth = 3 if domain_level else 2
    for rel in _list_images(root):
        parts = rel.replace("\\", "/").split("/")
        if len(parts) != depth:
            raise RaypathError(f"image folder {root!r}: {rel!r} is not at <{'domain/' if domain_level else ''}label>/<image>; "
                               "move it or set domain_level accordingly")
        pid = _SAFE.sub("_", rel.rsplit(".", 1)[0])
        rows.append({"patch_id": pid, "uri": os.path.join(os.path.abspath(root), rel), "label": parts[-2],
                     "domain": parts[0] if domain_level else domain, "slide_id": pid, "patient_id": pid, "image": rel})
    if not rows:
        raise RaypathError(f"image folder {root!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    table = pd.DataFrame(rows)
    if groups:
        g = read_table(groups, kind="annotation", required=("image", "slide_id", "patient_id"), id_columns=("image",))
        known = g.set_index("image")
        missing = ~table["image"].isin(known.index).to_numpy(dtype=bool)
        if missing.any():
            raise RaypathError(f"groups table {groups!r} lacks {int(missing.sum())} image(s), e.g. "
                               f"{table.loc[missing, 'image'].iloc[0]!r}: add one row per image")
        table["slide_id"] = known.loc[table["image"], "slide_id"].to_numpy()
        table["patient_id"] = known.loc[table["image"], "patient_id"].to_numpy()
    return validate_patch_table(table.drop(columns="image"), source=root)


# --------------------------------------------------------------------------- tiles


def from_tiles(workdir: str, label_column: str = "label", tiles: str | None = None,
               s3: S3Options | None = None) -> pd.DataFrame:
    """A patch table from tile rows carrying a label column (one patch per tile, centred on it):
    ``tiles`` (a parquet file of tiles.parquet rows + the label), or the workdir's ``tiles.parquet``."""
    from raypath.io.storage import read_parquet
    from raypath.wsi.tile_table import read_tile_table

    tiles_uri = tiles or join(workdir, "tiles.parquet")
    try:
        t = read_parquet(tiles, s3).to_pandas() if tiles else read_tile_table(workdir, s3)
        s = read_parquet(join(workdir, "slides.parquet"), s3).to_pandas()
    except FileNotFoundError:
        raise RaypathError(f"{tiles_uri!r} or {join(workdir, 'slides.parquet')!r} not found: run `raypath ingest` "
                           "and `raypath tile` first (or pass the labelled tile rows as a parquet file)") from None
    if label_column not in t.columns:
        raise RaypathError(f"{tiles_uri!r} has no column {label_column!r}: add the label of each tile "
                           f"(columns found: {', '.join(t.columns)})")
    t = t[t[label_column].notna()].merge(s[["slide_id", "uri", "patient_id", "cohort", "level_downsamples"]],
                                         on="slide_id", how="inner")
    ds = np.array([float(d[int(lv)]) for d, lv in zip(t["level_downsamples"], t["level"])])
    half = t["read_px"].to_numpy(float) * ds / 2
    table = pd.DataFrame({
        "patch_id": [f"{a}_t{int(b)}" for a, b in zip(t["slide_id"], t["tile_id"])],
        "uri": t["uri"], "label": t[label_column].astype(str), "domain": t["cohort"].astype(str),
        "slide_id": t["slide_id"].astype(str), "patient_id": t["patient_id"].astype(str),
        "x": t["x"].to_numpy(float) + half, "y": t["y"].to_numpy(float) + half, "mpp": t["target_mpp"].astype(float),
    })
    return validate_patch_table(table, source=tiles_uri)
