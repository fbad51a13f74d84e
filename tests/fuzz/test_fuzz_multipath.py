"""Fuzz the multipath source's parsers: ``dmsetup table`` / ``dmsetup status`` lines of the multipath
target and ``multipathd show maps json``, and their join. None may raise on odd text except
parse_multipathd_json's ValueError for text that is not that JSON at all; what comes back joins into
well-formed maps."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from agent.records.multipath import MultipathMap, parse_no_path_retry
from agent.sources.multipath import build_maps, parse_dm_status, parse_dm_table, parse_multipathd_json
from tests.fuzz.mutate import lines_of, mutated_text
from tests.fuzz.typecheck import check
from tests.unit.test_multipath import STATUS_2PG, STATUS_ALL_FAILED, STATUS_ONE_FAILED, TABLE, TABLE_2PG, daemon_json

TABLES = [TABLE, TABLE_2PG, "No devices found\n"]
STATUSES = [STATUS_ONE_FAILED, STATUS_ALL_FAILED, STATUS_2PG,
            "mpatha: 0 131072 multipath 2 0 0 0 2 1 A 0 1 2 8:0 A 0 4096 1 E 0 1 2 8:16 A 0 0 1 \n"]
JSONS = [daemon_json(), daemon_json(queueing="20 sec")]


@given(st.one_of(mutated_text(TABLES), lines_of([ln for t in TABLES for ln in t.splitlines()]), st.text()),
       st.one_of(mutated_text(STATUSES), lines_of([ln for t in STATUSES for ln in t.splitlines()]), st.text()))
def test_dmsetup_parsers_and_join(table_text, status_text):
    table, status = parse_dm_table(table_text), parse_dm_status(status_text)
    maps = build_maps(table, status, None, {}, lambda d: None)
    check(maps, list[MultipathMap])
    for m in maps:
        assert 0 <= m.active_paths <= len(m.paths)
        assert all(p.dm_state in ("active", "failed") and p.fail_count >= 0 for p in m.paths)


@given(st.one_of(mutated_text(JSONS), st.text()))
def test_multipathd_json(text):
    try:
        daemon = parse_multipathd_json(text)
    except ValueError:  # not that JSON at all (json.JSONDecodeError is one): the source reports it
        return
    maps = build_maps(None, None, daemon, {}, lambda d: None)
    check(maps, list[MultipathMap])
    for m in maps:
        parse_no_path_retry(m.no_path_retry)


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                    max_leaves=30))
def test_multipathd_json_of_any_shape(value):
    doc = {"major_version": 0, "maps": [value, {"name": "m", "path_groups": [value, {"paths": [value]}]}]}
    try:
        daemon = parse_multipathd_json(json.dumps(doc))
    except ValueError:
        return
    check(build_maps(None, None, daemon, {}, lambda d: None), list[MultipathMap])
