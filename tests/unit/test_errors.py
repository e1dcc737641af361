"""The error hierarchy: each kind has its own CLI exit status, declared once in its class line."""

from __future__ import annotations

import pytest

from fedmeta import errors
from fedmeta.errors import DataFormatError, FedMetaError
from fedmeta.tasks.folder import TooFewClassesError


def test_every_kind_has_its_own_exit_status() -> None:
    kinds = [getattr(errors, name) for name in errors.__all__]
    codes = [kind.exit_code for kind in kinds]
    assert codes == list(range(1, len(kinds) + 1))


def test_a_subclass_without_a_status_keeps_its_parents() -> None:
    assert TooFewClassesError.exit_code == DataFormatError.exit_code == 3


def test_a_status_another_kind_has_is_refused() -> None:
    with pytest.raises(TypeError, match="exit status 2 of Clash is already ConfigError's"):

        class Clash(FedMetaError, exit_code=2):
            """Not a kind of its own."""
