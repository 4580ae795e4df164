"""``python -m bulk_sync`` is the same as the ``bulk-sync`` console script."""

from bulk_sync.cli import main

main(prog_name="bulk-sync")
