"""``ipsecctl``: the administrator's command-line client for policyd's REST API and keymgr's
operator gRPC API (see docs/ipsecctl.md and /v1 in docs/policyd.md, docs/keymgr.md)."""
