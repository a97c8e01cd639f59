"""The key plane: the KeyBroker service, its key hierarchy and root-key providers, and the
`keybroker` command that composes it with the workers.

Layers are folders, and the arrows point down (checked by import-linter, pyproject.toml):
cli (the composition root) -> service (KeyBroker and its server) -> lifecycle -> audit ->
keys | rpc -> providers -> db -> core -> api. The wrapped formats are documented where they are
written: `broker.keys.master_key`, `broker.keys.key_wrapping`, `broker.keys.data_key_format`.
"""
