"""Auxiliary-network builders: they read only a backbone's layer metadata (channels, spatial size)."""
