"""Where the SQL and the examples are: inside the wheel, else in the repository checkout.

A wheel carries copies under ``bulk_sync/_sql`` and ``bulk_sync/_examples``; an editable
install (or a plain checkout on ``PYTHONPATH``) reads the repository's own directories.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
_REPO = Path(__file__).resolve().parents[2]


def _first_dir(*candidates: Path) -> Path:
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    return candidates[-1]


def migrations_dir() -> Path:
    """The yoyo migrations directory (versioned, append-only)."""
    return _first_dir(_PACKAGE / "_sql" / "migrations", _REPO / "migrations")


def definitions_dir() -> Path:
    """The ``db/`` directory of repeatable definitions, applied after every migrate."""
    return _first_dir(_PACKAGE / "_sql" / "db", _REPO / "db")


def examples_dir() -> Path:
    """The ``examples/`` directory (the demo's seed data)."""
    return _first_dir(_PACKAGE / "_examples", _REPO / "examples")


def seed_actions_file() -> Path:
    """The seed's three example actions, as ``{"actions": [...]}``."""
    return examples_dir() / "seed_actions.json"
