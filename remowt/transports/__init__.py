"""Transports: the only layer that touches bytes on an OS object."""
