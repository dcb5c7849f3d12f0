"""Errors that the CLI prints as one line, without a traceback."""


class FactoryError(Exception):
    """A problem the user can fix; the message says what and how."""


class ProfileError(FactoryError):
    """The profile is invalid."""


class ToolError(FactoryError):
    """An external tool (packer, qemu, mmdebstrap) failed or is missing."""
