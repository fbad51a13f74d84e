"""Configuration loading and validation: exact messages for each kind of mistake."""

import subprocess
import sys

import pytest

from agent import config
from agent.errors import ConfigError


def write(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def load_err(path, environ=None) -> str:
    with pytest.raises(ConfigError) as ei:
        config.load(path, environ=environ or {})
    return str(ei.value)


def test_defaults_without_any_file():
    cfg, origin = config.load(None, environ={})
    assert cfg.metrics.listen == "127.0.0.1:9847"
    assert cfg.agent.interval == 5.0
    assert cfg.storage.ports == [3260]
    assert cfg.elasticsearch.enabled is False
    assert origin in ("built-in defaults", str(config.DEFAULT_PATH))


def test_missing_file(tmp_path):
    p = tmp_path / "nope.yaml"
    assert load_err(p) == (
        f"config file {p}: not found (pass an existing file, or leave --config out for the defaults)"
    )


def test_bad_yaml(tmp_path):
    p = write(tmp_path, "agent:\n  interval: [1\n")
    assert load_err(p) == f"config file {p}: line 3, column 1: invalid YAML: expected ',' or ']', but got '<stream end>'"


def test_top_level_not_a_mapping(tmp_path):
    p = write(tmp_path, "- a\n- b\n")
    sections = ", ".join(config.Config.model_fields)  # agent, metrics, storage, ...
    assert sections.startswith("agent, metrics, storage")
    assert load_err(p) == f"config file {p}: the top level must be a mapping of sections ({sections}), got list"


def test_unknown_key(tmp_path):
    p = write(tmp_path, "agent:\n  intervall: 3\n")
    assert load_err(p) == (
        "invalid configuration:\n"
        f"  config {p}: agent.intervall: unknown key; allowed keys here: "
        "collector_timeout, collectors, history, hostname, interval"
    )


def test_unknown_section(tmp_path):
    p = write(tmp_path, "metric:\n  listen: ':1'\n")
    allowed = ", ".join(sorted(config.Config.model_fields))
    assert "metrics" in allowed and "agent" in allowed
    assert f"metric: unknown key; allowed keys here: {allowed}" in load_err(p)


def test_wrong_type(tmp_path):
    p = write(tmp_path, "agent:\n  interval: fast\n")
    assert load_err(p) == f"invalid configuration:\n  config {p}: agent.interval: got 'fast'; expected a number"


def test_out_of_range_values(tmp_path):
    p = write(tmp_path, "agent:\n  interval: 0.1\nstorage:\n  ports: [3260, 70000]\n")
    assert load_err(p) == (
        "invalid configuration:\n"
        f"  config {p}: agent.interval: got 0.1; must be >= 0.5\n"
        f"  config {p}: storage.ports: got [3260, 70000]; port 70000 is outside 1..65535"
    )


def test_bad_listen_and_choice(tmp_path):
    p = write(tmp_path, "metrics:\n  listen: localhost\nlog:\n  level: loud\n")
    assert load_err(p) == (
        "invalid configuration:\n"
        f"  config {p}: metrics.listen: got 'localhost'; must be HOST:PORT, [IPV6]:PORT or :PORT, e.g. 127.0.0.1:9847\n"
        f"  config {p}: log.level: got 'loud'; must be one of 'debug', 'info', 'warning' or 'error'"
    )


def test_cross_field_rule(tmp_path):
    p = write(tmp_path, "agent:\n  interval: 2\n  collector_timeout: 3\n")
    assert load_err(p) == (
        f"invalid configuration:\n  config {p}: agent: got (section); "
        "collector_timeout (3) must not exceed interval (2)"
    )


def test_run_interval_follows_the_same_timeout_rule(tmp_path):
    """`run --interval` changes the interval through the configuration's rule, not a second formula."""
    from agent.cli.run import _apply_options

    cfg, _ = config.load(None, environ={})
    _apply_options(cfg, None, 2.0)
    assert (cfg.agent.interval, cfg.agent.collector_timeout) == (2.0, config.default_collector_timeout(2.0)) == (2.0, 1.6)
    cfg, _ = config.load(write(tmp_path, "agent:\n  interval: 10\n  collector_timeout: 1\n"), environ={})
    _apply_options(cfg, None, 2.0)
    assert cfg.agent.collector_timeout == 1.0  # a configured deadline that fits is kept
    cfg, _ = config.load(write(tmp_path, "agent:\n  interval: 10\n  collector_timeout: 3\n"), environ={})
    with pytest.raises(ConfigError, match=r"^--interval: got 2; collector_timeout \(3\) must not exceed interval \(2\)$"):
        _apply_options(cfg, None, 2.0)


@pytest.mark.parametrize("listen", ["127.0.0.1:9847", "[::1]:9847", ":9847", "localhost:1"])
def test_good_listen(tmp_path, listen):
    p = write(tmp_path, f"metrics:\n  listen: '{listen}'\n")
    assert config.load(p, environ={})[0].metrics.listen == listen


def test_environment_overrides_file(tmp_path):
    p = write(tmp_path, "agent:\n  interval: 10\n")
    cfg, origin = config.load(p, environ={"KVMSCOPE_AGENT__INTERVAL": "2", "KVMSCOPE_STORAGE__PORTS": "[3260, 860]"})
    assert cfg.agent.interval == 2.0
    assert cfg.storage.ports == [3260, 860]
    assert origin == f"{p} + environment"


def test_environment_error_names_the_variable():
    msg = load_err(None, environ={"KVMSCOPE_AGENT__INTERVAL": "abc"})
    assert msg == "invalid configuration:\n  environment KVMSCOPE_AGENT__INTERVAL: agent.interval: got 'abc'; expected a number"


def test_unrelated_environment_ignored():
    cfg, _ = config.load(None, environ={"KVMSCOPE_LAB_DIR": "/x", "KVMSCOPE_VENV": "/y"})
    assert cfg.agent.interval == 5.0


def test_config_env_var_names_the_file(tmp_path):
    p = write(tmp_path, "agent:\n  interval: 7\n")
    cfg, origin = config.load(None, environ={"KVMSCOPE_CONFIG": str(p)})
    assert cfg.agent.interval == 7.0 and origin == str(p)


def test_secrets_masked(tmp_path):
    p = write(tmp_path, "elasticsearch:\n  password: hunter2\n  api_key: abc123\n  username: ops\n")
    cfg, _ = config.load(p, environ={})
    shown = config.masked_dict(cfg)
    assert shown["elasticsearch"]["password"] == config.MASK
    assert shown["elasticsearch"]["api_key"] == config.MASK
    assert shown["elasticsearch"]["username"] == "ops"
    assert "hunter2" not in repr(cfg) and "abc123" not in repr(cfg)
    assert cfg.elasticsearch.password.get_secret_value() == "hunter2"


def run_cli(*args, env=None):
    import os

    e = {k: v for k, v in os.environ.items() if not k.startswith("KVMSCOPE_")}
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True, text=True, env=e, timeout=60)


