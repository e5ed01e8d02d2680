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
import logging
import math
import os
import re
import struct
import threading
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

import numpy as np

from raypath.errors import RaypathError, StorageUnavailable
from raypath.io.storage import S3Options, as_outage, endpoint_failing, filesystem_for, is_remote, strip_protocol

log = logging.getLogger(__name__)

#: Bytes hashed for the fingerprint: the TIFF header and, for most slides, the first IFDs.
HEAD_BYTES = 64 * 1024
#: mpp values outside this range (um/px) are treated as absent: TIFF resolution
#: tags often hold screen defaults (72 dpi = 352.8 um/px), not the scanner's.
PLAUSIBLE_MPP_RANGE = (0.05, 20.0)

#: Failure kinds recorded in ``slides.parquet``'s ``error`` column (as the message prefix),
#: each with the next step (docs/CONTRACTS.md lists them).
NOT_FOUND = "not_found"
EMPTY_FILE = "empty_file"
TRUNCATED = "truncated"
NOT_A_SLIDE = "not_a_slide"
UNOPENABLE = "unopenable"
CORRUPT_STRUCTURE = "corrupt_structure"
CORRUPT_TILE_DATA = "corrupt_tile_data"
UNSUPPORTED_COMPRESSION = "unsupported_compression"
UNSUPPORTED_LAYOUT = "unsupported_layout"
UNREADABLE = "unreadable"
NO_MPP = "no_mpp"
STORAGE_UNAVAILABLE = "storage_unavailable"  # never a slide's status: the run stops (exit 4)

REMEDIES = {
    NOT_FOUND: "check the `uri` column (relative uris resolve against the cohort table's folder)",
    EMPTY_FILE: "copy the file again from the source",
    TRUNCATED: "the copy is incomplete (an interrupted copy or download?): copy it again from the source",
    NOT_A_SLIDE: "raypath reads TIFF-based slides (Aperio SVS, pyramidal TIFF, NDPI, SCN, BIF, Philips TIFF): "
                 "convert it to pyramidal TIFF or drop it from the cohort",
    UNOPENABLE: "its TIFF structure is corrupt: copy the file again from the source or re-export it from the "
                "scanner software",
    CORRUPT_STRUCTURE: "its image header contradicts itself: copy the file again from the source or re-export it "
                       "from the scanner software",
    CORRUPT_TILE_DATA: "copy the file again from the source (compare checksums) or re-scan the slide; to use it "
                       "anyway raise --max-damaged-fraction (damaged tiles are then recorded and skipped)",
    UNSUPPORTED_COMPRESSION: "convert the slide to JPEG-compressed pyramidal TIFF (e.g. `vips tiffsave in.svs "
                             "out.tif --tile --pyramid --compression jpeg`)",
    UNSUPPORTED_LAYOUT: "raypath needs an RGB brightfield slide: convert fluorescence/greyscale images or drop "
                        "them from the cohort",
    NO_MPP: "add an `mpp` column to the cohort table or pass --mpp-override",
    UNREADABLE: "check that the file can be read (permissions, memory) and re-run",
    STORAGE_UNAVAILABLE: "re-run the same command when the storage endpoint is back",
}

#: Stored tiles decoded per pyramid level at ingest (spread over the level).
DECODE_SAMPLE_TILES = 12
#: A slide with more than this fraction of damaged tiles (sampled at ingest, all at embed) is failed.
DEFAULT_MAX_DAMAGED_FRACTION = 0.05


