"""Stable import path of the HTTP client: ``from flstore_core.client import FLStoreClient``.

The client lives in :mod:`flstore_core.sdk.client`; this name is part of the contract
(ARCHITECTURE §1) and is kept whatever moves.
"""

from flstore_core.sdk.client import FLStoreClient

__all__ = ["FLStoreClient"]
