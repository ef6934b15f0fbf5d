"""Exception types. Every user-facing error names the file and the field at fault."""

from __future__ import annotations

from pathlib import Path


class StimageError(Exception):
    """Base class for all stimage-embed errors (caught by the CLI and printed cleanly)."""


class InputError(StimageError, ValueError):
    """Bad user input: a file or a field in it is missing, malformed or inconsistent.

    The message always starts with ``<file>: <field>: `` so the user knows where to look.
    """

    def __init__(self, file: str | Path | None, field: str | None, message: str):
        self.file = str(file) if file is not None else None
        self.field = field
        self.reason = message
        where = ": ".join(x for x in (self.file, field) if x)
        super().__init__(f"{where}: {message}" if where else message)


class CatalogError(InputError):
    """A dataset or backbone catalog is unknown or malformed."""


class StoreError(StimageError):
    """The store refused an operation (e.g. provenance mismatch on append)."""


class ProvenanceError(StoreError):
    """Vectors or a model were produced under a different provenance than expected."""


class WeightsUnavailableError(StimageError):
    """Backbone weights cannot be found locally and cannot be fetched (gated / offline)."""
