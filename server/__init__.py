"""The Flower ServerApp of fedmeta (:mod:`server.app`) and its strategy (:mod:`server.meta_strategy`)."""
