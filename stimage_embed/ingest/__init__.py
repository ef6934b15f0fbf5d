"""Ingest: dataset catalogs and readers that turn files on disk into :class:`SlideData`."""
