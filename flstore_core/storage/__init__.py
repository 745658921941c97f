"""The durable data plane: a small blob-store protocol, the object store over it and the rules
for committing a round (ARCHITECTURE §2)."""
