"""Every field the Kibana saved objects use exists in the mapping Elasticsearch itself composes
from kvmscope's templates (``_index_template/_simulate_index``), with a searchable type."""

from __future__ import annotations

from agent.shipping import templates
from tests.unit.test_kibana_objects import load_objects, referenced_fields


def _leaves(props: dict, prefix=""):
    for k, v in props.items():
        if "properties" in v:
            yield from _leaves(v["properties"], f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def test_kibana_fields_exist_in_the_real_composed_mappings(es_node, namespace):
    c = es_node.client()
    templates.ensure(c)
    refs = referenced_fields(load_objects())
    checked = 0
    for view in {v for _t, v, _f in refs}:
        stream = view.replace("*", namespace)
        sim = c.indices.simulate_index_template(name=stream)
        fields = dict(_leaves(sim["template"]["mappings"]["properties"]))
        assert sim["template"]["mappings"].get("dynamic") in (False, "false")
        for title, v, field in refs:
            if v != view:
                continue
            assert field in fields, f"{title!r}: {field} not in the mapping of {stream}"
            assert fields[field].get("index", True) is not False, f"{field} is not searchable"
            checked += 1
    assert checked == len(refs)
