"""What ``flwr run`` loads as fedmeta's ClientApp (:mod:`client.app`); the code: :mod:`fedmeta.flower.client_app`."""
