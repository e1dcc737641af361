"""Everything Flower: the only part of :mod:`fedmeta` that imports ``flwr``.

* :mod:`~fedmeta.flower.env`: :func:`~fedmeta.flower.env.configure_environment`, the explicit
  set-up of Flower's and Ray's environment variables (no module changes ``os.environ`` on
  import), and the ``$FLWR_HOME`` connection file of ``flwr run``;
* :mod:`~fedmeta.flower.records`: parameters, metrics and messages <-> Flower records;
* :mod:`~fedmeta.flower.run_config`: Flower's ``run_config`` mapping <-> :class:`~fedmeta.config.Config`;
* :mod:`~fedmeta.flower.transport`: ``FlowerTransport``, a :class:`~fedmeta.federation.loop.RoundLoop`'s
  rounds as Flower messages (start-up query, train/evaluate messages, retries);
* :mod:`~fedmeta.flower.server_app`, :mod:`~fedmeta.flower.client_app`: the ``ServerApp`` and
  ``ClientApp`` builders (``server/app.py`` and ``client/app.py`` are the shims ``flwr run``
  loads);
* :mod:`~fedmeta.flower.simulation`: a config through Flower's simulation engine (``fedmeta simulate``);
* :mod:`~fedmeta.flower.deploy`: SuperLink/SuperNode processes and certificates (``fedmeta deploy-local``).

Importing this package imports none of them (and no ``flwr``): import the submodule you need,
after :func:`~fedmeta.flower.env.configure_environment` if it loads Flower.
"""

from __future__ import annotations

__all__: list[str] = []
