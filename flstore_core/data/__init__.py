"""The data layer: what an update is and how it is laid out (ARCHITECTURE §2).

``codec`` (an update ⇄ safetensors ⇄ zstd), ``rawfile`` (the raw update files ingestion reads),
``layout`` (canonical S3 keys), ``manifest`` (job spec and round manifest) and ``rows`` (an
update as one flattened row: flatten, unflatten, column slices and the base-model rule). Pure
functions and dataclasses; no I/O but reading a local file.
"""
