"""services.runtime."""
