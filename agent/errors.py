"""Domain exceptions. Library code raises these; the CLI renders them once."""


class KvmscopeError(Exception):
    """An error meant for the user: one clear line, no traceback.

    ``exit_code`` follows the CLI convention in docs/cli.md: 1 = could not
    run, 2 = bad usage or configuration.
    """

    exit_code = 1


class ConfigError(KvmscopeError):
    """The configuration file, an environment override or a flag is invalid."""

    exit_code = 2


class NoData(Exception):
    """A source found nothing to report, for a normal reason.

    A host without iSCSI sessions, without libvirt or without eBPF is a
    normal host: the source raises NoData with the reason and the agent goes
    on. This is not a failure and never turns ``collector_success`` to 0.
    """

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason
