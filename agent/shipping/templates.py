"""Index management: component templates, index templates and a lifecycle policy.

Installed on every start of the shipper (idempotent ``PUT``s; a template
that is already there is simply replaced by the same content):

* ``kvmscope@base`` (component): the ECS fields every document carries;
* ``kvmscope.<dataset>@mappings`` (component): the dataset's own fields;
* ``kvmscope@settings`` (component): the lifecycle policy name, when the
  cluster has ILM;
* ``<type>-kvmscope.<dataset>`` (index template, ``data_stream: {}``,
  priority 200 so it wins over the stack's built-in ``metrics-*-*`` /
  ``logs-*-*`` templates at priority 100) composed of the above.

Mappings are explicit and ``dynamic: false``: a field no table in
:mod:`agent.shipping.fields` names is kept in ``_source`` but not indexed,
and a value of the wrong type is refused (the shipper sets such a document
aside with the reason).

The lifecycle policy ``kvmscope`` (hot: rollover at 1 day / 10 GB, delete
after ``retention_days``) needs ILM (x-pack ``index-lifecycle``). A cluster
without it (the integ-test distribution, some managed services) answers the
``_ilm`` endpoint with 400/404: the policy is skipped with a notice.
"""

from __future__ import annotations

import logging

from agent.shipping.fields import BASE, DATASETS, properties

log = logging.getLogger(__name__)

POLICY = "kvmscope"
PRIORITY = 200


def policy_body(retention_days: int = 30) -> dict:
    return {
        "policy": {
            "_meta": {"managed_by": "kvmscope"},
            "phases": {
                "hot": {"actions": {"rollover": {"max_age": "1d", "max_primary_shard_size": "10gb"}}},
                "delete": {"min_age": f"{retention_days}d", "actions": {"delete": {}}},
            },
        }
    }


def component_templates(with_ilm: bool) -> dict[str, dict]:
    out = {
        "kvmscope@base": {
            "template": {"mappings": {"dynamic": False, "properties": properties(BASE)}},
            "_meta": {"managed_by": "kvmscope"},
        },
        "kvmscope@settings": {
            "template": {"settings": {"index.lifecycle.name": POLICY} if with_ilm else {}},
            "_meta": {"managed_by": "kvmscope"},
        },
    }
    for ds in DATASETS.values():
        out[f"kvmscope.{ds.name}@mappings"] = {
            "template": {"mappings": {"dynamic": False, "properties": properties(ds.fields)}},
            "_meta": {"managed_by": "kvmscope", "description": ds.description},
        }
    return out


def index_templates() -> dict[str, dict]:
    out = {}
    for ds in DATASETS.values():
        out[ds.stream_prefix] = {
            "index_patterns": [f"{ds.stream_prefix}-*"],
            "data_stream": {},
            "priority": PRIORITY,
            "composed_of": ["kvmscope@base", "kvmscope@settings", f"kvmscope.{ds.name}@mappings"],
            "_meta": {"managed_by": "kvmscope", "description": ds.description},
        }
    return out


def merged_mapping(dataset: str) -> dict:
    """The mapping a data stream of ``dataset`` gets (what the templates compose to)."""
    from agent.shipping.fields import all_fields

    return {"dynamic": False, "properties": properties(all_fields(DATASETS[dataset]))}


def ensure(client) -> list[str]:
    """Install the policy (if possible) and all templates. Returns notices for the log.

    Raises the client's exceptions on connection problems (the caller retries).
    """
    from elasticsearch import ApiError

    notices = []
    with_ilm = True
    try:
        client.ilm.put_lifecycle(name=POLICY, body=policy_body())
    except ApiError as e:
        if e.meta.status in (400, 404, 405, 410):
            with_ilm = False
            notices.append(
                f"lifecycle policy skipped: this cluster has no ILM (HTTP {e.meta.status}); "
                "data streams are not rolled over or deleted by kvmscope"
            )
        else:
            raise
    for name, body in component_templates(with_ilm).items():
        client.cluster.put_component_template(name=name, template=body["template"], meta=body.get("_meta"))
    for name, body in index_templates().items():
        client.indices.put_index_template(
            name=name,
            index_patterns=body["index_patterns"],
            data_stream=body["data_stream"],
            priority=body["priority"],
            composed_of=body["composed_of"],
            meta=body["_meta"],
        )
    return notices
