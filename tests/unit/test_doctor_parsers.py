"""Parsers of iscsid.conf and multipath.conf on literal text (agent/doctor/parsers.py)."""

from agent.doctor.parsers import int_setting, parse_iscsid_conf, parse_multipath_conf, queueing


def test_iscsid_comments_spaces_quotes_and_last_assignment_wins():
    conf = parse_iscsid_conf(
        "# node.session.timeo.replacement_timeout = 999\n"
        "   # indented comment\n"
        "\n"
        "node.session.timeo.replacement_timeout=15\n"
        "node.conn[0].timeo.noop_out_interval   =   \"7\"\n"
        "node.conn[0].timeo.noop_out_timeout = 9 trailing words\n"
        "node.session.timeo.replacement_timeout = 20\n"
    )
    assert int_setting(conf, "node.session.timeo.replacement_timeout") == (20, "line 7")
    assert int_setting(conf, "node.conn[0].timeo.noop_out_interval") == (7, "line 5")
    assert int_setting(conf, "node.conn[0].timeo.noop_out_timeout") == (9, "line 6")
    assert conf.errors == ()


def test_iscsid_defaults_invalid_and_garbage_lines():
    conf = parse_iscsid_conf("node.session.timeo.replacement_timeout = soon\nno equals here\n= 5\n")
    assert int_setting(conf, "node.session.timeo.replacement_timeout") == (None, "invalid 'soon' (line 1)")
    assert int_setting(conf, "node.conn[0].timeo.noop_out_interval") == (5, "default")
    assert len(conf.errors) == 2 and conf.errors[0].startswith("line 2:") and conf.errors[1].startswith("line 3:")


def test_iscsid_empty_file():
    conf = parse_iscsid_conf("")
    assert conf.settings == {} and int_setting(conf, "node.session.timeo.replacement_timeout") == (120, "default")


MP = """
# comment
defaults {
    polling_interval 10   # trailing comment
    no_path_retry    "12" ! other comment style
    features "1 queue_if_no_path"
}
blacklist
{
    devnode "^(ram|loop)[0-9]*"
}
devices {
    device {
        vendor  "ACME"
        product "Block #1"
        no_path_retry queue
    }
    device {
        vendor "OTHER"
    }
}
overrides {
    polling_interval 2
}
"""


def test_multipath_sections_quotes_comments_and_brace_on_next_line():
    conf = parse_multipath_conf(MP)
    assert conf.errors == []
    d = conf.section("defaults")
    assert d.get("polling_interval") == "10" and d.get("no_path_retry") == "12"
    assert d.get("features") == "1 queue_if_no_path"
    assert conf.section("blacklist").get("devnode") == "^(ram|loop)[0-9]*"
    devs = conf.devices()
    assert [x.get("vendor") for x in devs] == ["ACME", "OTHER"]
    assert devs[0].get("product") == "Block #1"  # '#' inside quotes is not a comment
    assert devs[0].get("no_path_retry") == "queue" and devs[0].line == 13
    assert conf.section("overrides").get("polling_interval") == "2"


def test_multipath_errors_are_collected_not_raised():
    conf = parse_multipath_conf('stray 1\ndefaults {\n  features "1 queue_if_no_path\n  no_path_retry 5 6\n')
    text = "\n".join(conf.errors)
    assert "line 1: keyword 'stray' outside any section" in text
    assert "line 3: unterminated quote" in text
    assert "line 4: no_path_retry: extra data ignored: '6'" in text
    assert "section 'defaults' (line 2) is not closed" in text
    assert conf.section("defaults").get("no_path_retry") == "5"
    assert parse_multipath_conf("}\n").errors == ["line 1: '}' without an open section"]


def test_multipath_sections_of_several_files_merge():
    conf = parse_multipath_conf("defaults {\n no_path_retry 3\n}\n")
    parse_multipath_conf("defaults {\n polling_interval 7\n}\n", conf, origin="local.conf")
    d = conf.section("defaults")
    assert (d.get("no_path_retry"), d.get("polling_interval")) == ("3", "7")


def _q(text):
    conf = parse_multipath_conf(text)
    return queueing(conf.section("defaults").values if conf.section("defaults") else {}, "multipath.conf")


def test_queueing_semantics_of_multipath_conf_5():
    assert _q("") == queueing({}, "x") and _q("").mode == "fail" and _q("").source.endswith("(built-in default)")
    q = _q("defaults {\n no_path_retry 12\n polling_interval 5\n}")
    assert (q.mode, q.retries, q.seconds) == ("retry", 12, 60)
    assert _q("defaults {\n no_path_retry queue\n}").mode == "queue"
    assert _q('defaults {\n features "1 queue_if_no_path"\n}').mode == "queue"
    # no_path_retry wins over the legacy feature
    q = _q('defaults {\n features "1 queue_if_no_path"\n no_path_retry 4\n}')
    assert (q.mode, q.seconds) == ("retry", 20)
    assert _q("defaults {\n no_path_retry fail\n}").mode == "fail"
    assert _q("defaults {\n no_path_retry soon\n}").source.startswith("no_path_retry 'soon' is not")


# -- defect 12 (issue 16): both raised IndexError, and the doctor checks that read the
# files (iscsi_timeouts, nop_out) then showed as skipped with an error instead of results
def test_iscsid_empty_value_is_kept_not_a_crash():
    conf = parse_iscsid_conf("node.session.timeo.replacement_timeout =\nnode.conn[0].timeo.noop_out_interval = 7\n")
    assert int_setting(conf, "node.session.timeo.replacement_timeout") == (None, "invalid '' (line 1)")
    assert int_setting(conf, "node.conn[0].timeo.noop_out_interval") == (7, "line 2")


def test_multipath_keyword_without_value_before_a_brace_is_an_error_not_a_crash():
    conf = parse_multipath_conf("blacklist { wwid }\ndefaults {\n no_path_retry 6\n}\nblacklist {\n devnode\n}\n")
    assert conf.section("defaults").get("no_path_retry") == "6"
    assert conf.section("blacklist").values == {}
    assert conf.errors == ["line 1: 'wwid' has no value", "line 6: 'devnode' has no value and opens no section"]


def test_doctor_checks_still_report_with_those_lines(tmp_path):
    from dataclasses import replace

    from agent.doctor import run_checks
    from tests.unit.test_doctor_checks import by, inp_for

    root = tmp_path / "etc"
    (root / "iscsi").mkdir(parents=True)
    (root / "iscsi" / "iscsid.conf").write_text("node.session.timeo.replacement_timeout =\n")
    (root / "multipath.conf").write_text("blacklist { wwid }\ndefaults {\n no_path_retry 6\n}\n")
    inp = inp_for("good", tmp_path / "h")
    inp.paths = replace(inp.paths, etcdir=root)
    res = run_checks(inp, ["iscsi_timeouts", "nop_out"])
    for name in ("iscsi_timeouts", "nop_out"):
        got = by(res, name)
        assert got and all(r.error is None for r in got), [(r.status, r.error) for r in got]
    findings = " ".join(r.finding for r in by(res, "iscsi_timeouts"))
    assert "'wwid' has no value" in findings, findings
