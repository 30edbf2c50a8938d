"""IPsec suite: policyd, keymgr and dataplane services around one sans-IO core (services.core)."""
