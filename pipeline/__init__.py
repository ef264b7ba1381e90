"""OnTrack: analytics for measurement-based psychotherapy.

Data flows one way: ingest -> validate/quarantine -> score -> store -> statistics ->
flags -> {dashboard, export}. Nothing happens at import time.
"""

__version__ = "0.1.0"
