"""The Prometheus text format (0.0.4), written by the exporter itself.

prometheus_client's generate_latest formats every sample through generic
per-label escaping and name validation (a regex per label name per sample):
>60% of a big host's scrape. :func:`write_exposition` produces the same bytes
(UNDERSCORES name escaping, label values escaped \\\\ \\n \\"), about 5x faster
(benchmarks/exporter.py, docs/performance.md), pinned by
tests/unit/test_exposition.py against generate_latest.
"""

from __future__ import annotations

from operator import attrgetter, itemgetter
from typing import Iterable

from prometheus_client.openmetrics.exposition import UNDERSCORES, escape_label_name, escape_metric_name

_get_labels, _get_name, _get_timestamp, _get_value = (
    attrgetter("labels"), attrgetter("name"), attrgetter("timestamp"), attrgetter("value"))

_INF, _MINUS_INF = float("inf"), float("-inf")
_OM_SUFFIXES = ("_created", "_gsum", "_gcount")
_templates: dict[tuple, tuple] = {}  # (sample name, label names in dict order) -> (line % values, sorted label names)
_headers: dict[tuple, str] = {}


def go_float(v) -> str:
    """prometheus_client.utils.floatToGoString, inlined."""
    d = float(v)
    if d == _INF:
        return "+Inf"
    if d == _MINUS_INF:
        return "-Inf"
    if d != d:
        return "NaN"
    s = repr(d)
    if d > 0:
        dot = s.find(".")
        if dot > 6:  # Go switches to exponents sooner than Python
            mantissa = f"{s[0]}.{s[1:dot]}{s[dot + 1:]}".rstrip("0.")
            return f"{mantissa}e+{dot - 1:02d}"
    return s


def _template(name: str, keys: tuple) -> tuple:
    t = _templates.get((name, keys))
    if t is None:
        order = tuple(sorted(keys))
        mname = escape_metric_name(name, UNDERSCORES)
        if order:
            labels = ",".join(f'{escape_label_name(k, UNDERSCORES)}="%s"' for k in order)
            line = f"{mname}{{{labels}}} %s\n"
        else:
            line = f"{mname} %s\n"
        t = _templates[(name, keys)] = (line, order)
    return t


def _header(name: str, mtype: str, doc: str) -> str:
    h = _headers.get((name, mtype, doc))
    if h is None:
        mname = escape_metric_name(name, UNDERSCORES)
        help_text = doc.replace("\\", "\\\\").replace("\n", "\\n")
        h = _headers[(name, mtype, doc)] = f"# HELP {mname} {help_text}\n# TYPE {mname} {mtype}\n"
    return h


