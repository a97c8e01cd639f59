"""The generated keybroker.v1 stubs (scripts/gen-protos writes every other file here)."""
