"""Dataplane worker: ESP/AH (RFC 4303, RFC 4302) via a TUN device and raw/UDP sockets around the
sans-IO core, managed over the ipsec.v1.Dataplane gRPC API (mTLS); run python -m services.dataplane.
"""
