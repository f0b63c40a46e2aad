"""The operator CLI's errors and its exit codes, one set for every ``edgefleet`` command.

::

    EdgefleetError
    ├── SettingError, ModelError, InputError, KeyFileError,  bad input          exit 2
    │   PkiError (certificates, the fleet directory, names)
    ├── Refused                   checked, and it would not work: nothing done     exit 3
    └── EnvironmentProblem                                                         exit 1
        └── FleetError            the broker or a device did not do its part
            ├── BrokerError       unreachable, refused, dropped, or too slow
            ├── NoReply           a command went unanswered in its timeout
            ├── NotPublished      no model with that sha256 is on the broker
            └── ContractBroken    a device's reply or a retained message does not parse

Exit codes: 0 done; 1 the environment, the broker or a device failed (a device that says
no to a command, too); 2 bad input, the same for every command (an option, a missing
file, a file that is not a model, key or manifest; argparse's usage errors are 2 as
well); 3 refused: what was asked was checked against what the broker holds (or a
signature) and would not work, so nothing was changed (``deploy --force`` sets it anyway).
"""

from __future__ import annotations

from edgefleet.provisioning import KeyFileError, PkiError
from edgefleet.runtime import EdgefleetError, EnvironmentProblem
from edgefleet.runtime.cli import EXIT_BAD_INPUT
from edgefleet.runtime.cli import exit_code as runtime_exit_code

EXIT_REFUSED = 3
"""Checked and refused: the request would not work (a deploy the device would ignore)."""


class FleetError(EnvironmentProblem):
    """The broker or a device did not do its part."""


class BrokerError(FleetError):
    """The broker cannot be reached, refused a request, dropped us, or did not answer in time."""


class NoReply(FleetError):
    """A command went unanswered within its timeout."""


class NotPublished(FleetError):
    """No model with the sha256 asked for is published on the broker."""


class ContractBroken(FleetError):
    """What a device sent, or the broker holds for it, does not parse as the wire contract says."""


class Refused(EdgefleetError):
    """What was asked would not work (the device would ignore it, a signature does not
    verify); nothing was changed."""


def exit_code(exc: EdgefleetError) -> int:
    """The exit code of an ``edgefleet`` command that failed with ``exc``."""
    if isinstance(exc, Refused):
        return EXIT_REFUSED
    if isinstance(exc, KeyFileError | PkiError):
        return EXIT_BAD_INPUT
    return runtime_exit_code(exc)
