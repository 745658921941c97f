"""Local stand-ins for AWS services, so the whole of FLStore runs on one machine.

:mod:`lambdas.local_runtime.lambda_endpoint` serves the Lambda Invoke API over per-instance
worker processes (:mod:`lambdas.local_runtime.worker`), keeping Lambda's execution model:
warm state, cold starts, idle reclaim, concurrency, timeout and memory limits. It composes
:mod:`~lambdas.local_runtime.instance_pool` (the worker processes of each function),
:mod:`~lambdas.local_runtime.invocation_outcome` (what an invocation produced, in Lambda's
words) and :mod:`~lambdas.local_runtime.invoke_api` (the HTTP server), whose error responses
are in :mod:`~lambdas.local_runtime.invoke_errors`.

Nothing is imported here on purpose: every Lambda worker process imports this package, and a
cold start should not pay for the endpoint's HTTP server and psutil.
"""
