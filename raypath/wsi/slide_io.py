"""Opening whole-slide images (local or S3) and reading what ingest records.

Slides are read with tiffslide (TIFF-based formats: Aperio SVS, generic
pyramidal TIFF, Leica SCN, Hamamatsu NDPI, Ventana BIF, Philips TIFF).
Remote slides are opened through an fsspec file whose block size and cache
type come from :class:`~raypath.io.storage.S3Options`: s3fs's default 50 MiB
read-ahead would fetch 50 MiB per random tile read.

A slide that cannot be used raises :class:`SlideError` whose ``kind`` and
message say what is wrong (not found, empty, truncated, not a slide,
unsupported compression or layout) and what to do about it.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import struct
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

from raypath.errors import RaypathError
from raypath.io.storage import S3Options, filesystem_for, is_remote, strip_protocol

#: Bytes hashed for the fingerprint: the TIFF header and, for most slides, the first IFDs.
HEAD_BYTES = 64 * 1024
#: mpp values outside this range (um/px) are treated as absent: TIFF resolution
#: tags often hold screen defaults (72 dpi = 352.8 um/px), not the scanner's.
PLAUSIBLE_MPP_RANGE = (0.05, 20.0)

#: Failure kinds recorded in ``slides.parquet``'s ``error`` column (as the message prefix).
NOT_FOUND = "not_found"
EMPTY_FILE = "empty_file"
TRUNCATED = "truncated"
NOT_A_SLIDE = "not_a_slide"
UNSUPPORTED_COMPRESSION = "unsupported_compression"
UNSUPPORTED_LAYOUT = "unsupported_layout"
UNREADABLE = "unreadable"
NO_MPP = "no_mpp"


class SlideError(RaypathError):
    """A slide that cannot be used, with the reason (``kind``) and a remedy."""

    def __init__(self, kind: str, uri: str, detail: str):
        self.kind = kind
        self.uri = uri
        self.detail = detail
        super().__init__(f"{kind}: {detail}")


@dataclass
class SlideMetadata:
    """What ingest records about a slide (level-0 mpp may be ``None``)."""

    width: int
    height: int
    levels: int
    level_downsamples: list[float]
    level_dimensions: list[list[int]]
    mpp_x: float | None
    mpp_y: float | None
    objective_power: float | None
    vendor: str
    bytes: int
    fingerprint: str
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("extra")
        return d


# --------------------------------------------------------------------------- files


def _fs_path(uri: str, s3: S3Options | None):
    fs = filesystem_for(uri, s3)
    return fs, (uri if is_remote(uri) else os.path.abspath(strip_protocol(uri)))


def file_info(uri: str, s3: S3Options | None = None) -> dict[str, Any]:
    """Size, mtime/etag of a file; raises :class:`SlideError` ``not_found``."""
    fs, path = _fs_path(uri, s3)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        raise SlideError(
            NOT_FOUND, uri, f"no file at {uri!r}; check the `uri` column (relative uris are "
            "resolved against the cohort table's folder)"
        ) from None
    except PermissionError as e:
        raise SlideError(UNREADABLE, uri, f"permission denied reading {uri!r}: {e}") from None
    if info.get("type") == "directory":
        raise SlideError(
            NOT_A_SLIDE, uri, f"{uri!r} is a directory; multi-file formats (MRXS, DICOM) "
            "are not supported: convert to pyramidal TIFF/SVS"
        )
    etag = info.get("ETag") or info.get("etag")
    mtime = info.get("mtime") or info.get("LastModified") or info.get("created")
    return {
        "size": int(info.get("size") or 0),
        "etag": str(etag).strip('"') if etag else None,
        "mtime": float(mtime) if isinstance(mtime, (int, float)) else (str(mtime) if mtime else None),
    }


def read_head(uri: str, s3: S3Options | None = None, n_bytes: int = HEAD_BYTES) -> bytes:
    """The first ``n_bytes`` of a file (one ranged read on S3)."""
    fs, path = _fs_path(uri, s3)
    if is_remote(uri):
        return fs.cat_file(path, start=0, end=n_bytes)
    with open(path, "rb") as f:
        return f.read(n_bytes)


def fingerprint(info: dict[str, Any], head: bytes) -> str:
    """A change detector for caches: the ETag (S3) or size+mtime (local),
    plus the SHA-256 of the first 64 KiB (header and first IFDs)."""
    parts = [f"size={info['size']}"]
    if info.get("etag"):
        parts.append(f"etag={info['etag']}")
    elif info.get("mtime") is not None:
        parts.append(f"mtime={info['mtime']}")
    parts.append("head_sha256=" + hashlib.sha256(head).hexdigest())
    return ";".join(parts)


_MAGIC = [
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"BM", "a BMP image"),
    (b"%PDF", "a PDF document"),
    (b"PK\x03\x04", "a ZIP archive"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"\x00\x00\x00\x0cjP  ", "a JPEG 2000 image"),
    (b"\x89HDF", "an HDF5 file"),
]
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def sniff(head: bytes) -> str | None:
    """Describe a non-TIFF file from its first bytes; ``None`` if it is a TIFF."""
    if head[:4] in _TIFF_MAGIC:
        return None
    for magic, what in _MAGIC:
        if head.startswith(magic):
            return what
    if len(head) > 132 and head[128:132] == b"DICM":
        return "a DICOM file"
    sample = head[:4096]
    try:
        text = sample.decode("utf-8")
    except UnicodeDecodeError:
        return "a file of unknown type (no TIFF header)"
    if all(c.isprintable() or c in "\r\n\t" for c in text):
        return "a text file"
    return "a file of unknown type (no TIFF header)"


def first_ifd_truncated(head: bytes, size_bytes: int) -> bool:
    """Whether the TIFF's first image directory lies (partly) beyond the end
    of the file: the signature of a copy cut short near its start."""
    if head[:2] not in (b"II", b"MM") or len(head) < 8:
        return False
    end = "<" if head[:2] == b"II" else ">"
    try:
        if head[2:4] in (b"*\x00", b"\x00*"):  # classic TIFF
            (offset,) = struct.unpack(end + "I", head[4:8])
            count_fmt, entry_bytes, tail_bytes = "H", 12, 4
        else:  # BigTIFF
            (offset,) = struct.unpack(end + "Q", head[8:16])
            count_fmt, entry_bytes, tail_bytes = "Q", 20, 8
        if offset + struct.calcsize(count_fmt) > size_bytes:
            return True
        if offset + 8 <= len(head):
            (n,) = struct.unpack(end + count_fmt, head[offset : offset + struct.calcsize(count_fmt)])
            return offset + struct.calcsize(count_fmt) + n * entry_bytes + tail_bytes > size_bytes
    except struct.error:
        return True
    return False


# --------------------------------------------------------------------------- slides


def open_slide(uri: str, s3: S3Options | None = None):
    """Open a slide with tiffslide, locally or through fsspec with explicit
    block size and cache type.

    The caller owns the returned ``TiffSlide``; prefer :func:`opened_slide`,
    which also closes the remote file handle.

    Raises
    ------
    SlideError
        ``not_a_slide`` when tifffile cannot parse the file as TIFF.
    """
    from tiffslide import TiffSlide
    from tifffile import TiffFileError

    fh = None
    try:
        if is_remote(uri):
            opts = s3 or S3Options.from_env()
            fs = filesystem_for(uri, opts)
            fh = fs.open(uri, "rb", block_size=opts.block_size_bytes, cache_type=opts.cache_type)
            slide = TiffSlide(fh)
        else:
            slide = TiffSlide(os.path.abspath(strip_protocol(uri)))
    except FileNotFoundError:
        if fh is not None:
            fh.close()
        raise SlideError(NOT_FOUND, uri, f"no file at {uri!r}") from None
    except (TiffFileError, ValueError, IndexError, KeyError, struct.error, EOFError) as e:
        if fh is not None:
            fh.close()
        raise SlideError(
            NOT_A_SLIDE, uri, f"tifffile cannot parse {uri!r} ({type(e).__name__}: {e}); "
            "the file is corrupt, truncated or not a TIFF-based slide"
        ) from None
    slide._raypath_fh = fh  # keeps the remote handle alive with the slide
    return slide


@contextlib.contextmanager
def opened_slide(uri: str, s3: S3Options | None = None) -> Iterator[Any]:
    """``with opened_slide(uri) as slide:`` -- opens, then closes slide and file."""
    slide = open_slide(uri, s3)
    try:
        yield slide
    finally:
        with contextlib.suppress(Exception):
            slide.close()
        fh = getattr(slide, "_raypath_fh", None)
        if fh is not None:
            with contextlib.suppress(Exception):
                fh.close()


def _num(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _check_structure(slide, uri: str, size_bytes: int) -> None:
    """Layout and truncation checks that need no pixel decoding."""
    props = slide.properties
    axes = props.get("tiffslide.series-axes")
    tf = slide.ts_tifffile
    series = tf.series[props.get("tiffslide.series-index", 0) or 0]
    page0 = series.levels[0].pages[0]
    samples = getattr(page0, "samplesperpixel", 1)
    if axes != "YXS" or samples not in (3, 4):
        raise SlideError(
            UNSUPPORTED_LAYOUT, uri, f"image axes {axes!r} with {samples} sample(s) per pixel; "
            "raypath needs an RGB slide (brightfield H&E): convert fluorescence/greyscale "
            "images or remove them from the cohort"
        )
    if size_bytes <= 0:
        return
    for lvl, level in enumerate(series.levels):
        page = level.pages[0]
        ends = [o + n for o, n in zip(page.dataoffsets, page.databytecounts) if n]
        if ends and max(ends) > size_bytes:
            raise SlideError(
                TRUNCATED, uri, f"level {lvl} image data ends at byte {max(ends)} but the file "
                f"has {size_bytes} bytes: the file is truncated (an interrupted copy or "
                "download?); copy it again from the source"
            )


def _check_decodes(slide, uri: str) -> None:
    """Decode one small region at the coarsest and at the finest level, so a
    codec problem shows at ingest, not hours later in embedding."""
    page = slide.ts_tifffile.series[slide.properties.get("tiffslide.series-index", 0) or 0].levels[0].pages[0]
    compression = getattr(page, "compression", None)
    cname = getattr(compression, "name", str(compression))
    for level in sorted({slide.level_count - 1, 0}):
        w, h = slide.level_dimensions[level]
        ds = slide.level_downsamples[level]
        # a region in the middle of the level (the corners of a slide are often empty tiles)
        x0 = int((w // 2) * ds)
        y0 = int((h // 2) * ds)
        try:
            slide.read_region((x0, y0), level, (min(64, w), min(64, h)), as_array=True)
        except Exception as e:  # codecs raise many types
            msg = f"{type(e).__name__}: {e}"
            low = msg.lower()
            if any(k in low for k in ("compress", "codec", "imagecodecs", "not supported", "notimplemented", "decode")) or isinstance(e, (NotImplementedError, KeyError)):
                raise SlideError(
                    UNSUPPORTED_COMPRESSION, uri, f"level {level} uses compression {cname} which "
                    f"cannot be decoded here ({msg}); convert the slide to JPEG-compressed "
                    "pyramidal TIFF (e.g. `vips tiffsave in out.tif --tile --pyramid "
                    "--compression jpeg`)"
                ) from None
            raise SlideError(
                UNREADABLE, uri, f"decoding level {level} failed ({msg}); the file is corrupt"
            ) from None


def read_metadata(uri: str, s3: S3Options | None = None, check_pixels: bool = True) -> SlideMetadata:
    """Open a slide and read what ingest records.

    Parameters
    ----------
    uri
        Local path or ``s3://`` URI of the slide.
    s3
        S3 settings (block size, cache type, endpoint); ``None`` = environment.
    check_pixels
        Also decode a small region at the finest and coarsest level.

    Returns
    -------
    SlideMetadata
        ``mpp_x``/``mpp_y`` are ``None`` when the file has no plausible mpp.

    Raises
    ------
    SlideError
        With ``kind`` one of ``not_found``, ``empty_file``, ``truncated``,
        ``not_a_slide``, ``unsupported_compression``, ``unsupported_layout``,
        ``unreadable``.
    """
    info = file_info(uri, s3)
    if info["size"] == 0:
        raise SlideError(EMPTY_FILE, uri, f"{uri!r} is an empty (0-byte) file; copy it again from the source")
    try:
        head = read_head(uri, s3)
    except Exception as e:
        raise SlideError(UNREADABLE, uri, f"cannot read {uri!r}: {type(e).__name__}: {e}") from None
    what = sniff(head)
    if what is not None:
        raise SlideError(
            NOT_A_SLIDE, uri, f"{uri!r} is {what}, not a TIFF-based whole-slide image "
            "(supported: Aperio SVS, pyramidal TIFF, NDPI, SCN, BIF, Philips TIFF)"
        )
    if len(head) < 16:
        raise SlideError(TRUNCATED, uri, f"{uri!r} has only {len(head)} bytes: the file is truncated")
    if first_ifd_truncated(head, info["size"]):
        raise SlideError(
            TRUNCATED, uri, f"{uri!r} ends inside its first image directory ({info['size']} bytes): "
            "the file is truncated; copy it again from the source"
        )
    with opened_slide(uri, s3) as slide:
        try:
            props = slide.properties
            dims = [list(map(int, d)) for d in slide.level_dimensions]
            downs = [float(d) for d in slide.level_downsamples]
        except SlideError:
            raise
        except NotImplementedError as e:
            raise SlideError(UNSUPPORTED_LAYOUT, uri, f"tiffslide cannot read this layout: {e}") from None
        except Exception as e:
            raise SlideError(
                NOT_A_SLIDE, uri, f"not a readable slide ({type(e).__name__}: {e}); the file "
                "is corrupt or truncated, or a TIFF without an image pyramid series"
            ) from None
        _check_structure(slide, uri, info["size"])
        if check_pixels:
            _check_decodes(slide, uri)
        mpp_x = _num(props.get("tiffslide.mpp-x"))
        mpp_y = _num(props.get("tiffslide.mpp-y"))
        lo, hi = PLAUSIBLE_MPP_RANGE
        if mpp_x is None or not (lo <= mpp_x <= hi):
            mpp_x = mpp_y = None
        elif mpp_y is None or not (lo <= mpp_y <= hi):
            mpp_y = mpp_x
        return SlideMetadata(
            width=dims[0][0],
            height=dims[0][1],
            levels=len(dims),
            level_downsamples=downs,
            level_dimensions=dims,
            mpp_x=mpp_x,
            mpp_y=mpp_y,
            objective_power=_num(props.get("tiffslide.objective-power")),
            vendor=str(props.get("tiffslide.vendor") or "unknown"),
            bytes=info["size"],
            fingerprint=fingerprint(info, head),
        )


def classify_exception(exc: BaseException, uri: str) -> SlideError:
    """Turn any exception raised while handling a slide into a :class:`SlideError`."""
    if isinstance(exc, SlideError):
        return exc
    if isinstance(exc, FileNotFoundError):
        return SlideError(NOT_FOUND, uri, f"no file at {uri!r}")
    if isinstance(exc, PermissionError):
        return SlideError(UNREADABLE, uri, f"permission denied reading {uri!r}")
    if isinstance(exc, MemoryError):
        return SlideError(UNREADABLE, uri, "out of memory while reading the slide")
    return SlideError(UNREADABLE, uri, f"{type(exc).__name__}: {exc}")
