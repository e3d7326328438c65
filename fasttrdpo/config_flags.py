"""Command-line flags and `--config` JSON values of a config dataclass, derived from its fields.

One source for every flag: each field of TRDPOConfig gets `--field-name` from its annotation, its help
text and its command (train only, or also eval) from its `metadata`. Adding a field adds its flag.

    from fasttrdpo.config_flags import field_flags
    specs = field_flags(TRDPOConfig)           # one FieldFlag per field, in declaration order
    group = parser.add_argument_group("TRDPOConfig fields")
    for spec in specs:
        spec.add_to(group)                      # --tau INT, --bf16/--no-bf16, --loss-type STR[,STR...], ...
    spec.from_json(value, where="--config run.json")   # the same type, checked on a JSON value

Annotations understood (with `from __future__ import annotations` too):
    bool                         --x / --no-x
    int, float, str              one value (an int is accepted where a float is expected)
    Literal["a", "b"]            one of the choices (also metadata choices=(...) on a str field)
    X | None                     as X; the word `none` (or `null`) on the command line, null in JSON
    list[X], tuple[X, ...]       comma-separated (`a,b`) or a JSON list (`[1, 2]`); a JSON list in --config
    X | list[X]                  one value or a list (one value on the command line stays a bare value)
    dict, dict[str, X]           a JSON object
    unions of scalars (int | str) the first member the value parses as, in the order bool, int, float, str
Anything else raises TypeError naming the field when the parser is built (tests/test_cli_flags.py
builds it for every field, so a field without a working flag fails there).

Field metadata (see `fasttrdpo.training.config.option`):
    help     the flag's help text (the default is appended)
    eval     None: `fasttrdpo train` only; "flag": `eval` takes the flag too (else the field's default);
             "recorded": `eval` takes the checkpoint's recorded value unless the flag is given
    flag     the flag's name when it is not --field-name (e.g. "--resume"); aliases: more names ("--lr",)
    const    the value of the flag given alone (nargs="?"), e.g. "latest"
    choices  the allowed values of a str field; metavar: the flag's value placeholder
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from dataclasses import dataclass

EVAL_MODES = (None, "flag", "recorded")
_NONE_WORDS = ("none", "null")
_SCALARS = (bool, int, float, str)


@dataclass(frozen=True)
class ValueType:
    """What a field accepts: scalars of `kinds` (or `choices`), a list of `item`, a dict, and/or None."""

    kinds: tuple = ()  # scalar types accepted as a bare value, in parse order
    choices: tuple | None = None  # Literal values (or metadata choices): the only bare values allowed
    item: ValueType | None = None  # a list (or tuple) of these is accepted
    container: type = list
    mapping: ValueType | None = None  # dict accepted; its values of this type (None kinds: any JSON value)
    optional: bool = False

    # --- description -------------------------------------------------------------------------------

    def describe(self) -> str:
        parts = []
        if self.choices is not None:
            parts.append("one of " + ", ".join(repr(c) for c in self.choices))
        elif self.kinds:
            parts.append(" or ".join(k.__name__ for k in self.kinds))
        if self.item is not None:
            parts.append(f"a list of {self.item.describe()}")
        if self.mapping is not None:
            parts.append("a JSON object")
        return " or ".join(parts)

    def metavar(self) -> str:
        def one(t: ValueType) -> str:
            if t.choices is not None:
                return "{" + ",".join(str(c) for c in t.choices) + "}"
            return "|".join(k.__name__.upper() for k in t.kinds)
        if self.mapping is not None:
            return "JSON"
        if self.item is not None:
            return f"{one(self.item)}[,{one(self.item)}...]"
        return one(self)

    # --- command line ------------------------------------------------------------------------------

    def parse_text(self, text: str):
        """A command-line value: raises argparse.ArgumentTypeError saying what was expected."""
        if self.optional and text.strip().lower() in _NONE_WORDS:
            return None
        if self.mapping is not None or (self.item is not None and text.lstrip().startswith("[")):
            try:
                value = json.loads(text)
            except ValueError as e:
                raise argparse.ArgumentTypeError(f"expected {self._expected()}, got {text!r} (not JSON: {e})") from None
            ok, out = self._from_json(value)
            if not ok:
                raise argparse.ArgumentTypeError(f"expected {self._expected()}, got {text!r}")
            return out
        if self.item is not None:
            parts = [p.strip() for p in text.split(",")]
            values = [self.item._scalar_from_text(p) for p in parts]
            if any(not ok for ok, _ in values) or any(p == "" for p in parts):
                raise argparse.ArgumentTypeError(f"expected {self._expected()} (comma-separated), got {text!r}")
            values = [v for _, v in values]
            if len(values) == 1 and (self.kinds or self.choices is not None):  # X | list[X]: one stays bare
                ok, bare = self._scalar_from_text(parts[0])
                if ok:
                    return bare
            return self.container(values)
        ok, value = self._scalar_from_text(text)
        if not ok:
            raise argparse.ArgumentTypeError(f"expected {self._expected()}, got {text!r}")
        return value

    def _expected(self) -> str:
        return self.describe() + (" or none" if self.optional else "")

    def _scalar_from_text(self, text: str):
        if self.choices is not None:
            for c in self.choices:
                if str(c) == text:
                    return True, c
            return False, None
        for kind in self.kinds:
            if kind is bool:
                if text.lower() in ("true", "false"):
                    return True, text.lower() == "true"
                continue
            if kind is str:
                return True, text
            try:
                return True, kind(text)
            except ValueError:
                continue
        return False, None

    # --- JSON (--config) ---------------------------------------------------------------------------

    def from_json(self, name: str, value, where: str):
        """A JSON value checked against the type (ints accepted for floats); ValueError names the field."""
        ok, out = self._from_json(value)
        if not ok:
            raise ValueError(f"{where}: field {name} must be {self._expected().replace(' or none', ' or null')}, "
                             f"got {value!r}")
        return out

    def _from_json(self, value):
        if value is None:
            return self.optional, None
        if self.item is not None and isinstance(value, list):
            items = [self.item._from_json(v) for v in value]
            if all(ok for ok, _ in items):
                return True, self.container(v for _, v in items)
            return False, None
        if self.mapping is not None and isinstance(value, dict):
            if self.mapping.kinds or self.mapping.choices is not None:
                checked = {k: self.mapping._from_json(v) for k, v in value.items()}
                if not all(ok for ok, _ in checked.values()):
                    return False, None
                return True, {k: v for k, (_, v) in checked.items()}
            return True, dict(value)
        if self.choices is not None:
            for c in self.choices:
                if type(value) is type(c) and value == c:
                    return True, c
            return False, None
        for kind in self.kinds:
            if kind is bool and isinstance(value, bool):
                return True, value
            if kind is int and isinstance(value, int) and not isinstance(value, bool):
                return True, value
            if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
                return True, float(value)
            if kind is str and isinstance(value, str):
                return True, value
        return False, None


def value_type(annotation, where: str = "annotation") -> ValueType:
    """The ValueType of a (resolved) type annotation; TypeError for one the command line cannot carry."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation in _SCALARS:
        return ValueType(kinds=(annotation,))
    if origin is typing.Literal:
        if not args or not all(type(a) in _SCALARS for a in args):
            raise TypeError(f"{where}: Literal values must be bool, int, float or str")
        return ValueType(choices=tuple(args))
    if annotation is list or annotation is tuple:
        raise TypeError(f"{where}: say the element type ({annotation.__name__}[str], ...)")
    if origin is list or (origin is tuple and len(args) == 2 and args[1] is Ellipsis):
        item = value_type(args[0], where)
        if item.item is not None or item.mapping is not None or item.optional:
            raise TypeError(f"{where}: a list's elements must be scalars")
        return ValueType(item=item, container=origin)
    if annotation is dict or origin is dict:
        if args and args[0] is not str:
            raise TypeError(f"{where}: JSON object keys are strings (dict[str, ...])")
        inner = value_type(args[1], where) if args and args[1] is not typing.Any else ValueType()
        return ValueType(mapping=inner)
    if origin is typing.Union or origin is types.UnionType:
        members = [value_type(a, where) for a in args if a is not type(None)]
        optional = len(members) < len(args)
        kinds, choices, item, container, mapping = [], None, None, list, None
        for m in members:
            if m.choices is not None:
                if choices is not None or kinds:
                    raise TypeError(f"{where}: a Literal joins only None or a list")
                choices = m.choices
            for k in m.kinds:
                if k not in kinds:
                    kinds.append(k)
            if m.item is not None:
                if item is not None:
                    raise TypeError(f"{where}: at most one list type in a union")
                item, container = m.item, m.container
            if m.mapping is not None:
                mapping = m.mapping
            optional = optional or m.optional
        if choices is not None and kinds:
            raise TypeError(f"{where}: a Literal joins only None or a list")
        if mapping is not None and (kinds or item is not None or choices is not None):
            raise TypeError(f"{where}: a dict joins only None")
        # bool first: "true" must not parse as the str "true"; int before float: 3 stays an int
        kinds = sorted(kinds, key=_SCALARS.index)
        return ValueType(kinds=tuple(kinds), choices=choices, item=item, container=container, mapping=mapping,
                         optional=optional)
    raise TypeError(f"{where}: the command line cannot carry a {annotation!r}")


