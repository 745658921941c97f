"""What FLStore is measured and shown with, not the library (ARCHITECTURE §1).

``baselines`` (the two aggregator baselines, ``objstore-agg`` over S3 and ``cache-agg`` over a
real Redis), ``digits_job`` and ``flower_digits`` (the demo's FL jobs: a simulated one and a
real Flower job) and ``demo`` (the runner behind ``flstore demo``). It imports ``flstore_core``,
``lambdas`` and ``pipelines``; nothing in ``flstore_core`` imports it.
"""
