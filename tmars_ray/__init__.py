"""tmars-ray: T-MARS data curation on Ray."""

__version__ = "0.1.0"
