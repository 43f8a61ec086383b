"""The errors the store layer raises.

Callers see only this tree: each backend translates its library's exceptions (sqlite3, the
Elasticsearch client) at its boundary, so the API can map a `StoreError` to an HTTP status
without knowing which backend is configured.
"""

from __future__ import annotations


class StoreError(Exception):
    """Anything the archive store could not do."""


class StoreUnavailable(StoreError):
    """The backend cannot be reached or used right now (closed, locked, disk full, I/O error).

    Retrying later may succeed; the indexer keeps its place in the spool and tries again.
    """


class StoreCorrupted(StoreError):
    """The backend's files or schema are damaged or from an unknown version."""


class NotFound(StoreError):
    """A named thing (record, chain, checkpoint) does not exist."""


class InvalidRequest(StoreError, ValueError):
    """A caller passed an argument the store cannot act on (bad limit, sort, chain name)."""


class AlreadyExists(InvalidRequest):
    """A thing with that name or key is stored already (a token name, say)."""


class InvalidCursor(InvalidRequest):
    """A paging cursor is malformed, forged, or belongs to a different query or sort."""


class QuerySyntaxError(InvalidRequest):
    """An officer's search text could not be parsed.

    `position` is the 0-based index of the offending character in the query text, so the UI
    can point at it.
    """

    def __init__(self, message: str, position: int) -> None:
        super().__init__(f"{message} (at character {position + 1})")
        self.message = message
        self.position = position


class ChainError(StoreError):
    """Spool links handed to `apply` do not continue the chain the store holds.

    The indexer must stop here rather than skip: a gap or a fork means entries are missing
    or two spools claim the same sequence numbers.
    """

    def __init__(self, chain: str, seq: int, problem: str) -> None:
        super().__init__(f"chain {chain!r} at seq {seq}: {problem}")
        self.chain = chain
        self.seq = seq
        self.problem = problem


class ChainGap(ChainError):
    """The batch starts after the stored head (entries in between were never applied)."""


class ChainConflict(ChainError):
    """An entry disagrees with what is stored or with its own hash (fork, edit, corruption)."""


class InvalidEntry(ChainError):
    """An entry's payload is not a spool entry the store understands."""
