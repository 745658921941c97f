"""FLStore: serverless storage and compute for the non-training workloads of federated learning.

The package is layered (see ARCHITECTURE.md §1): ids and errors, the tensor codec, the S3
layout and object store, the cache and its policies, placement, the workload catalogue, the
cost model and the client SDK. Only the command line and the framework integrations compose
the layers with the local runtime and the pipelines.
"""

__version__ = "0.1.0"
