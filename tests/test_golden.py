"""The headline numbers of ``demo --small`` equal the committed golden file
(written from the commit before the package restructure): a refactor must not
change results.  A change that alters results on purpose regenerates the file
and says why in its commit (see tests/golden/headline.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from golden.headline import headline

GOLDEN = Path(__file__).parent / "golden" / "demo_small.json"


def test_demo_small_headline_equals_golden(tmp_path, ray_session):
    from raypath.demo import DemoConfig, run_demo

    run_demo(DemoConfig(workdir=str(tmp_path / "wd"), small=True, s3=False, adapt_folds=0))  # adaptation: test_demo
    got = headline(tmp_path / "wd")
    want = json.loads(GOLDEN.read_text())
    missing = sorted(set(want) - set(got))
    assert not missing, f"headline keys gone: {missing[:5]}"
    diffs = {k: (want[k], got[k]) for k in want if not math.isclose(want[k], got[k], rel_tol=0, abs_tol=1e-6)}
    assert not diffs, f"headline numbers changed: {dict(list(diffs.items())[:8])}"
