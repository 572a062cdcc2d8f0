"""Ray Tune sweeps over a recipe: `tips tune sweep=PATH [key=value ...] [resume=true]`.

spec.py    sweep file schema, search space, validation before any trial (no Ray)
driver.py  the Tune trial: one full elastic Train run, with the PBT relay
tuner.py   Tuner construction (ASHA / PBT / FIFO), resume of an interrupted sweep
report.py  results.csv / results.md, best_recipe.yaml, plots
cli.py     the `tips tune` verb
"""

from orchestrator.tune.spec import Sweep, SweepError, load_sweep

__all__ = ["Sweep", "SweepError", "load_sweep"]
