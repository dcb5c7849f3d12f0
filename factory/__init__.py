"""factory: a client profile in, a delivered and validated AI virtual machine out."""

__version__ = "0.1.0"
