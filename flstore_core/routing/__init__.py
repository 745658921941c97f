"""Routing (ARCHITECTURE §3–4): placement of shards on nodes, authentication, the router behind
the HTTP API, and how it invokes nodes and fails over between them."""
