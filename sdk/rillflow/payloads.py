"""How a function's parameters and return value become data on the wire, and back.

One set of rules for entrypoints and activities (and, later, signal, query and update
handlers), those of the workflows page: the input is a JSON object keyed by parameter
name, defaults applied and unknown keys refused; a single pydantic model parameter is
the input itself, its fields at the top level; a union of models (optionally with None)
is tried member by member, left to right, the first that validates wins; a union that
mixes a model with another type is refused when the function is decorated. Values are
pydantic's JSON-mode dump, validated back into the declared types on the way in, and
checked to be encodable on the wire before anything is sent: msgpack carries integers
of at most 64 bits and strings only as UTF-8, and a raw encoder error would name neither
the field nor the remedy.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Union

from pydantic import BaseModel, ConfigDict, Field, RootModel, TypeAdapter, ValidationError, create_model
from pydantic_core import to_jsonable_python

from rillflow.dependencies import Depends
from rillflow.errors import (
    InvalidInputError,
    InvalidResultError,
    PayloadTooLargeError,
    RillflowError,
    WorkflowDefinitionError,
    safe_text,
)
from rillflow_runtime.codec import pack

DEFAULT_MAX_PAYLOAD_BYTES = 2 * 1024 * 1024
INT_MIN, INT_MAX = -(2**63), 2**64 - 1  # what msgpack carries: int64 and uint64
MAX_DEPTH = 500  # msgpack refuses data nested deeper than 511 levels


@dataclass(frozen=True)
class InputShape:
    """How raw input becomes what the input model validates. The registry stores it
    beside the input schema, so a client that knows only a workflow's name normalises
    input exactly as the worker will."""

    mode: str  # "fields" (an object keyed by parameter name), "model", or "union"
    params: tuple[str, ...]
    root: bool = False  # the input model is a RootModel: it takes its value as it is

    def normalize(self, data: Any) -> Any:
        """No input means all defaults (a root input takes None as it is); a bare value
        for a one-parameter function is that parameter."""
        if data is None:
            return None if self.root else {}
        if self.mode == "fields" and not isinstance(data, dict) and len(self.params) == 1:
            return {self.params[0]: data}
        return data

    def to_json(self) -> dict[str, Any]:
        return {"mode": self.mode, "params": list(self.params), "root": self.root}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> InputShape:
        return cls(str(data["mode"]), tuple(data.get("params", ())), bool(data.get("root")))


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


class Signature:
    """The input model and result adapter of one callable."""

    def __init__(
        self, fn: Callable[..., Any], *, what: str, require_annotations: bool, allow_kwargs: bool = False
    ) -> None:
        self.fn_name = fn.__name__
        self.what = what
        # a handler that takes **kwargs accepts keys beyond its parameters and gets them there
        self.var_kw: str | None = None
        sig = inspect.signature(fn)
        try:
            hints = typing.get_type_hints(fn)
        except Exception as e:  # unresolvable forward reference
            raise WorkflowDefinitionError(f"{what} '{self.fn_name}': cannot read annotations: {e}") from e
        self.params: list[inspect.Parameter] = []
        # parameters a worker fills in (Depends): not part of the input
        self.depends: dict[str, Depends] = {}
        for p in sig.parameters.values():
            if p.name == "self":
                continue
            if isinstance(p.default, Depends):
                self.depends[p.name] = p.default
                continue
            if p.kind == p.VAR_KEYWORD:
                if not allow_kwargs:
                    raise WorkflowDefinitionError(
                        f"'{self.fn_name}' has **{p.name} which is not supported for this handler type."
                    )
                self.var_kw = p.name
                continue
            if p.kind == p.VAR_POSITIONAL:
                raise WorkflowDefinitionError(
                    f"{what} '{self.fn_name}' has *{p.name}, which is not supported: "
                    "declare each parameter by name"
                )
            if require_annotations and p.name not in hints:
                raise WorkflowDefinitionError(
                    f"Parameter '{p.name}' in '{self.fn_name}' must have a type annotation."
                )
            self.params.append(p)
        if require_annotations and "return" not in hints:
            raise WorkflowDefinitionError(
                f"'{self.fn_name}' must have a return type annotation, "
                "use `-> None` if no return type is expected."
            )
        self.hints = hints
        # built once: constructing an inspect.Signature validates every parameter again
        self._call_sig = inspect.Signature(self.params)
        self.param_names = tuple(p.name for p in self.params)
        # a call that passes every argument by position needs no bind() (most calls do)
        self._by_position = all(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in self.params)
        self.return_type: Any = hints.get("return", Any)
        self.result_adapter: TypeAdapter[Any] = TypeAdapter(self.return_type)
        self.input_model, self.mode = self._input_model()
        self.shape = InputShape(
            self.mode,
            tuple(p.name for p in self.params),
            root=self.mode == "union" or issubclass(self.input_model, RootModel),
        )

    def _input_model(self) -> tuple[type[BaseModel], str]:
        """The rules of the workflows page: a single model is the input itself; a union of
        models (and None) is tried member by member, first match wins; anything else is
        an object keyed by parameter name, unknown keys refused."""
        if len(self.params) == 1 and self.var_kw is None:
            p = self.params[0]
            tp = self.hints.get(p.name, Any)
            if _is_model(tp):
                return tp, "model"
            members = typing.get_args(tp) if _is_union(tp) else ()
            if any(_is_model(m) for m in members):
                bad = [m for m in members if m is not type(None) and not _is_model(m)]
                if bad:
                    names = ", ".join(getattr(m, "__name__", repr(m)) for m in bad)
                    raise WorkflowDefinitionError(
                        f"Cannot generate Pydantic model from parameters of '{self.fn_name}': "
                        f"Parameter '{p.name}' of '{self.fn_name}' has unsupported union members: {names}. "
                        "Union inputs only support Pydantic BaseModel subclasses and None. "
                        "Use a dedicated BaseModel instead."
                    )
                root: Any = Annotated[tp, Field(union_mode="left_to_right")]
                union_model = type(f"{self.fn_name}_Input", (RootModel[root],), {"__module__": __name__})
                return union_model, "union"
        fields: dict[str, Any] = {}
        for p in self.params:
            default = ... if p.default is inspect.Parameter.empty else p.default
            fields[p.name] = (self.hints.get(p.name, Any), default)
        try:
            config = ConfigDict(extra="allow" if self.var_kw else "forbid")
            if self.var_kw:  # `**extra: T`: every key beyond the parameters must be a T
                fields["__pydantic_extra__"] = (dict[str, self.hints.get(self.var_kw, Any)], None)  # type: ignore[misc]
            model = create_model(f"{self.fn_name}_Input", __config__=config, **fields)
        except Exception as e:
            raise WorkflowDefinitionError(
                f"Cannot generate Pydantic model from parameters of '{self.fn_name}': {e}"
            ) from e
        return model, "fields"

    # -- caller side --------------------------------------------------------------------
    def encode_call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """A Python call's arguments as wire data, validated first."""
        if not kwargs and self._by_position and len(args) == len(self.param_names):
            data = dict(zip(self.param_names, args, strict=False))  # what bind() gives such a call
        else:
            try:
                data = dict(self._call_sig.bind(*args, **kwargs).arguments)
            except TypeError as e:
                raise InvalidInputError(f"{self.what} '{self.fn_name}' called with {e}") from e
        if self.mode != "fields":
            return self.encode_input(data.get(self.param_names[0]))
        if self.var_kw:
            data.update(data.pop(self.var_kw, {}))
        return self.encode_input(data)

    def encode_input(self, data: Any) -> Any:
        """Validate caller-supplied input and return it as JSON-like data: an object keyed
        by parameter name, or for a single model (or union of models) the model's own
        data, as the workflows page shows."""
        model = self._validate(self._normalize(data))
        return _wire(lambda: model.model_dump(mode="json"), model, self._input_error)

    def _input_error(self, why: str) -> RillflowError:
        return InvalidInputError(f"invalid input for {self.what} '{self.fn_name}': {why}")

    def _result_error(self, why: str) -> RillflowError:
        return InvalidResultError(f"the result of {self.what} '{self.fn_name}' cannot be stored: {why}")

    # -- callee side --------------------------------------------------------------------
    def decode_input(self, data: Any) -> list[Any]:
        """Wire data as the positional arguments of the call."""
        return self.decode_call(data)[0]

    def decode_call(self, data: Any) -> tuple[list[Any], dict[str, Any]]:
        """Wire data as the call's positional arguments, and the keys beyond its
        parameters for a function that takes ``**kwargs``."""
        model = self._validate(self._normalize(data))
        if self.mode == "model":
            return [model], {}
        if self.mode == "union":
            return [model.root], {}  # type: ignore[attr-defined]
        return [getattr(model, p.name) for p in self.params], dict(model.model_extra or {})

    def _normalize(self, data: Any) -> Any:
        if isinstance(data, BaseModel) and self.mode == "fields":
            return data.model_dump()
        return self.shape.normalize(data)

    def _validate(self, data: Any) -> BaseModel:
        try:
            return self.input_model.model_validate(data)
        except ValidationError as e:
            raise InvalidInputError(
                f"invalid input for {self.what} '{self.fn_name}': {validation_summary(e)}"
            ) from e

    # -- results ------------------------------------------------------------------------
    def dump_result(self, value: Any) -> Any:
        """The value checked against the return annotation, as JSON-like data: a wrong
        result is caught where it is produced, not where it is read."""
        try:
            checked = self.result_adapter.validate_python(value)
        except ValidationError as e:
            raise InvalidResultError(
                f"the result of {self.what} '{self.fn_name}' does not match its return annotation "
                f"{_type_name(self.return_type)}: {validation_summary(e)}"
            ) from e
        return _wire(
            lambda: self.result_adapter.dump_python(checked, mode="json"),
            checked,
            self._result_error,
            "(result)",
        )

    def dump_unchecked(self, value: Any) -> Any:
        """A value that does not match its annotation, as JSON-like data all the same;
        InvalidResultError if even that cannot be encoded."""
        return _wire(lambda: to_jsonable_python(value), value, self._result_error, "(result)")

    def load_result(self, data: Any) -> Any:
        return self.result_adapter.validate_python(data)

    def load_result_leniently(self, data: Any) -> Any:
        """The declared type when the stored data is one, else the data as stored: a
        workflow may have completed with a result its annotation does not describe."""
        try:
            return self.result_adapter.validate_python(data)
        except ValidationError:
            return data

    # -- schemas, as a console renders a form ---------------------------------------------
    def input_schema(self) -> dict[str, Any]:
        return self.input_model.model_json_schema()

    def output_schema(self) -> dict[str, Any] | None:
        if self.return_type is type(None) or self.return_type is None:
            return None
        return self.result_adapter.json_schema()


