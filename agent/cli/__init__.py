"""The `kvmscope` command line (typer).

One module per command; data goes to stdout, messages to stderr; every read
command has ``--json``; errors are :class:`agent.errors.KvmscopeError`,
rendered once by :func:`main` with a non-zero exit code (1 = could not run,
2 = bad usage or configuration).
"""

from __future__ import annotations

import sys

import typer

from agent.errors import KvmscopeError

def examples(*lines: str) -> str:
    """An epilog of example command lines, kept verbatim by click (the \\b marker)."""
    return "Examples:\n\n\b\n" + "\n".join("  " + line for line in lines)


EPILOG = examples(
    "kvmscope run                         # agent in the foreground, /metrics on 127.0.0.1:9847",
    "kvmscope top                         # slowest VM disks now, with their paths (q quits)",
    "kvmscope diagnose --window 2m        # which VMs hurt, where and why (exit 3 = problems)",
    "kvmscope paths                       # VM disk -> LUN/session -> TCP connection -> portal",
    "kvmscope -c /etc/kvmscope/config.yaml run",
    "kvmscope config check ./config.yaml  # validate a file before deploying it",
    "kvmscope config show --json          # effective configuration, secrets masked",
    "kvmscope version                     # kvmscope, bcc, kernel, libvirt and QEMU versions",
)

app = typer.Typer(
    name="kvmscope",
    help="Why is this VM's iSCSI disk slow? iSCSI sessions, TCP retransmits and per-VM disk latency "
    "on a KVM host, joined into storage paths.",
    epilog=EPILOG,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def _root(
    ctx: typer.Context,
    config: str = typer.Option(
        None,
        "--config",
        "-c",
        metavar="PATH",
        help="YAML configuration file [default: $KVMSCOPE_CONFIG, else /etc/kvmscope/config.yaml if present, "
        "else built-in defaults]",
    ),
    standalone: bool = typer.Option(
        False,
        "--standalone",
        help="never attach to a running `kvmscope run`; collect in this process",
    ),
):
    ctx.obj = {"config": config, "standalone": standalone}


def register_commands(only: list[str] | None = None) -> None:
    """Import the command modules of this package (each adds its command to `app`): all of them, or the
    modules named in ``only``. Idempotent. `app` has no command until this ran (:func:`main` does it)."""
    import importlib
    import pkgutil

    # the order of `kvmscope --help`: the daily commands first, then the rest alphabetically
    first = ["run", "top", "diagnose", "retrans", "inventory", "doctor", "probes", "record"]
    names = [m.name for m in pkgutil.iter_modules(__path__) if m.name != "common" and not m.name.startswith("_")]
    if only is not None:
        names = [n for n in names if n in only]
    for name in sorted(names, key=lambda n: (first.index(n) if n in first else len(first), n)):
        importlib.import_module(f"{__name__}.{name}")


# commands whose module has their name and no other command: `kvmscope <name>` imports only that module.
# The long-lived agent (`run`) so never imports the other commands' modules (and what only they use).
_OWN_MODULE = {"run"}


def command_of(argv: list[str]) -> str | None:
    """The command word of a `kvmscope` command line (after the root options), or None."""
    it = iter(argv)
    for a in it:
        if a == "--":
            return next(it, None)
        if a in ("-c", "--config"):
            next(it, None)
        elif not a.startswith("-"):
            return a
    return None


def main(argv: list[str] | None = None) -> None:
    cmd = command_of(sys.argv[1:] if argv is None else argv)
    register_commands([cmd] if cmd in _OWN_MODULE else None)
    try:
        app(args=argv, prog_name="kvmscope", standalone_mode=True)
    except KvmscopeError as e:
        print(f"kvmscope: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