def test_cli_config_check_bad_file_exit_2_no_traceback(tmp_path):
    p = write(tmp_path, "agent:\n  interval: -1\n")
    r = run_cli("config", "check", str(p))
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stderr == f"kvmscope: error: invalid configuration:\n  config {p}: agent.interval: got -1; must be >= 0.5\n"
    assert r.stdout == ""


def test_cli_config_check_good_file(tmp_path):
    p = write(tmp_path, "agent:\n  interval: 3\n")
    r = run_cli("config", "check", str(p))
    assert r.returncode == 0, r.stderr
    assert "valid" in r.stderr and "host_tcp" in r.stderr


def test_cli_config_show_masks_secrets(tmp_path):
    p = write(tmp_path, "elasticsearch:\n  password: s3cr3t\n")
    r = run_cli("-c", str(p), "config", "show", "--json")
    assert r.returncode == 0, r.stderr
    assert "s3cr3t" not in r.stdout
    import json

    assert json.loads(r.stdout)["elasticsearch"]["password"] == "********"


def test_cli_unknown_collector(tmp_path):
    p = write(tmp_path, "agent:\n  collectors:\n    disable: [host_tpc]\n")
    r = run_cli("config", "check", str(p))
    assert r.returncode == 2
    assert r.stderr.startswith("kvmscope: error: agent.collectors.disable: got 'host_tpc'; unknown collector, known: ")


