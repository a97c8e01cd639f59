"""The KeyBroker gRPC service (key_broker: an adapter over the keys and lifecycle layers, with
convert for its messages) and its server (server: build_broker, serve)."""

from broker.service.server import Broker, CoServed, Running, build_broker, serve

__all__ = ["Broker", "CoServed", "Running", "build_broker", "serve"]