def _sample_line(s) -> str:
    line, order = _template(s.name, tuple(s.labels))
    lab = s.labels
    vals = tuple(lab[k].replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"') for k in order)
    text = line % (*vals, go_float(s.value))
    if s.timestamp is not None:
        text = f"{text[:-1]} {int(float(s.timestamp) * 1000):d}\n"
    return text


def write_family(metric, out: list) -> None:
    """Append ``metric``'s lines to ``out`` exactly as generate_latest writes them."""
    mname, mtype = metric.name, metric.type
    if mtype == "counter":
        mname += "_total"
    elif mtype == "info":
        mname += "_info"
        mtype = "gauge"
    elif mtype == "stateset":
        mtype = "gauge"
    elif mtype == "gaugehistogram":
        mtype = "histogram"
    elif mtype == "unknown":
        mtype = "untyped"
    out.append(_header(mname, mtype, metric.documentation))
    om_names = {metric.name + sfx: sfx for sfx in _OM_SUFFIXES}
    samples = metric.samples
    if not samples:
        return
    labs = list(map(_get_labels, samples))
    names = set(map(_get_name, samples))
    if (len(names) == 1 and names.isdisjoint(om_names) and set(map(_get_timestamp, samples)) == {None}
            and len(set(map(len, labs))) == 1 and _write_uniform(samples[0].name, labs, samples, out)):
        return
    om: dict[str, list[str]] = {}
    templates = _templates
    cur_key, line, order = None, "", ()
    for s in metric.samples:
        lab = s.labels
        key = (s.name, tuple(lab))
        if s.name in om_names or s.timestamp is not None:
            text = _sample_line(s)
            sfx = om_names.get(s.name)
            if sfx is None:
                out.append(text)
            else:
                om.setdefault(sfx, []).append(text)
            continue
        if key != cur_key:
            t = templates.get(key) or _template(*key)
            cur_key, (line, order) = key, t
        if order:
            out.append(line % (*[lab[k].replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"') for k in order],
                               go_float(s.value)))
        else:
            out.append(line % go_float(s.value))
    for sfx, lines in sorted(om.items()):
        out.append(_header(metric.name + sfx, "gauge", metric.documentation))
        out.extend(lines)


def _escape_column(col: list) -> list:
    if "\\" in (joined := "".join(col)) or "\n" in joined or '"' in joined:
        return [v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"') for v in col]
    return col


def _write_uniform(name: str, labs: list, samples: list, out: list) -> bool:
    """Lines of samples that share name and label count, no timestamp, one column per label; False (and
    nothing written) if their label names differ."""
    line, order = _template(name, tuple(labs[0]))
    try:  # same size and every one of the first sample's label names: the same label names
        cols = [list(map(itemgetter(k), labs)) for k in order]
    except KeyError:
        return False
    floats = list(map(float, map(_get_value, samples)))
    values = list(map(repr, floats))
    # repr(float) is go_float's answer except for inf, nan and 1e6 <= x < 1e16 (Go's exponent form)
    for i in [i for i, d in enumerate(floats) if not _MINUS_INF < d < 1e6]:
        values[i] = go_float(floats[i])
    out.append("".join(map(line.__mod__, zip(*map(_escape_column, cols), values))))
    return True


_repr_nl = "%r\n".__mod__
_int_nl = "%d.0\n".__mod__
_MIN_EXACT = -(2**53)


def _go_floats(values) -> list:
    """go_float of each value, each followed by a newline."""
    values = list(values)
    if not values:
        return []
    if set(map(type, values)) == {int}:  # counters: an int's float text is its digits and ".0" (below 2**53)
        out = list(map(_int_nl, values))
        if max(values) < 1e6 and min(values) > _MIN_EXACT:
            return out
        for i in [i for i, v in enumerate(values) if not _MIN_EXACT < v < 1e6]:
            v = values[i]
            if 1e6 <= v < 2**53:  # Go's exponent form of the exact digits: 1234500 -> 1.2345e+06
                d = str(v)
                m = d.rstrip("0")
                out[i] = f"{m[0]}.{m[1:]}e+{len(d) - 1:02d}\n" if len(m) > 1 else f"{m}e+{len(d) - 1:02d}\n"
            else:
                out[i] = go_float(v) + "\n"
        return out
    floats = list(map(float, values))
    out = list(map(_repr_nl, floats))
    # repr(float) is go_float's answer except for inf, nan and 1e6 <= x < 1e16 (Go's exponent form)
    total = sum(floats)
    if total == total and -_INF < total < _INF and max(floats) < 1e6:  # a finite sum: no inf, no nan
        return out
    for i in [i for i, d in enumerate(floats) if not _MINUS_INF < d < 1e6]:
        out[i] = go_float(floats[i]) + "\n"
    return out


_perms: dict[tuple, tuple] = {}


def _columns(labelnames: tuple, labels: list, order: tuple) -> list | None:
    """The rows' label values as escaped columns in ``order`` (the sorted label names); None if a row's
    label count is not the family's (prometheus_client's zip would drop or ignore values: its path decides)."""
    n = len(labelnames)
    if not n:
        return []
    if set(map(len, labels)) != {n}:
        return None
    perm = _perms.get((labelnames, order))
    if perm is None:
        perm = _perms[(labelnames, order)] = tuple(labelnames.index(k) for k in order)
    cols = list(zip(*labels))
    return [_escape_column(cols[i]) for i in perm]


# (sample name, label names) -> {label values: the line up to its value}: the series of the last renders, so a
# series that stays (most do, cycle after cycle) is not formatted and escaped again. Rebuilt when it grows past
# twice the family's series (gone series do not pile up); entries depend on their key alone (races only miss).
_line_heads: dict[tuple, dict] = {}


def _prefixes(sample: str, names: tuple, labels: list) -> list | None:
    """Each row's line up to its value ('name{a="x",b="y"} '); None if a row's label count is not the family's."""
    key = (sample, names)
    heads = _line_heads.get(key)
    if heads is None or len(heads) > 2 * len(labels) + 64:
        heads = _line_heads[key] = {}
    out = list(map(heads.get, labels))
    if None not in out:
        return out
    if names and set(map(len, labels)) != {len(names)}:
        return None
    line, order = _template(sample, names)
    head = line[:-3]  # without "%s\n"
    if not names:
        return [head] * len(labels)
    perm = _perms.get((names, order))
    if perm is None:
        perm = _perms[(names, order)] = tuple(names.index(k) for k in order)
    for i in [i for i, h in enumerate(out) if h is None]:
        lv = labels[i]
        h = heads[lv] = head % tuple(_escape_value(lv[j]) for j in perm)
        out[i] = h
    return out


def _escape_value(v: str) -> str:
    if "\\" in v or "\n" in v or '"' in v:
        return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
    return v


def _rows_bytes(metric, rows: list) -> bytes | None:
    """The text of a catalog family (agent.exporters.catalog) from its rows: the bytes generate_latest writes
    for the samples the rows stand for, without building them; None when the rows do not fit (label counts)."""
    names = metric._labelnames
    if len(set(names)) != len(names) or "le" in names:
        return None
    key = (metric.name, metric.type, names, metric.documentation)
    last = _last_text.get(key)
    if last is not None and last[0] == rows:  # nothing changed since the last render: its text
        return last[1]
    mtype = metric.type
    mname = metric.name + "_total" if mtype == "counter" else metric.name
    out = [_header(mname, mtype, metric.documentation)]
    if rows and not _write_new_rows(metric, names, rows, out):
        return None
    text = "".join(out).encode("utf-8")
    _last_text[key] = (list(rows), text)
    return text


# (family name, type, label names, help) -> (rows, their text) of the family's last render: a family whose rows
# did not change since (an idle disk's histograms, the gauges of a quiet host: most of a small host's series
# between two cycles) is not written again. One entry per family the agent exports; a copy of the rows (tuples
# shared), not the list itself.
_last_text: dict[tuple, tuple[list, bytes]] = {}


def _write_new_rows(metric, names: tuple, rows: list, out: list) -> bool:
    if metric.type != "histogram":
        sample = metric.name + "_total" if metric.type == "counter" else metric.name
        labels = list(map(itemgetter(0), rows))
        prefixes = _prefixes(sample, names, labels)
        if prefixes is None:
            return False
        values = _go_floats(map(itemgetter(1), rows))
        out.append("".join(map(str.__add__, prefixes, values)))
        return True
    return _write_histogram_rows(metric.name, names, rows, out)


def _write_histogram_rows(name: str, names: tuple, rows: list, out: list) -> bool:
    bline, border = _template(name + "_bucket", names + ("le",))
    cline, corder = _template(name + "_count", names)
    sline, _ = _template(name + "_sum", names)
    cols = _columns(names, list(map(itemgetter(0), rows)), corder)
    if cols is None:
        return False
    # a bucket line split around its le value: head % (labels before le), tail % (labels after le)
    at = border.index("le")
    cut = bline.index('le="%s"') + 4
    head_t, tail_t = bline[:cut], bline[cut + 2:].replace(" %s\n", " ")
    n_before = at  # labels sorted before "le"
    heads = [head_t % vals[:n_before] for vals in zip(*cols)] if n_before else [head_t] * len(rows)
    tails = [tail_t % vals[n_before:] for vals in zip(*cols)] if len(names) > n_before else [tail_t] * len(rows)
    label_vals = list(zip(*cols)) if cols else [()] * len(rows)
    for (_lv, buckets, sum_value), head, tail, lv in zip(rows, heads, tails, label_vals):
        les = [b[0] for b in buckets]
        if "\\" in (joined := "".join(les)) or "\n" in joined or '"' in joined:
            les = _escape_column(les)
        counts = _go_floats([b[1] for b in buckets])
        out.append("".join([f"{head}{le}{tail}{c}" for le, c in zip(les, counts)]))
        if float(buckets[0][0]) >= 0 and sum_value is not None:
            out.append(cline % (*lv, go_float(buckets[-1][1])))
            out.append(sline % (*lv, go_float(sum_value)))
    return True


def family_bytes(metric) -> bytes:
    """One family's text exposition: generate_latest's bytes for it."""
    rows = metric.rows() if hasattr(metric, "rows") else None
    if rows is not None:
        text = _rows_bytes(metric, rows)
        if text is not None:
            return text
    out: list[str] = []
    write_family(metric, out)
    return "".join(out).encode("utf-8")


def write_exposition(families: Iterable) -> bytes:
    """The text exposition of ``families``: generate_latest's bytes, faster."""
    return b"".join(map(family_bytes, families))

