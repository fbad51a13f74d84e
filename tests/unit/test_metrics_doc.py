"""docs/metrics.md is generated from the catalog and must match it."""

from agent.exporters import docs
from tests.conftest import ROOT


def test_metrics_doc_in_sync():
    path = ROOT / "docs" / "metrics.md"
    expected = docs.render()
    assert path.read_text() == expected, "docs/metrics.md is stale: python -m agent.exporters.docs > docs/metrics.md"


def test_every_metric_documented_with_source():
    from agent.exporters import catalog

    docs.render()
    missing = [n for n, d in catalog.CATALOG.items() if not d.source]
    assert missing == [], f"metrics without a documented source: {missing}"
