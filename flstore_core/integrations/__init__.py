"""Framework integrations: FLStore inside the FL frameworks users already run.

- :mod:`flstore_core.integrations.flower` — ``with_flstore(strategy, sink=..., job=...)`` wraps
  any Flower Message-API strategy so that every round's client updates and aggregate land in
  FLStore, plus an in-process runtime for Flower apps that needs no Ray.
- :mod:`evaluation.flower_digits` — the demo job as a Flower ``ServerApp`` and
  ``ClientApp`` (digits, non-IID, one label-flipping client) and ``run_flower_job``.

Nothing is imported here, so that ``import flstore_core.integrations`` never needs flwr; the
modules import it themselves, and only when a Flower object is actually built.
"""
