"""benchmarks/startup.py's summary and section, on made-up starts (the measurement itself needs root and bcc)."""

from __future__ import annotations

from benchmarks.startup import BEGIN, END, Start, render, summary


def starts() -> list[Start]:
    return [Start("cold", 6.5, 2, 0.6, 1.9, 0, 7.0), Start("warm", 1.5, 1, 0.55, 0.0, 4, 7.1),
            Start("cold", None, None, 0.7, 2.0, 0, 9.0), Start("warm", 2.1, 1, 0.6, 0.0, 4, 8.0),
            Start("cold", 5.0, 2, 0.6, 1.8, 0, 7.5), Start("warm", 1.2, 1, 0.5, 0.0, 4, 7.2)]


def test_summary_medians_over_the_starts_that_reached_a_full_snapshot():
    cold, warm = summary(starts(), "cold"), summary(starts(), "warm")
    assert (cold["n"], cold["failed"], cold["median"], cold["min"], cold["max"]) == (3, 1, 5.75, 5.0, 6.5)
    assert (warm["n"], warm["failed"], warm["median"]) == (3, 0, 1.5)
    assert warm["cpu_children"] == 0.0 and cold["cpu_children"] == 1.9
    assert cold["load"] == (7.0, 9.0)


def test_section_has_its_markers_every_start_and_the_medians():
    text = render(starts(), 5.0)
    assert text.startswith(BEGIN) and text.rstrip().endswith(END)
    assert "cold: median **5.75 s**" in text and "1 without a full snapshot" in text
    assert "warm: median **1.50 s**" in text
    rows = [ln for ln in text.splitlines() if ln.startswith("| ") and ln[2].isdigit()]
    assert len(rows) == 6 and rows[2].split("|")[3].strip() == "-"
