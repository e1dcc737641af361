"""What ``flwr run`` loads as fedmeta's ServerApp (:mod:`server.app`); the code: :mod:`fedmeta.flower.server_app`."""
