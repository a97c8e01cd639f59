"""Root-key providers (broker.providers) against a real token and the Azure SDK."""
