"""FlashCP wire contract: the ``flashcp.v1`` protobuf messages and gRPC stubs.

``flashcp.v1.planner_pb2`` / ``planner_pb2_grpc`` are generated from
``proto/flashcp/v1/planner.proto`` (committed; ``scripts/gen_proto.py``
regenerates them) and :mod:`flashcp.codec` converts messages to and from
``flashcp_planner`` objects. Importing this package pulls in nothing heavy;
the submodules need ``protobuf`` (and ``grpcio`` for the stubs).
"""

__all__ = ["PROTO_PACKAGE", "SERVICE_NAME"]

PROTO_PACKAGE = "flashcp.v1"
"""Protobuf package of the current contract."""
SERVICE_NAME = "flashcp.v1.Planner"
"""Fully qualified gRPC service name (health checks, reflection)."""
