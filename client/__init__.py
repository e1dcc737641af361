"""The Flower ClientApp of fedmeta (see :mod:`client.app`)."""
