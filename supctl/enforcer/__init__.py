"""The edge enforcer: dials out to the tower and opens streams inside service instances."""
