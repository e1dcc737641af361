"""``python -m fedmeta.cli``: the ``fedmeta`` command."""

from __future__ import annotations

import sys

from fedmeta.cli.main import main

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
