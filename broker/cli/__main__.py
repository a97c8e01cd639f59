"""`python -m broker.cli`: the `keybroker` command."""

import sys

from broker.cli.main import main

sys.exit(main())
