"""services.keymgr."""
