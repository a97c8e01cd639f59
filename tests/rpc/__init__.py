"""What every server shares (broker.rpc): authorization, limits, mutual TLS, health."""
