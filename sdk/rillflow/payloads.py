"""How a function's parameters and return value become data on the wire, and back.

One set of rules for entrypoints and activities (and, later, signal, query and update
handlers): the input is a JSON object keyed by parameter name, defaults applied and
unknown keys refused; a single pydantic model parameter is the input itself, its fields
at the top level. Values are pydantic's JSON-mode dump, validated back into the
declared types on the way in.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError, create_model

from rillflow.errors import InvalidInputError, WorkflowDefinitionError

DEFAULT_MAX_PAYLOAD_BYTES = 2 * 1024 * 1024


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


class Signature:
    """The input model and result adapter of one callable."""

    def __init__(self, fn: Callable[..., Any], *, what: str, require_annotations: bool) -> None:
        self.fn_name = fn.__name__
        self.what = what
        sig = inspect.signature(fn)
        try:
            hints = typing.get_type_hints(fn)
        except Exception as e:  # unresolvable forward reference
            raise WorkflowDefinitionError(f"{what} '{self.fn_name}': cannot read annotations: {e}") from e
        self.params: list[inspect.Parameter] = []
        for p in sig.parameters.values():
            if p.name == "self":
                continue
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
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
        self.return_type: Any = hints.get("return", Any)
        self.result_adapter: TypeAdapter[Any] = TypeAdapter(self.return_type)
        self.single_model: type[BaseModel] | None = None
        if len(self.params) == 1 and _is_model(hints.get(self.params[0].name)):
            self.single_model = hints[self.params[0].name]
            self.input_model: type[BaseModel] = self.single_model
        else:
            fields: dict[str, Any] = {}
            for p in self.params:
                default = ... if p.default is inspect.Parameter.empty else p.default
                fields[p.name] = (hints.get(p.name, Any), default)
            try:
                self.input_model = create_model(
                    f"{self.fn_name}_Input",
                    __config__=ConfigDict(extra="forbid", arbitrary_types_allowed=False),
                    **fields,
                )
            except Exception as e:
                raise WorkflowDefinitionError(
                    f"Cannot generate Pydantic model from parameters of '{self.fn_name}': {e}"
                ) from e

    # -- caller side --------------------------------------------------------------------
    def encode_call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """A Python call's arguments as wire data, validated first."""
        try:
            bound = inspect.Signature(self.params).bind(*args, **kwargs)
        except TypeError as e:
            raise InvalidInputError(f"{self.what} '{self.fn_name}' called with {e}") from e
        return self.encode_input(dict(bound.arguments))

    def encode_input(self, data: Any) -> Any:
        """Validate caller-supplied input (a mapping by parameter name, a model
        instance, or the model's fields) and return it as JSON-like data."""
        if self.single_model is not None:
            if (
                isinstance(data, dict)
                and set(data) == {self.params[0].name}
                and self.params[0].name not in self.single_model.model_fields
            ):
                data = data[self.params[0].name]
            model = self._validate(data)
            return model.model_dump(mode="json")
        if isinstance(data, BaseModel):
            data = data.model_dump()
        model = self._validate({} if data is None else data)
        return model.model_dump(mode="json")

    # -- callee side --------------------------------------------------------------------
    def decode_input(self, data: Any) -> list[Any]:
        """Wire data as the positional arguments of the call."""
        model = self._validate({} if data is None and self.single_model is None else data)
        if self.single_model is not None:
            return [model]
        return [getattr(model, p.name) for p in self.params]

    def _validate(self, data: Any) -> BaseModel:
        try:
            return self.input_model.model_validate(data)
        except ValidationError as e:
            raise InvalidInputError(f"invalid input for {self.what} '{self.fn_name}': {_describe(e)}") from e

    # -- results ------------------------------------------------------------------------
    def dump_result(self, value: Any) -> Any:
        return self.result_adapter.dump_python(value, mode="json")

    def load_result(self, data: Any) -> Any:
        return self.result_adapter.validate_python(data)


def _describe(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err.get("loc", ())) or "(input)"
        parts.append(f"{loc}: {err.get('msg')}")
    return "; ".join(parts)


def check_size(encoded: bytes, limit: int, what: str) -> None:
    from rillflow.errors import PayloadTooLargeError

    if len(encoded) > limit:
        raise PayloadTooLargeError(
            f"{what} is {len(encoded)} bytes, over the limit of {limit} bytes; "
            "pass a reference (a key or URL) to large data instead of the data itself"
        )
