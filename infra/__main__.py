"""FLStore's Pulumi program (``Pulumi.yaml`` at the repo root runs it): ``pulumi up``.

It builds the router zip and the cache-node image context from the working tree itself;
see README "Deploy to AWS".
"""

import sys
from pathlib import Path

# Pulumi runs this file as a script from infra/; make the components importable however
# it was started.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from flstore_infra.stack import create_stack

create_stack()
