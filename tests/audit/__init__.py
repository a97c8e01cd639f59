"""The audit trail (broker.audit): chains, group commit, sinks."""
