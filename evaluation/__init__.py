"""What FLStore is measured and shown with, not the library (ARCHITECTURE §1).

``baselines`` (the two aggregator baselines, ``objstore-agg`` over S3 and ``cache-agg`` over a
real Redis), ``digits_job`` (a simulated FL job on the digits, for the model-workload tests and
benchmarks), ``flower_run`` (a Flower app run with ``flwr run`` on a SuperLink of our own) and
``demo`` (the runner behind ``flstore demo``, which runs ``examples/flower-app``). It imports
``flstore_core``, ``lambdas`` and ``pipelines``; nothing in ``flstore_core`` imports it.
"""
