"""`python tests/client_fail.py ARGS`: the CLI, but every client is told a data folder that does not exist.

The driver's own data passes the pre-flight; the clients then fail to load theirs, as on a cluster node
without the files: what the user sees of errors raised inside ClientApps (tests/test_client_errors.py).
"""

import sys

from simulations.run import main
from simulations.runner import Experiment

original = Experiment.__init__


def init(self, *args, **kwargs):
    original(self, *args, **kwargs)
    self.cfg = self.cfg.replace(dataset="mnist", data_dir="/nonexistent")  # after the pre-flight: what the clients get


setattr(Experiment, "__init__", init)  # noqa: B010 (a method replaced on purpose, after the pre-flight)
sys.exit(main(sys.argv[1:]))
