"""A relative --workdir/--space must survive the move into Tune trials, which
run in another directory: the config resolves them once, on the driver."""

from __future__ import annotations

import os


def test_relative_sweep_paths_are_resolved_on_the_driver(tmp_path, monkeypatch):
    from raypath.sweep.api import SweepConfig

    monkeypatch.chdir(tmp_path)
    cfg = SweepConfig(workdir="work", space="space.yaml")
    assert cfg.workdir == os.path.join(str(tmp_path), "work")
    assert cfg.space == os.path.join(str(tmp_path), "space.yaml")
    monkeypatch.chdir("/")  # a trial's working directory
    assert os.path.join(cfg.workdir, "sweeps") == os.path.join(str(tmp_path), "work", "sweeps")
    assert SweepConfig(workdir="s3://bucket/work", space="/abs/space.yaml").workdir == "s3://bucket/work"
