"""Framework integrations: FLStore inside the FL frameworks users already run.

- :mod:`flstore_core.integrations.flower` — ``with_flstore(strategy, sink=..., job=...)`` wraps
  any Flower Message-API strategy so that every round's client updates and aggregate land in
  FLStore; ``flstore_sink(run_config)`` finds the store from a Flower app's run config and
  environment. Apps that use it run with ``flwr run``, as ``examples/flower-app`` does.

Nothing is imported here, so that ``import flstore_core.integrations`` never needs flwr; the
modules import it themselves, and only when a Flower object is actually built.
"""
