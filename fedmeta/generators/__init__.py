"""Higher-level constraint generators (SPEC §5, seed 000): what the federation's level-1 learner is told
beyond the clients' tasks. Built so far: soft constraints (:mod:`fedmeta.generators.constraints`),
which enter every client's outer objective as an objective term. No Flower import here."""

from __future__ import annotations

from fedmeta.generators.constraints import CONSTRAINTS, ConstraintTerm, build_constraints, check_constraints

__all__ = ["CONSTRAINTS", "ConstraintTerm", "build_constraints", "check_constraints"]
