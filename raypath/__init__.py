"""raypath: robust pathology foundation-model features on Ray."""
__version__ = "0.1.0"
