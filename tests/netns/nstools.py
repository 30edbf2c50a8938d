"""Small helpers for netns tests that drive plain namespaces by name (no Lab object).

``tcp_sha256`` (services.dataplane.lab.ns_tcp_sha256) sends random bytes over TCP between two
addresses inside test namespaces; both ends hash what they saw, so a caller can assert the
stream crossed the tunnel intact.
"""

from __future__ import annotations

from services.dataplane.lab import ns_tcp_sha256 as tcp_sha256

__all__ = ["tcp_sha256"]
