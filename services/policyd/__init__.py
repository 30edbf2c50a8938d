"""services.policyd."""