def _default_text(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value)
    return str(value)


@dataclass(frozen=True)
class FieldFlag:
    """The command-line flag of one dataclass field."""

    name: str  # the field (= the argparse dest)
    flags: tuple  # "--field-name" (or metadata flag) and aliases
    type: ValueType
    default: object
    help: str
    eval: str | None  # None, "flag" or "recorded" (see the module docstring)
    const: object = dataclasses.MISSING
    metavar: str | None = None

    @property
    def flag(self) -> str:
        return self.flags[0]

    @property
    def is_switch(self) -> bool:
        """A plain bool field: --x / --no-x."""
        return self.type.kinds == (bool,) and self.type.item is None and self.type.choices is None

    def help_text(self) -> str:
        text = self.help.rstrip(".")
        default = f"default: {_default_text(self.default)}"
        if self.const is not dataclasses.MISSING:
            default += f"; {self.flag} alone: {self.const}"
        if self.type.optional and not self.is_switch and self.default is not None:
            default += "; none accepted"
        return f"{text} ({default})" if text else f"({default})"

    def add_to(self, parser) -> None:
        """Add the flag to an argparse parser or group. Not given, the flag sets nothing (argparse.SUPPRESS):
        `name in vars(args)` says it was given, also as `--x none` for None."""
        help_text = self.help_text().replace("%", "%%")
        if self.is_switch:
            names = list(self.flags)
            parser.add_argument(*names, dest=self.name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS,
                                help=help_text)
            return
        kwargs = dict(dest=self.name, type=self.type.parse_text, default=argparse.SUPPRESS, help=help_text,
                      metavar=self.metavar or self.type.metavar())
        if self.const is not dataclasses.MISSING:
            kwargs.update(nargs="?", const=self.const)
        parser.add_argument(*self.flags, **kwargs)

    def from_json(self, value, where: str):
        return self.type.from_json(self.name, value, where)


def field_flags(cls) -> list[FieldFlag]:
    """One FieldFlag per field of the dataclass `cls`, in declaration order."""
    hints = typing.get_type_hints(cls)  # resolves string annotations in each class's own module
    out = []
    for f in dataclasses.fields(cls):
        meta = f.metadata
        where = f"{cls.__name__}.{f.name}"
        vt = value_type(hints[f.name], where)
        if "choices" in meta:
            if vt.kinds != (str,) or vt.item is not None:
                raise TypeError(f"{where}: metadata choices apply to a str field (else use Literal)")
            vt = dataclasses.replace(vt, kinds=(), choices=tuple(meta["choices"]))
        if meta.get("eval") not in EVAL_MODES:
            raise ValueError(f"{where}: metadata eval must be one of {EVAL_MODES}, got {meta.get('eval')!r}")
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None
        flag = meta.get("flag") or "--" + f.name.replace("_", "-")
        out.append(FieldFlag(name=f.name, flags=(flag, *meta.get("aliases", ())), type=vt, default=default,
                             help=meta.get("help", ""), eval=meta.get("eval"),
                             const=meta.get("const", dataclasses.MISSING), metavar=meta.get("metavar")))
    return out
