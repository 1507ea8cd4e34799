"""ctsync: connection-tracking state sync for Linux firewall clusters."""

__version__ = "0.1.0"
