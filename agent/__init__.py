"""dmagent: a device-side enrollment agent that behaves like the Windows MDM client."""

__version__ = "0.1.0"
