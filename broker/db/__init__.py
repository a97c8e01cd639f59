"""SQL state: typed models, engine set-up for SQLite and PostgreSQL, and the schema check."""
