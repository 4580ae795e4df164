"""Earlier commits of this repository, read from its git history (upgrade and history tests).

The suite runs from a git checkout with its history (CI clones fully): a shallow or missing
history is an error that says so, never a skip.
"""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def git(*args: str) -> str:
    """Run git in the repository; fail with its message if it cannot."""
    result = subprocess.run(
        ["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise AssertionError(
            f"git {' '.join(args)} failed ({result.stderr.strip()}); these tests need the "
            "repository's history: run them from a full clone (not --depth)"
        )
    return result.stdout


def git_bytes(*args: str) -> bytes:
    result = subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, check=False)
    if result.returncode != 0:
        raise AssertionError(f"git {' '.join(args)} failed: {result.stderr.decode().strip()}")
    return result.stdout


@dataclass
class Release:
    """The tree of one commit, extracted with `git archive`, and its own migrate."""

    commit: str
    root: Path

    @classmethod
    def extract(cls, commit: str, into: Path) -> Release:
        data = git_bytes("archive", "--format=tar", commit)
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            # Extraction filters came in Python 3.11.4 (3.11.2 is Debian 12's); the archive is
            # this repository's own commit, so without them it is extracted as it is.
            if hasattr(tarfile, "data_filter"):
                tar.extractall(into, filter="data")
            else:
                tar.extractall(into)
        return cls(commit, into)

    def migrate(self, database_url: str) -> None:
        """That release's `bulk_sync.migrate.migrate(url)`, run with that release's code."""
        code = (
            "import sys; sys.path.insert(0, sys.argv[1]);"
            " import bulk_sync.migrate as m; assert m.__file__.startswith(sys.argv[1]), m.__file__;"
            " m.migrate(sys.argv[2])"
        )
        result = subprocess.run(
            [sys.executable, "-I", "-c", code, str(self.root / "runner"), database_url],
            capture_output=True,
            text=True,
            cwd=self.root,
            check=False,
            timeout=300,
        )
        assert result.returncode == 0, f"{self.commit}'s migrate failed:\n{result.stderr}"