class SlideError(RaypathError):
    """A slide that cannot be used: ``kind``, what is wrong, and the next step."""

    def __init__(self, kind: str, uri: str, detail: str, remedy: str | None = None):
        self.kind = kind
        self.uri = uri
        self.detail = detail
        self.remedy = REMEDIES.get(kind, "") if remedy is None else remedy
        super().__init__(f"{kind}: {detail}" + (f"; {self.remedy}" if self.remedy else ""))

    def __reduce__(self):
        return (type(self), (self.kind, self.uri, self.detail, self.remedy))


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
        raise SlideError(NOT_FOUND, uri, f"no file at {uri!r}") from None
    except PermissionError as e:
        raise SlideError(UNREADABLE, uri, f"permission denied reading {uri!r}: {e}",
                         "give the user running raypath read access to the file") from None
    if info.get("type") == "directory":
        raise SlideError(NOT_A_SLIDE, uri, f"{uri!r} is a directory; multi-file formats (MRXS, DICOM) "
                         "are not supported")
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
        ``unopenable`` when tifffile cannot parse the file's TIFF structure.
    StorageUnavailable
        The storage endpoint did not answer (never blamed on the file).
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
    except (TiffFileError, ValueError, IndexError, KeyError, struct.error, EOFError, OverflowError,
            MemoryError, OSError) as e:
        if fh is not None:
            with contextlib.suppress(Exception):
                fh.close()
        outage = as_outage(e, s3) if is_remote(uri) else None
        if outage is not None:
            raise outage from None
        raise SlideError(UNOPENABLE, uri, f"tifffile cannot parse {uri!r} ({type(e).__name__}: {e})") from None
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


# --------------------------------------------------------------------------- what tifffile complains about


class _TiffMessages(logging.Handler):
    """Collects what tifffile logs in this thread while a slide is parsed: a tag
    whose value lies beyond the end of the file is only a log line there."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.thread = threading.get_ident()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            self.messages.append(record.getMessage())


@contextlib.contextmanager
def tifffile_messages() -> Iterator[list[str]]:
    """``with tifffile_messages() as msgs:`` -- tifffile's warnings of this thread, kept out of the log."""
    lg = logging.getLogger("tifffile")
    h = _TiffMessages()
    old = lg.propagate
    lg.addHandler(h)
    lg.propagate = False
    try:
        yield h.messages
    finally:
        lg.removeHandler(h)
        lg.propagate = old
        for m in h.messages:
            log.debug("tifffile: %s", m)


_BAD_OFFSET = re.compile(r"TiffTag (\d+) @\d+> invalid value offset (\d+)")
_BAD_PAGE = re.compile(r"invalid page offset (\d+)")
#: Tags without which the pixels cannot be located or decoded.
_ESSENTIAL_TAGS = {256, 257, 258, 259, 262, 270, 273, 277, 279, 322, 323, 324, 325, 347}


def _beyond_end(uri: str, what: str, end: int, size_bytes: int) -> SlideError:
    """A reference past the end of the file: a cut copy, or (far past it) a corrupt pointer."""
    if end > 2 * size_bytes + (1 << 20):
        return SlideError(CORRUPT_STRUCTURE, uri, f"{what} points at byte {end}, far beyond the end of the file "
                          f"({size_bytes} bytes)")
    return SlideError(TRUNCATED, uri, f"{what} reaches byte {end} but the file has {size_bytes} bytes")


def _judge_messages(messages: list[str], uri: str, size_bytes: int) -> None:
    """Raise for tifffile complaints that mean a truncated or corrupt header."""
    for m in messages:
        hit = _BAD_OFFSET.search(m)
        if hit and int(hit.group(2)) >= size_bytes:
            raise _beyond_end(uri, f"tag {hit.group(1)}", int(hit.group(2)), size_bytes)
        hit = _BAD_PAGE.search(m)
        if hit and int(hit.group(1)) >= size_bytes:
            raise _beyond_end(uri, "the next image directory", int(hit.group(1)), size_bytes)
    for m in messages:
        hit = re.search(r"TiffTag (\d+) @", m)
        if hit and int(hit.group(1)) in _ESSENTIAL_TAGS:
            raise SlideError(CORRUPT_STRUCTURE, uri, f"tifffile: {m[:200]}")


# --------------------------------------------------------------------------- structure


def _series(slide):
    return slide.ts_tifffile.series[slide.properties.get("tiffslide.series-index", 0) or 0]


def _check_layout(slide, uri: str) -> None:
    axes = slide.properties.get("tiffslide.series-axes")
    page0 = _series(slide).levels[0].pages[0]
    samples = getattr(page0, "samplesperpixel", 1)
    if axes != "YXS" or samples not in (3, 4):
        raise SlideError(UNSUPPORTED_LAYOUT, uri, f"image axes {axes!r} with {samples} sample(s) per pixel")


