"""The method registry, as the command line and older scripts import it: see `strategies.methods`.

Every method lives in its own file under `strategies/methods/` (settings, server step, client handlers, training
recorder), registered once; this module re-exports the registry so `from simulations.methods import register`
keeps working.
"""

from __future__ import annotations

from strategies.methods import *  # noqa: F403
from strategies.methods import __all__  # noqa: F401