def _type_name(tp: Any) -> str:
    return tp.__name__ if isinstance(tp, type) else repr(tp).replace("typing.", "")


def validation_summary(e: ValidationError, root: str | None = "(input)") -> str:
    """A pydantic error on one line: each field path and what is wrong with it (an error
    of the whole value: under ``root``, or alone if None)."""
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err.get("loc", ())) or root
        msg = str(err.get("msg")).removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def to_wire(value: Any, what: str) -> Any:
    """Input given without its types (a start or a handler call by name, the CLI's
    ``--input``) as wire data: converted as pydantic's JSON mode converts an ``Any``
    field, so by name and by class agree (``Decimal`` -> its exact string, UTF-8
    ``bytes`` -> text, datetimes -> ISO 8601, tuples and sets -> lists, models -> their
    JSON data), and checked to be encodable. Otherwise :class:`InvalidInputError` naming
    the path, with nothing sent."""
    return _wire(
        lambda: to_jsonable_python(value),
        value,
        lambda why: InvalidInputError(f"invalid input for {what}: {why}"),
    )


def _wire(
    dump: Callable[[], Any], source: Any, fail: Callable[[str], RillflowError], root: str = "(input)"
) -> Any:
    """``dump()`` if it succeeds and msgpack can encode it; else ``fail`` with the first
    path that cannot go on the wire and why. The encoder is the fast check; the walk
    that finds the path runs only when it refuses."""
    try:
        data = dump()
    except (ValueError, TypeError) as e:  # a serializer error, undecodable bytes
        raise fail(_where(source, e, root)) from None
    try:
        pack(data)
    except (ValueError, TypeError, OverflowError) as e:
        raise fail(_where(data, e, root)) from None
    return data


