"""``raypath sweep``: Ray Tune + Optuna over adapter and MIL settings, scored by nested LODO.

* :mod:`.space` -- the YAML search space;
* :mod:`.nested` -- the nested-LODO plan: which slides each step of a fold sees;
* :mod:`.objective` -- one trial (adapt -> embed -> MIL per fold);
* :mod:`.api` -- :func:`run_sweep` (Tuner, OptunaSearch, ASHA, restore);
* :mod:`.outputs` -- trials table, best config, Pareto front, plots.
"""

from raypath.sweep.cli import add_cli

__all__ = ["add_cli", "run_sweep", "SweepConfig", "nested_lodo_plan", "audit_plan"]


def __getattr__(name):  # keep `import raypath.sweep` light for the CLI
    if name in ("run_sweep", "SweepConfig"):
        from raypath.sweep import api

        return getattr(api, name)
    if name in ("nested_lodo_plan", "audit_plan"):
        from raypath.sweep import nested

        return getattr(nested, name)
    raise AttributeError(name)
