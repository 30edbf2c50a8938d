"""Sans-IO IPsec core shared by every service (no sockets, asyncio, grpc, SQL, netlink or clock).

Time enters as ``now`` (float seconds, any monotonic origin); randomness through injectable
sources. The import boundary is enforced by tests/unit/test_core_boundary.py.
"""
