"""IKEv2 (RFC 7296) sans-IO building blocks."""
