"""bulk-sync: exact, idempotent aggregation of user action logs in PostgreSQL.

The SQL in the ``bulk_sync`` schema does the work; this package is a thin runner
around it (click CLI, psycopg 3).
"""

__version__ = "0.1.0"
