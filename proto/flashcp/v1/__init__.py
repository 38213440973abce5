"""Version 1 of the FlashCP wire contract (generated ``planner_pb2*`` modules)."""

__all__ = ["planner_pb2", "planner_pb2_grpc"]
