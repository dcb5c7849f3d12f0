"""Errors that the CLI prints as one line, without a traceback, and the exit code each
gives (docs/exit-codes.md): a scheduler reads the code to retry or to fail."""

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    FAILED = 1  # anything not sorted below (a bug says so on its one line)
    BAD_INPUT = 2  # a bad profile or command line: fix it, a retry cannot help
    CONFLICT = 3  # the environments do not resolve: change the packages
    BUILD_FAILED = 4  # a step of the build failed (packer, an installer, the export)
    VALIDATION_FAILED = 5  # the delivery was checked and a promise failed
    INFRASTRUCTURE = 6  # this host lacks something (KVM, disk, memory, a tool): retry elsewhere
    INTERRUPTED = 130  # Ctrl-C or SIGTERM; nothing was published


class FactoryError(Exception):
    """A problem the user can fix; the message says what and how."""

    exit_code = ExitCode.FAILED


class ProfileError(FactoryError):
    """The profile is invalid."""

    exit_code = ExitCode.BAD_INPUT


class OptionError(FactoryError):
    """An option's value on the command line is not one factory knows."""

    exit_code = ExitCode.BAD_INPUT


class ConflictError(FactoryError):
    """The environments do not resolve, or what they resolve to cannot run on the target (its
    CUDA, its CPU level). The message is one line; `details` is the whole story."""

    exit_code = ExitCode.CONFLICT

    def __init__(self, message: str, details: str = "") -> None:
        super().__init__(message)
        self.details = details  # printed after the error line when there is more to say


class ToolError(FactoryError):
    """An external tool (packer, qemu, mmdebstrap) failed or is missing."""

    exit_code = ExitCode.BUILD_FAILED


class InfrastructureError(ToolError):
    """This host cannot run the step: no KVM where it is required, too little disk or memory,
    a tool missing. Another host may."""

    exit_code = ExitCode.INFRASTRUCTURE


class ValidationFailed(FactoryError):
    """The delivery, or the live host, was checked and at least one check failed."""

    exit_code = ExitCode.VALIDATION_FAILED
