"""Typed configs: flags < YAML < defaults precedence, saved next to outputs, strict keys."""

from __future__ import annotations

import argparse
from typing import Literal

import pytest
import yaml
from pydantic import Field

from raypath.config import StageConfig, add_config_arguments, config_from_args
from raypath.errors import RaypathError


class _Cfg(StageConfig):
    workdir: str = "out"
    tile_px: int = Field(224, description="tile side, px")
    mode: Literal["a", "b"] = "a"
    force: bool = False
    cohorts: list[str] | None = None
    aws_secret_access_key: str | None = None


def _parse(argv):
    p = argparse.ArgumentParser()
    add_config_arguments(p, _Cfg)
    return p.parse_args(argv)


def test_flags_override_yaml_override_defaults(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"tile_px": 256, "mode": "b"}))
    cfg = config_from_args(_Cfg, _parse(["--config", str(f), "--tile-px", "512", "--force", "--cohorts", "x", "y"]))
    assert cfg.tile_px == 512 and cfg.mode == "b" and cfg.force is True and cfg.cohorts == ["x", "y"]
    assert config_from_args(_Cfg, _parse([])).tile_px == 224


def test_unknown_key_is_an_error(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"tile_pix": 256}))
    with pytest.raises(RaypathError, match="unknown option `tile_pix`"):
        config_from_args(_Cfg, _parse(["--config", str(f)]))


def test_saved_config_reloads_and_redacts(tmp_path):
    cfg = _Cfg(tile_px=300, aws_secret_access_key="supersecret")
    path = cfg.save(str(tmp_path))
    text = open(path).read()
    assert "supersecret" not in text
    again = _Cfg.load(path)
    assert again.tile_px == 300


def test_cli_help_lists_every_verb(capsys):
    from raypath.cli import main

    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for verb in ("demo", "synth", "ingest", "tile", "embed", "adapt", "mil", "robustness", "sweep", "report", "submit", "s3"):
        assert f"    {verb} " in out


def test_top_level_help_is_fast_and_verb_help_is_full():
    """`raypath --help` imports no stage (no torch/Ray); `raypath VERB --help` shows the verb's own flags."""
    import subprocess
    import sys

    code = (
        "import sys, contextlib, io\n"
        "from raypath.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try: main(['--help'])\n"
        "    except SystemExit: pass\n"
        "print(sorted(m for m in ('torch', 'ray', 'sklearn') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    out = subprocess.run([sys.executable, "-m", "raypath.cli", "tile", "--help"], capture_output=True, text=True).stdout
    assert "--target-mpp" in out and "--min-tissue-fraction" in out