def _where(value: Any, e: Exception, root: str) -> str:
    found = problem(value)
    if found is None:  # the walk missed what the encoder saw: say what it said
        return f"{root}: cannot be encoded: {type(e).__name__}: {safe_text(str(e))}"
    path, why = found
    return f"{'.'.join(safe_text(str(x)) for x in path) or root}: {why}"


def problem(value: Any, path: tuple[Any, ...] = ()) -> tuple[tuple[Any, ...], str] | None:
    """The first place in ``value`` that cannot go on the wire, and why with what to do
    instead; None if there is none."""
    if len(path) > MAX_DEPTH:
        return path[:3], f"the data is nested more than {MAX_DEPTH} levels deep (or contains itself)"
    if value is None or isinstance(value, bool | float):
        return None
    if isinstance(value, int):
        if INT_MIN <= value <= INT_MAX:
            return None
        return path, (
            f"the integer {value} does not fit in 64 bits (the wire carries {INT_MIN} to {INT_MAX}): "
            "send it as a string (declare the field `str`, or `Decimal`, which travels as a string)"
        )
    if isinstance(value, str):
        try:
            value.encode()
        except UnicodeEncodeError as e:
            return path, (
                f"the string has a lone surrogate {value[e.start]!r} at position {e.start}, which is not "
                "valid Unicode (bytes decoded with errors='surrogateescape', such as a file name, "
                "produce them): decode the original bytes with their real encoding, or send binary "
                "data base64-encoded"
            )
        return None
    if isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value)
        try:
            raw.decode()
        except UnicodeDecodeError:
            return path, (
                f"bytes that are not UTF-8 text ({raw[:16]!r}{'...' if len(raw) > 16 else ''}); bytes "
                "travel as UTF-8 text: send binary data base64-encoded (declare the field "
                "`pydantic.Base64Bytes`), or pass a reference to it"
            )
        return None
    if isinstance(value, RootModel):
        return problem(value.root, path)
    if isinstance(value, BaseModel):
        return problem(dict(value), path)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return problem({f.name: getattr(value, f.name) for f in dataclasses.fields(value)}, path)
    if isinstance(value, Mapping):
        for k, v in value.items():
            if isinstance(k, str) and (found := problem(k, path)):
                return (*path, k), f"the key is not valid text: {found[1]}"
            if found := problem(v, (*path, k)):
                return found
        return None
    if isinstance(value, list | tuple | set | frozenset):
        for i, v in enumerate(value):
            if found := problem(v, (*path, i)):
                return found
        return None
    try:
        converted = to_jsonable_python(value)
    except Exception:
        return path, (
            f"a {type(value).__qualname__} is not JSON data: convert it to a str, a number, a list "
            "or a dict, or declare a pydantic model for it"
        )
    return problem(converted, path)


def check_size(encoded: bytes, limit: int, what: str) -> None:
    if len(encoded) > limit:
        raise PayloadTooLargeError(
            f"{what} is {len(encoded)} bytes, over the limit of {limit} bytes; "
            "pass a reference (a key or URL) to large data instead of the data itself"
        )
