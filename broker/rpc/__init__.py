"""The gRPC layer every keybroker server shares (the broker's and the workers'): server
construction with health and reflection (grpc_server), the interceptors that turn errors into
statuses (interceptors), bound run times (deadlines) and authorize callers (authz, with its
policy), per-caller stream limits (stream_limits), mutual TLS (tls), and the fields every API
converts alike (fields). Nothing here knows about keys.
"""

from broker.rpc.grpc_server import add_health_and_reflection, new_grpc_server

__all__ = ["add_health_and_reflection", "new_grpc_server"]
