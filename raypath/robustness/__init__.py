"""Robustness analysis: how much site (centre, scanner) information features carry.

- :mod:`.metrics` — plain metric functions over arrays (site probe, cohort-as-cluster
  metrics, KMeans cohort purity, robustness index RI, CRoMa, clustering score).
- :mod:`.plots` — t-SNE/UMAP maps, purity per cluster, RI curve, CRoMa histogram,
  tile galleries (PNG bytes).
- :mod:`.api` — :func:`run_robustness` and :func:`compare` over feature stores,
  writing ``<workdir>/runs/<run>/``.
- :mod:`.cli` — the ``raypath robustness`` verb.
"""

from raypath.robustness.api import RobustnessConfig, compare, run_robustness

__all__ = ["RobustnessConfig", "compare", "run_robustness"]
