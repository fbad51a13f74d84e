"""Strategies that mutate real inputs (byte flips, cuts, splices, repeats) and
build text from a parser's own vocabulary, so examples reach past the first check."""

from __future__ import annotations

from hypothesis import strategies as st


@st.composite
def mutated_bytes(draw, seeds: list[bytes]) -> bytes:
    """A real input with a few random edits."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(0, 8))):
        op = draw(st.sampled_from(("flip", "set", "cut", "insert", "truncate", "dup")))
        n = len(data)
        if op == "flip" and n:
            i = draw(st.integers(0, n - 1))
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and n:
            i = draw(st.integers(0, n - 1))
            data[i] = draw(st.sampled_from((0, 1, 0x7F, 0x80, 0xFF, draw(st.integers(0, 255)))))
        elif op == "cut" and n:
            i = draw(st.integers(0, n - 1))
            del data[i:i + draw(st.integers(1, 16))]
        elif op == "insert":
            i = draw(st.integers(0, n))
            data[i:i] = draw(st.binary(min_size=1, max_size=16))
        elif op == "truncate" and n:
            del data[draw(st.integers(0, n - 1)):]
        elif op == "dup" and n:
            i = draw(st.integers(0, n - 1))
            data[i:i] = data[i:i + draw(st.integers(1, 64))]
    return bytes(data)


def mutated_text(seeds: list[str]):
    return mutated_bytes([s.encode() for s in seeds]).map(lambda b: b.decode("utf-8", "replace"))


def lines_of(vocab: list[str], max_lines: int = 12):
    """Text made of lines that are real lines, pieces of them, or noise."""
    line = st.one_of(
        st.sampled_from(vocab),
        st.builds(lambda a, b: a[: len(a) // 2] + b[len(b) // 2:], st.sampled_from(vocab), st.sampled_from(vocab)),
        st.text(max_size=60),
    )
    return st.lists(line, max_size=max_lines).map("\n".join)


JSON_LEAVES = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(-2**70, 2**70),
                        st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20))
JSON = st.recursive(JSON_LEAVES, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                        st.dictionaries(st.text(max_size=10), kids, max_size=4)),
                    max_leaves=12)


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


@st.composite
def mutated_json(draw, seeds: list):
    """A real JSON document with a few nodes replaced, deleted or given an extra key."""
    import copy

    doc = copy.deepcopy(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 4))):
        paths = list(_paths(doc))
        path = draw(st.sampled_from(paths))
        if not path:
            if draw(st.booleans()):
                doc = draw(JSON)
            continue
        parent = doc
        for k in path[:-1]:
            parent = parent[k]
        op = draw(st.sampled_from(("replace", "delete", "add")))
        if op == "replace":
            parent[path[-1]] = draw(JSON)
        elif op == "delete":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(st.text(max_size=8))] = draw(JSON)
        else:
            parent.append(draw(JSON))
    return doc
