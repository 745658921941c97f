"""FLStore's Pulumi program (``Pulumi.yaml`` at the repo root runs it): ``pulumi up``.

Build the Lambda artifacts first (``python -m infra.build``); see README "Deploy to AWS".
"""

import sys
from pathlib import Path

# Pulumi runs this file as a script from infra/; make the components importable however
# it was started.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from flstore_infra.stack import create_stack

create_stack()