def test_example_file_is_valid_and_equals_defaults():
    from tests.conftest import ROOT

    cfg, _ = config.load(ROOT / "deploy" / "config.example.yaml", environ={})
    assert config.masked_dict(cfg) == config.masked_dict(config.Config())


def test_example_file_documents_every_key():
    import yaml
    from pydantic import BaseModel

    from tests.conftest import ROOT

    raw = yaml.safe_load((ROOT / "deploy" / "config.example.yaml").read_text())

    def walk(model, data, where):
        missing = []
        for name, field in model.model_fields.items():
            if name not in data:
                missing.append(f"{where}{name}")
                continue
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                missing += walk(ann, data[name] or {}, f"{where}{name}.")
        return missing

    assert walk(config.Config, raw, "") == []


def test_config_show_masks_passwords_in_urls(tmp_path):
    p = write(tmp_path, "elasticsearch:\n  hosts: ['https://ship:pa55word@es1:9200', 'http://es2:9200']\n")
    r = run_cli("-c", str(p), "config", "show")
    assert r.returncode == 0, r.stderr
    assert "pa55word" not in r.stdout
    assert "https://ship:********@es1:9200" in r.stdout and "http://es2:9200" in r.stdout


def test_validation_errors_never_echo_secrets(tmp_path):
    p = write(tmp_path, "elasticsearch:\n  password: [123456]\n  api_key: {a: 1}\n")
    err = load_err(p)
    assert "123456" not in err
    assert "elasticsearch.password: got (a secret, not shown); expected a string" in err
    err = load_err(None, {"KVMSCOPE_ELASTICSEARCH__HOSTS": "https://u:t0psecret@h:9200"})
    assert "t0psecret" not in err and "https://u:********@h:9200" in err


@pytest.mark.parametrize("raw", ["s3cret #2", "#x", "null", "[a, b]", "  padded ", "yes", "0123"])
def test_text_overrides_are_taken_verbatim(raw):
    cfg, _ = config.load(None, environ={"KVMSCOPE_ELASTICSEARCH__PASSWORD": raw,
                                        "KVMSCOPE_ELASTICSEARCH__USERNAME": raw})
    assert cfg.elasticsearch.password.get_secret_value() == raw
    assert cfg.elasticsearch.username == raw


def test_typed_overrides_still_parsed():
    cfg, _ = config.load(None, environ={"KVMSCOPE_STORAGE__PORTS": "[3260, 3261]", "KVMSCOPE_AGENT__INTERVAL": "2",
                                        "KVMSCOPE_ELASTICSEARCH__ENABLED": "true"})
    assert cfg.storage.ports == [3260, 3261] and cfg.agent.interval == 2.0 and cfg.elasticsearch.enabled is True


def test_redact_url():
    assert config.redact_url("https://u:p@h:9200/x") == "https://u:********@h:9200/x"
    assert config.redact_url("https://u@h") == "https://u@h"
    assert config.redact_url("http://[::1]:9200") == "http://[::1]:9200"
    assert config.redact_url("https://u:p@[::1]:9200") == "https://u:********@[::1]:9200"
    assert config.redact_url("not a url u:p@x") == "not a url u:p@x"


def test_command_word_after_the_root_options():
    from agent.cli import command_of

    assert command_of(["run", "-q"]) == "run"
    assert command_of(["-c", "/etc/x.yaml", "--standalone", "run"]) == "run"
    assert command_of(["--config", "run", "top"]) == "top"  # a config file named "run"
    assert command_of(["--config=/x.yaml", "diagnose"]) == "diagnose"
    assert command_of(["--help"]) is None and command_of([]) is None


def test_kvmscope_run_imports_no_other_command():
    """`kvmscope run` (the long-lived agent) registers and imports only its own command's module; every
    other command line still has them all."""
    code = ("import sys; from agent.cli import main\n"
            "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in sys.modules if m.startswith('agent.cli.')))")
    run = subprocess.run([sys.executable, "-c", code, "run", "--help"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    mods = run.stdout.strip().splitlines()[-1]
    assert "agent.cli.run" in mods and "agent.cli.fleet" not in mods and "agent.cli.top" not in mods
    top = run_cli("--help")
    assert top.returncode == 0 and all(c in top.stdout for c in ("run", "top", "diagnose", "fleet", "config"))
