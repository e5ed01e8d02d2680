"""One CLI: every flag described with its default (and unit), help in sections,
no markup or internals, one spelling per thing with the old ones still accepted."""

from __future__ import annotations

import argparse
import re

import pytest

from raypath.cli import VERBS, build_parser


def _verb_parser(verb: str) -> argparse.ArgumentParser:
    p = build_parser([verb])
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[verb]


def _options(parser: argparse.ArgumentParser, prefix: str):
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sp in a.choices.items():
                yield from _options(sp, f"{prefix} {name}")
        elif a.help != argparse.SUPPRESS and a.dest != "help":
            yield prefix, a


@pytest.mark.parametrize("verb", list(VERBS))
def test_every_flag_has_help_with_default(verb):
    bad = []
    for where, a in _options(_verb_parser(verb), verb):
        flag = a.option_strings[0] if a.option_strings else a.dest
        text = a.help or ""
        if not text.strip():
            bad.append(f"{where} {flag}: no help")
        elif a.option_strings and a.nargs != 0 and not re.search(r"default|required", text):
            bad.append(f"{where} {flag}: no default ({text[:50]})")
        if re.search(r"``|:func:|:class:|\bNone\b|run_mil\b", text):
            bad.append(f"{where} {flag}: markup or internals ({text[:60]})")
    assert not bad, "\n".join(bad)


def test_help_in_sections_with_units():
    text = _verb_parser("embed").format_help()
    for section in ("inputs and outputs:", "model:", "Ray resources:"):
        assert section in text
    assert "--progress-interval-s SECONDS" in text and "s]" in text  # the unit after the default
    mil = _verb_parser("mil").format_help()
    assert mil.index("inputs and outputs:") < mil.index("training:") < mil.index("Ray resources:")


def test_one_spelling_old_ones_hidden_but_accepted():
    p = build_parser(["embed"])
    assert p.parse_args(["embed", "--workdir", "w", "--features", "f"]).feature_dir == "f"
    assert p.parse_args(["embed", "--workdir", "w", "--feature-dir", "f"]).feature_dir == "f"
    assert "--feature-dir" not in _verb_parser("embed").format_help()
    r = build_parser(["report"])
    assert r.parse_args(["report", "--run", "a", "--compare", "b"]).compare_to == "b"
    assert r.parse_args(["report", "old/positional"]).path == "old/positional"
    assert "--compare " not in _verb_parser("report").format_help()
    h = build_parser(["export-h5"])
    assert h.parse_args(["export-h5", "--features", "f", "--out", "o"]).features == "f"
    assert h.parse_args(["export-h5", "f", "o"]).feature_dir == "f"


def test_features_accepts_a_unique_model_name(tmp_path):
    from raypath.embed.identity import store_name
    from raypath.embed.store import resolve_feature_dir
    from raypath.errors import RaypathError

    frozen, adapted = "uni-0123abcd", store_name("uni-89abcdef", str(tmp_path / "adapters" / "dora-c0"))
    assert adapted == "uni+dora-c0-89abcdef"
    for name in (frozen, adapted, "uni2-h-55555555"):
        (tmp_path / "features" / name).mkdir(parents=True)
    assert resolve_feature_dir(str(tmp_path), "uni").endswith("/features/uni-0123abcd")
    assert resolve_feature_dir(str(tmp_path), "uni+dora-c0").endswith("/features/" + adapted)
    assert resolve_feature_dir(str(tmp_path), adapted).endswith("/features/" + adapted)
    (tmp_path / "features" / "uni+dora-c1-77777777").mkdir()
    with pytest.raises(RaypathError, match="several feature stores"):
        resolve_feature_dir(str(tmp_path), "uni+dora")
