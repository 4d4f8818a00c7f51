"""The supctl client: settings, the object tree and the interfaces of its backends."""
