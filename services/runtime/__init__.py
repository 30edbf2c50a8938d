"""Runtime helpers shared by the services: structured logging, mTLS credentials, dev PKI."""
