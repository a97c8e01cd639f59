"""SQL state (broker.db): schema version control."""
