"""State changes (broker.lifecycle): resources, key versions, customer-managed keys."""
