"""`kvmscope config check|show`."""

from __future__ import annotations

import typer
import yaml

from agent import config as config_mod
from agent.cli import app, examples
from agent.cli.common import check_config, load_config, msg, print_json
from agent.sources import selected

config_app = typer.Typer(
    help="Validate and show the configuration.",
    no_args_is_help=True,
    epilog=examples("kvmscope config check /etc/kvmscope/config.yaml", "KVMSCOPE_AGENT__INTERVAL=2 kvmscope config show"),
)
app.add_typer(config_app, name="config")


@config_app.command("check", epilog=examples("kvmscope config check ./config.yaml && echo ok"))
def check(path: str = typer.Argument(..., metavar="PATH", help="YAML file to validate")):
    """Validate a configuration file (with environment overrides applied). Exit 0 if valid, 2 if not."""
    cfg, origin = check_config(None, path)
    names = [s.name for s in selected(cfg)]
    msg(f"{path}: valid ({origin}); collectors: {', '.join(names) or 'none'}")


@config_app.command("show", epilog=examples("kvmscope config show", "kvmscope -c ./config.yaml config show --json"))
def show(ctx: typer.Context, json_out: bool = typer.Option(False, "--json", help="print JSON instead of YAML")):
    """Print the effective configuration (defaults + file + environment), secrets masked."""
    cfg, origin = load_config(ctx)
    data = config_mod.masked_dict(cfg)
    if json_out:
        print_json(data)
    else:
        print(f"# effective configuration from: {origin}")
        print(yaml.safe_dump(data, sort_keys=False, default_flow_style=False), end="")
