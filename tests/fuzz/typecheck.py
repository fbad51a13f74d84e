"""Is a parser's output well-typed? A recursive check of a value against a type
hint (dataclasses through their field hints), used as the fuzz property."""

from __future__ import annotations

import dataclasses
import types
import typing


def check(value, tp, where: str = "value") -> None:
    """AssertionError naming the path of the first value that does not fit ``tp``."""
    if tp is typing.Any or tp is object:
        return
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for a in args:
            try:
                check(value, a, where)
                return
            except AssertionError as e:
                errors.append(str(e))
        raise AssertionError(f"{where}: {value!r:.80} fits none of {tp}: {errors}")
    if tp is type(None) or tp is None:
        assert value is None, f"{where}: {value!r:.80} is not None"
        return
    if dataclasses.is_dataclass(tp):
        assert isinstance(value, tp), f"{where}: {type(value).__name__} is not {tp.__name__}"
        hints = typing.get_type_hints(tp)
        for f in dataclasses.fields(tp):
            check(getattr(value, f.name), hints[f.name], f"{where}.{f.name}")
        return
    if origin is tuple:
        assert isinstance(value, tuple), f"{where}: {type(value).__name__} is not a tuple"
        if len(args) == 2 and args[1] is Ellipsis:
            for i, v in enumerate(value):
                check(v, args[0], f"{where}[{i}]")
        elif args:
            assert len(value) == len(args), f"{where}: {len(value)} items, want {len(args)}"
            for i, (v, a) in enumerate(zip(value, args)):
                check(v, a, f"{where}[{i}]")
        return
    if origin is list:
        assert isinstance(value, list), f"{where}: {type(value).__name__} is not a list"
        for i, v in enumerate(value):
            check(v, args[0] if args else typing.Any, f"{where}[{i}]")
        return
    if origin is dict:
        assert isinstance(value, dict), f"{where}: {type(value).__name__} is not a dict"
        kt, vt = args if args else (typing.Any, typing.Any)
        for k, v in value.items():
            check(k, kt, f"{where} key")
            check(v, vt, f"{where}[{k!r:.40}]")
        return
    if tp is int:
        assert type(value) is int, f"{where}: {value!r:.80} is not an int"
    elif tp is float:
        assert type(value) in (int, float), f"{where}: {value!r:.80} is not a number"
    elif tp is bool:
        assert type(value) is bool, f"{where}: {value!r:.80} is not a bool"
    elif tp is str:
        assert isinstance(value, str), f"{where}: {value!r:.80} is not a str"
    elif isinstance(tp, type):
        assert isinstance(value, tp), f"{where}: {type(value).__name__} is not {tp.__name__}"
