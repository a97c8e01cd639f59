"""The key plane: the KeyBroker service, its key hierarchy and root-key providers.

Public surface: `broker.server` (build_broker, serve), `broker.cli.main` (the `keybroker`
command), `broker.settings.Settings`, the generated API in `broker.api`, the error hierarchy in
`broker.errors`, and the provider contract in `broker.providers`. The wrapped formats are
documented where they are written: `broker.master_key`, `broker.sealing`, `broker.data_keys`.
"""
