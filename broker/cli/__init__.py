"""The composition root: the `keybroker` command, which wires the broker, the workers and `up`.

It is the one package that imports both the key plane (broker.service) and the data plane
(workers); nothing below it imports the workers (import-linter checks this, pyproject.toml).
Modules: `main` (argument parsing and dispatch), `up` (the broker with the workers attached, in one
process), `dev_certs` (`keybroker certs init`).
"""

from broker.cli.main import main

__all__ = ["main"]