def _check_extents(slide, uri: str, size_bytes: int) -> None:
    """Every byte the file's directories point at must exist (all pages, not only the pyramid)."""
    for i, page in enumerate(slide.ts_tifffile.pages):
        ends = [o + n for o, n in zip(page.dataoffsets, page.databytecounts) if n]
        if ends and max(ends) > size_bytes:
            raise _beyond_end(uri, f"the image data of image {i}", int(max(ends)), size_bytes)
        for tag in page.tags.values():
            end = int(tag.valueoffset) + int(tag.valuebytecount)
            if tag.valuebytecount > 4 and end > size_bytes:
                raise _beyond_end(uri, f"tag {tag.name} of image {i}", end, size_bytes)


def _expected_segments(page) -> int | None:
    if page.is_tiled:
        across = -(-page.imagewidth // page.tilewidth)
        down = -(-page.imagelength // page.tilelength)
        deep = -(-max(page.imagedepth, 1) // max(page.tiledepth, 1))
        n = across * down * deep
    elif page.rowsperstrip:
        n = -(-page.imagelength // page.rowsperstrip) * max(page.imagedepth, 1)
    else:
        return None
    return n * (page.samplesperpixel if page.planarconfig == 2 else 1)


def _check_tile_counts(slide, uri: str) -> None:
    """A page's size and its stored tile count must agree (``TileOffsets`` vs width x height)."""
    for lvl, level in enumerate(_series(slide).levels):
        page = level.pages[0]
        want = _expected_segments(page)
        have = len(page.dataoffsets)
        if want is not None and want != have:
            what = (f"{page.tilewidth}x{page.tilelength} px tiles" if page.is_tiled
                    else f"strips of {page.rowsperstrip} rows")
            raise SlideError(
                CORRUPT_STRUCTURE, uri, f"level {lvl} declares {page.imagewidth} x {page.imagelength} px in "
                f"{what} = {want} stored pieces, but stores {have} (TileOffsets)"
            )


_JPEG_CODES = (6, 7)
_J2K_CODES = (33003, 33004, 33005, 34712)


def _codec_name(value: int) -> str:
    from tifffile import COMPRESSION

    try:
        return COMPRESSION(value).name
    except ValueError:
        return f"#{value}"


def _tile_format(data: bytes) -> str | None:
    if data[:2] == b"\xff\xd8":
        return "JPEG"
    if data[:4] == b"\xff\x4f\xff\x51" or data[4:8] == b"jP  ":
        return "JPEG 2000"
    return None


def _check_compression(slide, uri: str) -> None:
    """A codec this machine lacks is ``unsupported_compression``; a tag that lies is ``corrupt_structure``."""
    from tifffile import TIFF

    page = _series(slide).levels[0].pages[0]
    value = int(page.compression)
    try:
        TIFF.DECOMPRESSORS[value]
    except KeyError:
        data = _stored_bytes(page, 0) if len(page.dataoffsets) else b""
        if _tile_format(data):  # the tag lies: the data is a format raypath decodes
            raise SlideError(CORRUPT_STRUCTURE, uri, f"level 0 says compression {_codec_name(value)} but its "
                             f"tiles hold {_tile_format(data)} data") from None
        raise SlideError(UNSUPPORTED_COMPRESSION, uri, f"level 0 uses compression {_codec_name(value)}, which "
                         "cannot be decoded here") from None


# --------------------------------------------------------------------------- pixels


def _stored_bytes(page, index: int) -> bytes:
    fh = page.parent.filehandle
    off, n = int(page.dataoffsets[index]), int(page.databytecounts[index])
    with fh.lock:
        fh.seek(off)
        return fh.read(n)


def decode_stored_tile(page, index: int) -> tuple[np.ndarray | None, str | None]:
    """Decode stored tile ``index`` of ``page``; ``(pixels, damage)`` with ``damage`` ``None`` when sound."""
    from raypath.wsi.jpeg import decode_tile

    data = _stored_bytes(page, index)
    if not data:
        return None, None  # sparse tile: nothing stored, nothing damaged
    if int(page.compression) == 7:
        from tifffile.tifffile import jpeg_decode_colorspace

        cs = jpeg_decode_colorspace(page.photometric, page.planarconfig, page.extrasamples, page.is_jfif)
        return decode_tile(data, page.jpegtables, cs[0], cs[1], (page.tilelength or page.rowsperstrip,
                                                                 page.tilewidth or page.imagewidth))
    try:
        seg, _, _ = page.decode(data, index, jpegtables=getattr(page, "jpegtables", None))
        return seg, None
    except Exception as e:  # codecs raise many types
        return None, f"{type(e).__name__}: {e}"[:200]


def _sample(n: int, k: int) -> list[int]:
    return sorted({int(i) for i in np.linspace(0, n - 1, min(n, k))}) if n else []


def check_tile_data(slide, uri: str, max_damaged_fraction: float = DEFAULT_MAX_DAMAGED_FRACTION) -> list[str]:
    """Decode stored tiles spread over the finest and the coarsest level.

    Returns the damage found (``"level L tile i: ..."``) when it stays within
    ``max_damaged_fraction`` of the sampled tiles; raises ``corrupt_tile_data``
    beyond it, or ``corrupt_structure`` when the compression tag does not match
    the data (a JPEG 2000 tag over JPEG tiles).
    """
    levels = _series(slide).levels
    damage, decoded = [], 0
    for lvl in sorted({0, len(levels) - 1}):
        page = levels[lvl].pages[0]
        for i in _sample(len(page.dataoffsets), DECODE_SAMPLE_TILES):
            _, problem = decode_stored_tile(page, i)
            decoded += 1
            if problem is None:
                continue
            fmt, value = _tile_format(_stored_bytes(page, i)), int(page.compression)
            if (fmt == "JPEG" and value not in _JPEG_CODES) or (fmt == "JPEG 2000" and value not in _J2K_CODES):
                raise SlideError(CORRUPT_STRUCTURE, uri, f"level {lvl} says compression {_codec_name(value)} but "
                                 f"its tiles hold {fmt} data")
            damage.append(f"level {lvl} tile {i}: {problem}")
    if decoded and len(damage) / decoded > max_damaged_fraction:
        raise SlideError(CORRUPT_TILE_DATA, uri, f"{len(damage)} of {decoded} sampled stored tiles are damaged "
                         f"({damage[0]})")
    return damage


def read_metadata(uri: str, s3: S3Options | None = None, check_pixels: bool = True,
                  max_damaged_fraction: float = DEFAULT_MAX_DAMAGED_FRACTION) -> SlideMetadata:
    """Open a slide and read what ingest records.

    Parameters
    ----------
    uri
        Local path or ``s3://`` URI of the slide.
    s3
        S3 settings (block size, cache type, endpoint); ``None`` = environment.
    check_pixels
        Also decode stored tiles spread over the finest and the coarsest level.
    max_damaged_fraction
        Sampled tiles that may be damaged before the slide is ``corrupt_tile_data``.

    Returns
    -------
    SlideMetadata
        ``mpp_x``/``mpp_y`` are ``None`` when the file has no plausible mpp;
        ``extra["damaged_tiles"]`` lists damage found within the tolerance.

    Raises
    ------
    SlideError
        ``kind`` one of :data:`REMEDIES` (never ``storage_unavailable``).
    StorageUnavailable
        The storage endpoint did not answer (the file is not blamed).
    """
    info = file_info(uri, s3)
    if info["size"] == 0:
        raise SlideError(EMPTY_FILE, uri, f"{uri!r} is an empty (0-byte) file")
    head = read_head(uri, s3)
    what = sniff(head)
    if what is not None:
        raise SlideError(NOT_A_SLIDE, uri, f"{uri!r} is {what}, not a TIFF-based whole-slide image")
    if len(head) < 16 or first_ifd_truncated(head, info["size"]):
        raise SlideError(TRUNCATED, uri, f"{uri!r} ends inside its first image directory ({info['size']} bytes)")
    with tifffile_messages() as messages:
        try:
            with opened_slide(uri, s3) as slide:
                props = _inspect(slide, uri, info["size"], messages)
                damage = check_tile_data(slide, uri, max_damaged_fraction) if check_pixels else []
        except SlideError as e:
            if e.kind == UNOPENABLE:
                _judge_messages(messages, uri, info["size"])
            raise
    meta = _metadata(props, info, head)
    meta.extra["damaged_tiles"] = damage
    return meta


def _inspect(slide, uri: str, size_bytes: int, messages: list[str]) -> dict[str, Any]:
    """Properties and pyramid of an open slide, after every structural check."""
    try:
        props = dict(slide.properties)
        dims = [list(map(int, d)) for d in slide.level_dimensions]
        downs = [float(d) for d in slide.level_downsamples]
    except NotImplementedError as e:
        raise SlideError(UNSUPPORTED_LAYOUT, uri, f"tiffslide cannot read this layout: {e}") from None
    except Exception as e:  # tifffile parses lazily: a broken directory shows here
        _judge_messages(messages, uri, size_bytes)
        raise SlideError(UNOPENABLE, uri, f"not a readable slide ({type(e).__name__}: {e})") from None
    _judge_messages(messages, uri, size_bytes)
    _check_extents(slide, uri, size_bytes)
    _check_layout(slide, uri)
    _check_tile_counts(slide, uri)
    _check_compression(slide, uri)
    _judge_messages(messages, uri, size_bytes)
    return {"props": props, "dims": dims, "downs": downs}


def _metadata(p: dict[str, Any], info: dict[str, Any], head: bytes) -> SlideMetadata:
    props, dims = p["props"], p["dims"]
    mpp_x = _num(props.get("tiffslide.mpp-x"))
    mpp_y = _num(props.get("tiffslide.mpp-y"))
    lo, hi = PLAUSIBLE_MPP_RANGE
    if mpp_x is None or not (lo <= mpp_x <= hi):
        mpp_x = mpp_y = None
    elif mpp_y is None or not (lo <= mpp_y <= hi):
        mpp_y = mpp_x
    return SlideMetadata(
        width=dims[0][0], height=dims[0][1], levels=len(dims), level_downsamples=p["downs"],
        level_dimensions=dims, mpp_x=mpp_x, mpp_y=mpp_y,
        objective_power=_num(props.get("tiffslide.objective-power")),
        vendor=str(props.get("tiffslide.vendor") or "unknown"), bytes=info["size"],
        fingerprint=fingerprint(info, head),
    )


# --------------------------------------------------------------------------- later stages

_CODEC_WORDS = ("jpeg", "jpg", "codec", "decode", "huffman", "marker", "imagecodecs", "lzw", "zlib", "deflate",
                "jp2", "j2k", "openjpeg")


def classify_exception(exc: BaseException, uri: str, s3: S3Options | None = None) -> SlideError:
    """Turn any exception raised while handling a slide into a :class:`SlideError` with its cause.

    Raises
    ------
    StorageUnavailable
        Instead of returning, when the storage endpoint caused ``exc`` (or is
        failing right now) for a remote slide: an outage is never a slide's fault.
    """
    if is_remote(uri):  # first: a verdict reached while the endpoint fails may be wrong
        outage = as_outage(exc, s3) or endpoint_failing(s3)
        if outage is not None:
            raise outage
    if isinstance(exc, StorageUnavailable):
        raise exc
    if isinstance(exc, SlideError):
        return exc
    msg = f"{type(exc).__name__}: {exc}".replace("\n", " ")[:300]
    low = msg.lower()
    if isinstance(exc, FileNotFoundError):
        return SlideError(NOT_FOUND, uri, f"no file at {uri!r}")
    if isinstance(exc, PermissionError):
        return SlideError(UNREADABLE, uri, f"permission denied reading {uri!r}",
                          "give the user running raypath read access to the file")
    if isinstance(exc, MemoryError):
        return SlideError(UNREADABLE, uri, "out of memory while reading the slide",
                          "give the workers more memory (fewer slides at once) and re-run")
    if "truncated" in low or isinstance(exc, EOFError) or "end of file" in low or "eof" in low.split():
        return SlideError(TRUNCATED, uri, msg)
    if type(exc).__name__ == "TiffFileError":
        return SlideError(UNOPENABLE, uri, msg)
    if any(w in low for w in _CODEC_WORDS):
        return SlideError(CORRUPT_TILE_DATA, uri, f"decoding stored tiles failed ({msg})",
                          "copy the file again from the source (compare checksums) or re-scan the slide")
    return SlideError(UNREADABLE, uri, msg, "re-run `raypath ingest` on this slide to find the cause, or drop it")
