"""The agent's live diagnosis over a real recording: findings once, on /metrics, in the ES shape."""

from pathlib import Path

from prometheus_client.exposition import generate_latest

from agent.codec import load_recording
from agent.config import DiagnoseConfig
from agent.diagnose.live import LiveDiagnosis, ship_dict
from agent.exporters.collector import make_registry
from agent.exporters.registry import load_renderers
from agent.exporters.render_diagnosis import diagnosis_renderer

REC = Path(__file__).resolve().parents[1] / "fixtures" / "recordings"


def test_findings_reported_once_and_exported():
    snaps = load_recording(open(REC / "loss-portal1.json"))
    history = []
    shipped = []
    live = LiveDiagnosis(lambda: history, DiagnoseConfig(window_seconds=60),
                         on_new=lambda f, s: shipped.append(ship_dict(f)))
    for s in snaps:
        history.append(s)
        live.consume(s)
    assert [f.rule for f in live.current if f.severity != "info"] == ["packet_loss"]
    assert len([d for d in shipped if d["rule"] == "packet_loss"]) == 1  # not once per cycle
    d = next(d for d in shipped if d["rule"] == "packet_loss")
    assert d["portal"] == "198.18.1.2:3260" and d["severity"] == "warning" and '"retransmits"' in d["evidence"]
    renderers = load_renderers().with_snapshot(diagnosis_renderer(lambda: live.current))
    text = generate_latest(make_registry(lambda: snaps[-1], renderers=renderers)).decode()
    assert ('kvmscope_diagnosis_findings{rule="packet_loss",severity="warning",subject="198.18.1.2:3260",'
            'subject_kind="portal"} 1.0') in text
    assert 'kvmscope_diagnosis_problems{severity="warning"} 1.0' in text


def test_healthy_recording_ships_nothing():
    snaps = load_recording(open(REC / "healthy.json"))
    history, shipped = [], []
    live = LiveDiagnosis(lambda: history, DiagnoseConfig(), on_new=lambda f, s: shipped.append(f))
    for s in snaps:
        history.append(s)
        live.consume(s)
    assert shipped == [] and live.current == []
