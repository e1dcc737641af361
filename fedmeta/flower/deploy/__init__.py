"""Flower deployments: SuperLink and SuperNode processes on one machine, and their certificates.

* :mod:`fedmeta.flower.deploy.local`: start, watch and stop Flower's executables
  (``flower-superlink``, ``flower-supernode``, ``flwr``) and run a config through a whole local
  deployment (``fedmeta deploy-local``);
* :mod:`fedmeta.flower.deploy.certs`: a test certificate authority, the SuperLink's TLS
  certificate and the sites' SuperNode keys (``fedmeta make-certs``, ``fedmeta make-node-key``).

Importing this package imports neither submodule.
"""

from __future__ import annotations

__all__: list[str] = []
