"""FLStore on AWS: the Pulumi components that ``infra/__main__.py`` composes.

``settings`` reads and checks the stack config, ``iam`` builds and checks every policy
document, ``storage``, ``container_image``, ``functions``, ``api`` and ``keepwarm`` are the
components, ``stack.create_stack`` wires them together, and ``packaging`` builds the Lambda
artifacts it deploys on every run (from the git-tracked ``sources``, with the cached
``wheels``, for the runtime in ``target``). Nothing here imports the runtime code
(``flstore_core``, ``lambdas``); the contract with it is names and environment variables.
"""
