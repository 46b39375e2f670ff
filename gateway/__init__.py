"""In-vehicle data gateway: CAN + camera in, only policy-permitted summaries out."""

__version__ = "0.1.0"
