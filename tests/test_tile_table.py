"""tiles.parquet as a dataset directory of per-slide parts (raypath.wsi.tile_table)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from raypath.schemas import TILES
from raypath.wsi import tile_table as tt


def _slide_tiles(sid: str, n: int, level: int = 0, read_px: int = 448) -> pa.Table:
    x = np.arange(n, dtype=np.int64) * read_px
    return pa.Table.from_pydict(
        {
            "slide_id": [sid] * n,
            "tile_id": np.arange(n, dtype=np.int64),
            "x": x,
            "y": np.zeros(n, np.int64),
            "level": np.full(n, level, np.int32),
            "read_px": np.full(n, read_px, np.int32),
            "tile_px": np.full(n, 224, np.int32),
            "target_mpp": np.full(n, 0.5),
            "tissue_fraction": np.ones(n, np.float32),
        },
        schema=TILES,
    )


def _write_dataset(wd, counts: dict[str, int], s3=None) -> None:
    tt.prepare_dataset(str(wd), s3)
    for sid, n in counts.items():
        tt.write_slide_tiles(str(wd), sid, _slide_tiles(sid, n), s3)
    tt.finish_dataset(str(wd), list(counts), s3)


def test_dataset_layout_reads_like_one_table(tmp_path):
    counts = {"b": 5, "a": 3, "c_1.x": 7}
    _write_dataset(tmp_path, counts)
    assert tt.layout(str(tmp_path)) == "dataset"
    whole = pd.read_parquet(tmp_path / "tiles.parquet")  # the contract: plain pandas/pyarrow still read it
    assert len(whole) == 15 and whole.groupby("slide_id").size().to_dict() == counts
    assert pq.read_table(tmp_path / "tiles.parquet").schema.equals(TILES)
    assert pads.dataset(str(tmp_path / "tiles.parquet"), format="parquet").count_rows() == 15
    one = tt.read_slide_tiles(str(tmp_path), "c_1.x")
    assert one["tile_id"].tolist() == list(range(7)) and set(one["slide_id"]) == {"c_1.x"}
    assert tt.read_slide_tiles(str(tmp_path), "missing").empty
    some = tt.read_tile_table(str(tmp_path), slide_ids=["a", "b"], columns=["slide_id", "x"])
    assert list(some.columns) == ["slide_id", "x"] and len(some) == 8


def test_index_comes_from_footers_and_matches_the_rows(tmp_path, monkeypatch):
    counts = {"s1": 4, "s2": 9}
    _write_dataset(tmp_path, counts)
    # planning must not read a tile row on the dataset layout: reading row data fails here
    monkeypatch.setattr(tt, "_read_file", lambda *a, **k: (_ for _ in ()).throw(AssertionError("row read")))
    idx = tt.tile_index(str(tmp_path)).set_index("slide_id")
    assert idx["n_tiles"].to_dict() == counts
    assert tt.tile_counts(str(tmp_path)).to_dict() == counts
    monkeypatch.undo()
    for sid in counts:
        rows = tt.read_slide_tiles(str(tmp_path), sid)
        assert idx.loc[sid, "tiles_sha256"] == tt.tiles_hash(rows)
        assert (idx.loc[sid, "level"], idx.loc[sid, "read_px"], idx.loc[sid, "tile_px"]) == (0, 448, 224)


def test_single_file_of_an_older_run_stays_readable(tmp_path):
    old = pa.concat_tables([_slide_tiles("a", 3), _slide_tiles("b", 2)])
    pq.write_table(old, tmp_path / "tiles.parquet")
    assert tt.layout(str(tmp_path)) == "file"
    assert len(tt.read_tile_table(str(tmp_path))) == 5
    assert tt.read_slide_tiles(str(tmp_path), "b")["tile_id"].tolist() == [0, 1]
    assert tt.tile_counts(str(tmp_path)).to_dict() == {"a": 3, "b": 2}
    idx = tt.tile_index(str(tmp_path)).set_index("slide_id")
    assert idx.loc["a", "tiles_sha256"] == tt.tiles_hash(_slide_tiles("a", 3).to_pandas())
    # re-tiling replaces the file with the directory layout
    _write_dataset(tmp_path, {"a": 2})
    assert tt.layout(str(tmp_path)) == "dataset" and tt.tile_counts(str(tmp_path)).to_dict() == {"a": 2}


def test_finish_drops_stale_parts_and_keeps_the_schema_when_empty(tmp_path):
    _write_dataset(tmp_path, {"a": 2, "gone": 3})
    _write_dataset(tmp_path, {"a": 4})
    assert tt.tile_counts(str(tmp_path)).to_dict() == {"a": 4}
    _write_dataset(tmp_path, {})
    t = pq.read_table(tmp_path / "tiles.parquet")
    assert t.num_rows == 0 and t.schema.equals(TILES)
    assert tt.tile_counts(str(tmp_path)).empty


def test_dataset_layout_on_s3(s3_server):
    s3 = s3_server.options
    wd = f"{s3_server.create_bucket('tiletable')}/wd"
    _write_dataset(wd, {"a": 3, "b": 1}, s3)
    assert tt.layout(wd, s3) == "dataset"
    assert tt.tile_counts(wd, s3).to_dict() == {"a": 3, "b": 1}
    assert len(tt.read_slide_tiles(wd, "a", s3)) == 3
    from raypath.io.storage import read_parquet

    assert read_parquet(f"{wd}/tiles.parquet", s3).num_rows == 4
    with pytest.raises(FileNotFoundError):
        tt.read_tile_table(f"{wd}-none", s3)
