"""The key hierarchy (broker.keys): data keys, formats, the key cache, the master key."""
