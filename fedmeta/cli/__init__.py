"""The ``fedmeta`` command line: :func:`main` (the console script) and one module per command.

* :mod:`~fedmeta.cli.main`: argument parsing and dispatch, errors as one paragraph and an exit code;
* :mod:`~fedmeta.cli.common`: the shared options, the progress bar and the final report;
* commands: :mod:`~fedmeta.cli.centralized`, :mod:`~fedmeta.cli.make_data`,
  :mod:`~fedmeta.cli.simulate`, :mod:`~fedmeta.cli.privacy`, :mod:`~fedmeta.cli.deploy`
  (``deploy-local``, ``make-certs``, ``make-node-key``), :mod:`~fedmeta.cli.adapt` (``adapt``,
  ``predict``).

Importing it changes nothing in the environment and loads neither torch nor Flower; a command
that uses Flower sets Flower's environment (:func:`fedmeta.flower.env.configure_environment`)
when it runs.
"""

from __future__ import annotations

from fedmeta.cli.main import build_parser, main

__all__ = ["main", "build_parser"]
