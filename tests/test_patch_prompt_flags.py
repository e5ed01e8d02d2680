"""PathoTune's knobs on `raypath patch` (#16): flags in --help and YAML, threaded to the method,
part of the results key; a changed N changes the trainable parameters and the fit."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

import numpy as np
import pytest

from raypath.config import config_from_args
from raypath.errors import RaypathError
from raypath.patch.api import PatchConfig
from raypath.patch.cli import add_cli

FLAGS = ("--prompt-tokens", "--prompt-depth", "--prompt-template", "--prompt-fill", "--text-tokens",
         "--text-encoder", "--instance-tokens", "--refine-hidden", "--prompt-optimizer", "--prompt-lr-scale")


def test_prompt_flags_are_in_help_yaml_and_the_results_key(tmp_path, capsys):
    from raypath.cli import main
    from raypath.fm.pathotune import PathoTuneConfig

    with pytest.raises(SystemExit):
        main(["patch", "--help"])
    text = capsys.readouterr().out
    assert all(f in text for f in FLAGS), [f for f in FLAGS if f not in text]
    base = PatchConfig(workdir=str(tmp_path), synth=True)
    ref = PathoTuneConfig()  # the flags' defaults are the method's
    assert (base.prompt_tokens, base.prompt_depth, base.prompt_template, base.prompt_fill, base.text_tokens,
            base.instance_tokens, base.text_encoder) == (ref.n_tokens, ref.depth, ref.template, ref.fill,
                                                         ref.text_tokens, ref.instance_tokens, ref.text_encoder)
    cfg_file = tmp_path / "p.yaml"
    cfg_file.write_text("prompt_tokens: 4\nprompt_fill: {stain: H&E, tissue: breast, task: mitosis}\n")
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers())
    args = parser.parse_args(["patch", "--workdir", str(tmp_path), "--synth", "--config", str(cfg_file),
                              "--prompt-depth", "1", "--instance-tokens", "3"])
    cfg = config_from_args(PatchConfig, args)
    assert (cfg.prompt_tokens, cfg.prompt_depth, cfg.instance_tokens) == (4, 1, 3)
    assert cfg.prompt_fill["tissue"] == "breast"
    keys = {base.results_key("x")}
    for change in ({"prompt_tokens": 4}, {"prompt_depth": 1}, {"prompt_template": "{stain} {tissue} {task}"},
                   {"prompt_fill": {"stain": "IHC", "tissue": "colorectal", "task": "tumour"}}, {"text_tokens": 2},
                   {"instance_tokens": 3}, {"prompt_optimizer": "adamw"}, {"prompt_lr_scale": 1.0}):
        keys.add(PatchConfig(workdir=str(tmp_path), synth=True, **change).results_key("x"))
    assert len(keys) == 9
    bad = parser.parse_args(["patch", "--workdir", str(tmp_path), "--synth", "--prompt-template", "{organ} tissue"])
    with pytest.raises(RaypathError, match="--prompt-fill"):
        config_from_args(PatchConfig, bad)
    cli_fill = parser.parse_args(["patch", "--workdir", str(tmp_path), "--synth", "--prompt-fill",
                                  json.dumps({"stain": "PAS", "tissue": "kidney", "task": "glomerulus"})])
    assert config_from_args(PatchConfig, cli_fill).prompt_fill["stain"] == "PAS"


def _job(cfg: PatchConfig, method: str):
    from raypath.patch.methods import FitJob
    from raypath.patch.protocols import Fit

    fit = Fit("scaling", "all", method, 1.0, 42, np.arange(4), np.arange(0), {"test:all": np.arange(4)})
    return FitJob(fit=fit, y=np.array([0, 1, 0, 1]), classes=["a", "b"], positive=1, cfg=cfg, images_folder="")


def test_the_flags_reach_the_pathotune_net_and_n_changes_the_trainable_parameters(tmp_path):
    from raypath.patch.finetune import build_net
    from raypath.patch.methods import get_method

    def trainable(**kw) -> tuple[int, object]:
        cfg = PatchConfig(workdir=str(tmp_path), synth=True, model="tiny-vit", **kw)
        spec = get_method("pathotune-tvp").spec(_job(cfg, "pathotune-tvp"))
        net = build_net(spec)
        return sum(p.numel() for p in net.parameters() if p.requires_grad), spec

    n3, spec3 = trainable(prompt_tokens=3)
    n5, spec5 = trainable(prompt_tokens=5)
    assert spec3.extra["pathotune"]["n_tokens"] == 3 and spec5.extra["pathotune"]["n_tokens"] == 5
    assert n5 - n3 == 2 * 2 * 64  # 2 more tokens x 2 blocks x width 64
    n_shallow, spec = trainable(prompt_tokens=5, prompt_depth=1, prompt_optimizer="adamw", prompt_lr_scale=2.0, lr=1e-3)
    assert n5 - n_shallow == 5 * 64 and spec.extra["optimizer"] == "adamw" and spec.lr == pytest.approx(2e-3)
    full = get_method("pathotune").spec(_job(PatchConfig(
        workdir=str(tmp_path), synth=True, model="tiny-vit", instance_tokens=3, text_tokens=2, refine_hidden=8,
        prompt_fill={"stain": "H&E", "tissue": "breast", "task": "mitosis"}), "pathotune"))
    pt = full.extra["pathotune"]
    assert (pt["instance_tokens"], pt["text_tokens"], pt["refine_hidden"], pt["ivp"]) == (3, 2, 8, True)
    assert pt["fill"]["tissue"] == "breast"
    assert not get_method("pathotune-tvp-ttp").spec(_job(PatchConfig(workdir=str(tmp_path), synth=True),
                                                         "pathotune-tvp-ttp")).extra["pathotune"]["ivp"]


def test_a_changed_n_refits_with_other_trainable_parameters(tmp_path):
    from raypath.patch.api import run_patch
    from test_patch_reuse import write_patch_table

    table = write_patch_table(tmp_path)
    base = dict(workdir=str(tmp_path / "w"), patches=table, model="tiny-vit", patch_px=16, shift_px=2, mpp=0.5,
                methods=["pathotune-tvp"], protocols=["scaling"], fractions=[1.0], seeds=[42], n_boot=0,
                max_epochs=1, patience=2, pseudo_epoch=16, batch_size=8, device="cpu")
    rec = os.path.join(str(tmp_path / "w"), "runs", "patch", "fits", "scaling__all__pathotune-tvp__f1__s42.json")
    run_patch(PatchConfig(**base, prompt_tokens=3))
    a = json.load(open(rec))
    run_patch(PatchConfig(**base, prompt_tokens=5))
    b = json.load(open(rec))
    assert a["results_key"] != b["results_key"]
    assert b["info"]["trainable_params"] - a["info"]["trainable_params"] == 2 * 2 * 64
    assert a["info"]["trainable_params"] == 2 * 3 * 64 + 65  # TVP tokens + the one-logit head


def test_pathotune_config_fields_match_the_flags():
    from raypath.fm.pathotune import PathoTuneConfig
    from raypath.patch.methods import pathotune_options

    fields = {f.name for f in dataclasses.fields(PathoTuneConfig)} - {"tvp", "ttp", "ivp"}
    assert set(pathotune_options(PatchConfig(workdir="w", synth=True))) == fields  # every knob is a flag
