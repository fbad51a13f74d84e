"""HostKind: the interface of a kind of host the lab runs on its iSCSI target
(registered in hosts.py)."""


class HostKind:
    name = ""            # short name, e.g. "vm"
    state_key = ""       # its list of records in state.json and status --json

    def add_up_arguments(self, parser):
        """Options of `lab up` for this kind."""

    def add_parsers(self, sub):
        """Subcommands of its own (e.g. `lab kernel-host ...`)."""

    def validate(self, args):
        """Check this kind's `lab up` options (before the state is read)."""

    def check_against(self, st, args):
        """Refuse a `lab up` that does not fit the lab already recorded."""

    def provision(self, st, args):
        """Before the hosts start: images, LUN backing files, targets. Records
        each LUN in the state (lun_file, loop, loop_majmin, tid, iqn)."""

    def start(self, st, args):
        """Start the hosts and wait until their I/O flows."""

    def summary(self, st):
        """For `lab is up: ...`."""
        return ""

    def luns(self, st):
        """The LUN records this kind made (for throttles and `lab down`)."""
        return []

    def remove(self, st, errors):
        """`lab down`: everything this kind made, also when st is None."""

    def status(self, st, interval):
        """(records for status --json under state_key, all of them up)."""
        return [], True
