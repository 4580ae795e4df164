"""Applied migrations are append-only: a file of migrations/ that an earlier commit holds must
keep the content it was first committed with, because databases have already run it.

The one recorded exception: commit 07a12e9 edited 0001.core-schema.sql after release b1910e4
had installed it (leaderboard_key). 0005.leaderboard-key brings those databases to the same
schema; the file as of 07a12e9 is the baseline from then on. No other exception may be added.
"""

from __future__ import annotations

from pathlib import Path

from release_tree import REPO_ROOT, git, git_bytes

MIGRATIONS = "migrations"
# path -> (commit whose version is the baseline, why)
BASELINE_EXCEPTIONS = {
    "migrations/0001.core-schema.sql": (
        "07a12e9",
        "edited in place after b1910e4 shipped it; 0005.leaderboard-key repairs such databases",
    ),
}


def _committed_migration_files() -> list[str]:
    """Every path under migrations/ that any commit of the current history added."""
    out = git("log", "--format=", "--name-only", "--diff-filter=A", "HEAD", "--", MIGRATIONS)
    return sorted({line for line in out.splitlines() if line.strip()})


def _first_commit(path: str) -> str:
    out = git("log", "--format=%H", "--diff-filter=A", "--follow", "HEAD", "--", path)
    return out.split()[-1]


def test_history_is_available() -> None:
    """The check below means something only with the history: b1910e4 must be reachable."""
    assert git("cat-file", "-t", "b1910e4").strip() == "commit"
    assert "migrations/0001.core-schema.sql" in _committed_migration_files()


def test_committed_migrations_are_unchanged() -> None:
    changed = []
    for path in _committed_migration_files():
        baseline = BASELINE_EXCEPTIONS.get(path, (_first_commit(path), ""))[0]
        committed = git_bytes("show", f"{baseline}:{path}")
        current = REPO_ROOT / path
        if not current.is_file():
            changed.append(f"{path} (deleted)")
        elif current.read_bytes() != committed:
            changed.append(f"{path} (differs from {baseline[:7]})")
    assert changed == [], (
        "applied migrations are append-only; add a new migration instead of editing: "
        + ", ".join(changed)
    )


def test_the_recorded_exception_is_real() -> None:
    """0001 really did change at 07a12e9 and not since: the exception is exactly that edit."""
    path = "migrations/0001.core-schema.sql"
    first = git_bytes("show", f"{_first_commit(path)}:{path}")
    baseline = git_bytes("show", f"07a12e9:{path}")
    assert first != baseline
    assert b"leaderboard_key" in baseline
    assert b"leaderboard_key" not in first
    later = git("log", "--format=%h", "07a12e9..HEAD", "--", path).split()
    assert later == [], f"{path} changed after 07a12e9 in {later}"


def test_every_migration_file_is_named_and_headed() -> None:
    """NNNN.slug.sql (or .rollback.sql), with the two-line header and a depends line."""
    for path in sorted(Path(REPO_ROOT, MIGRATIONS).glob("*.sql")):
        parts = path.name.split(".")
        assert parts[0].isdigit(), path.name
        assert len(parts[0]) == 4, path.name
        lines = path.read_text(encoding="utf-8").splitlines()
        assert lines[0].startswith(f"-- {parts[0]}."), path.name
        if not path.name.endswith(".rollback.sql"):
            assert any(line.startswith("-- depends:") for line in lines[:5]), path.name
