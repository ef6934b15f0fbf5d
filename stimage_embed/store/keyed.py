"""The keys a local store's tables hold, as :meth:`Store.write_keyed` needs them: read once
per table and kept up to date with the store's own appends, so a keyed write under the lock
costs the rows it writes, not a join with the whole table at each commit.

A kept set is used only while its table is at the version and row count the last keyed
write left it at; any other commit (a delete, another writer, a drop) makes it read again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from stimage_embed.store.store import Store


class StoredKeys:
    """Per (table, key columns): the key tuples stored, and the table state they describe."""

    def __init__(self, store: Store):
        self.store = store
        self.kept: dict[tuple[str, tuple[str, ...]], tuple[tuple[int, int], set[tuple]]] = {}

    def state(self, table: str) -> tuple[int, int]:
        """(Lance version, rows) of ``table``; (0, 0) before its first commit."""
        if not self.store.committed(table):
            return 0, 0
        tbl = self.store.db.open_table(table)
        return tbl.version, tbl.count_rows()

    def get(self, table: str, keys: tuple[str, ...]) -> tuple[tuple[int, int], set[tuple]]:
        """(state, the ``keys`` tuples ``table`` holds now); call under the store's lock."""
        state = self.state(table)
        kept = self.kept.get((table, keys))
        if kept is not None and kept[0] == state:
            return kept
        if state == (0, 0):
            return state, set()
        t = self.store.read(table, list(keys))
        return state, set(zip(*(t[k].to_pylist() for k in keys)))

    def added(self, table: str, keys: tuple[str, ...], before: tuple[int, int], stored: set, new: list) -> None:
        """Record that the store's last commit appended the ``new`` key tuples to ``table``,
        which held ``stored`` at state ``before`` (still under the lock). The state after is
        taken as one more version and ``len(new)`` more rows: if that commit took more
        versions (a schema change), the next :meth:`get` finds another state and reads."""
        stored.update(new)
        after = self.state(table) if before == (0, 0) else (before[0] + 1, before[1] + len(new))
        self.kept[(table, keys)] = (after, stored)

    def forget(self, table: str) -> None:
        """Drop what is kept of ``table`` (it was dropped)."""
        self.kept = {k: v for k, v in self.kept.items() if k[0] != table}
