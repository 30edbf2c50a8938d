"""services.dataplane."""
