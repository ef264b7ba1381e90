"""Readers: one per source format, each turning a file into raw string records.

Readers never compute statistics and never write to the store. They yield
:class:`~pipeline.ingest.formats.RawChunk` objects: string columns exactly as given,
the line (or entry) of each record, and the records that could not even be read.
"""
