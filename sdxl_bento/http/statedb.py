"""The SQLite files of the state folder (task journal, events, webhook deliveries, idempotency keys).

Every worker of a server opens the same files: WAL, so that readers never block the writer; autocommit, each
statement its own transaction; a 30 s wait when another worker holds the write lock.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path


def open_shared(path: Path, *pragmas: str) -> sqlite3.Connection:
    """``path`` opened for all threads of this process; ``pragmas`` (``"synchronous=NORMAL"``) run before WAL is
    set, so that one which only a new file takes (``auto_vacuum``) still applies."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(str(path), check_same_thread=False, timeout=30, isolation_level=None)
    for pragma in pragmas:
        db.execute(f"PRAGMA {pragma}")
    db.execute("PRAGMA journal_mode=WAL")
    return db
