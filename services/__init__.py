"""Switchboard services: the shared runtime, each service, and the launcher."""
