"""The method registry, as the command line and older scripts import it: see `strategies.methods`.

Every method lives in its own file under `strategies/methods/` (settings, server step, client handlers, training
recorder), registered once; this module re-exports the registry so `from simulations.methods import register`
keeps working.
"""

from __future__ import annotations

from strategies.methods import (
                                REGISTRY,
                                Method,
                                MethodContext,
                                MethodOutcome,
                                arrays_nbytes,
                                check_methods,
                                client_handlers,
                                get_method,
                                register,
                                storage,
)

__all__ = ["REGISTRY", "Method", "MethodContext", "MethodOutcome", "arrays_nbytes", "check_methods", "client_handlers", "get_method",
           "register", "storage"]
