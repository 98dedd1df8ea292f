"""Turn pydantic's JSON Schema into a Kubernetes *structural* OpenAPI v3 schema.

Structural means: no ``$ref``, every node has a ``type`` (except the two
escape hatches below), no ``anyOf``/``oneOf`` except the int-or-string form,
no ``additionalProperties`` next to ``properties``.  The conversion:

* ``$ref``/``allOf`` to a definition: inlined; the referring field's own keys
  (description, default, CEL rules) win over the definition's.
* ``anyOf: [X, null]`` (an optional field): X, merged with the field's keys.
* ``anyOf: [integer, string]``: ``x-kubernetes-int-or-string: true``.
* ``additionalProperties: true`` (``extra="allow"`` models, ``dict[str, Any]``):
  ``x-kubernetes-preserve-unknown-fields: true``; ``false`` (``extra="forbid"``):
  dropped (the API server prunes unknown fields).
* ``title``, ``examples`` and ``default: null`` dropped; ``const`` becomes a
  one-value ``enum``; descriptions are re-flowed into paragraphs.
"""

from __future__ import annotations

from typing import Any

Schema = dict[str, Any]


class SchemaError(ValueError):
    """The model cannot be expressed as a structural schema."""


_DROP = {"title", "examples", "$defs", "discriminator"}
_INT_OR_STRING = [{"type": "integer"}, {"type": "string"}]


def reflow(text: str) -> str:
    """Join the lines of each paragraph (docstrings wrap at 88 columns)."""
    paragraphs = [" ".join(p.split()) for p in text.strip().split("\n\n")]
    return "\n\n".join(p for p in paragraphs if p)


def structural(schema: Schema) -> Schema:
    """Convert a pydantic ``model_json_schema()`` result (with ``$defs``)."""
    return _convert(schema, schema.get("$defs", {}), "")


def _definition(ref: str, defs: Schema, path: str) -> Schema:
    prefix = "#/$defs/"
    if not ref.startswith(prefix) or ref[len(prefix) :] not in defs:
        raise SchemaError(f"{path or '<root>'}: unresolvable $ref {ref}")
    target: Schema = defs[ref[len(prefix) :]]
    return target


def _convert(node: Schema, defs: Schema, path: str) -> Schema:
    node = dict(node)
    # An optional field: anyOf [X, null] -> X; int | str -> int-or-string.
    if "anyOf" in node:
        branches = [b for b in node.pop("anyOf") if b != {"type": "null"}]
        if node.get("default", ...) is None:
            del node["default"]
        if sorted(branches, key=str) == sorted(_INT_OR_STRING, key=str):
            return _finish(
                {**node, "x-kubernetes-int-or-string": True, "anyOf": list(_INT_OR_STRING)},
                defs,
                path,
            )
        if len(branches) != 1:
            raise SchemaError(f"{path or '<root>'}: a union of {branches} is not structural")
        return _convert(_overlay(branches[0], node), defs, path)
    if "allOf" in node:
        parts = node.pop("allOf")
        if len(parts) != 1:
            raise SchemaError(f"{path or '<root>'}: allOf with {len(parts)} parts")
        return _convert(_overlay(parts[0], node), defs, path)
    if "$ref" in node:
        target = _definition(node.pop("$ref"), defs, path)
        return _convert(_overlay(target, node), defs, path)
    return _finish(node, defs, path)


def _overlay(base: Schema, extra: Schema) -> Schema:
    """``base`` with the referring node's own keys on top (CEL rules add up)."""
    merged = {**base, **extra}
    rules = [*base.get("x-kubernetes-validations", []), *extra.get("x-kubernetes-validations", [])]
    if rules:
        merged["x-kubernetes-validations"] = rules
    return merged


def _finish(node: Schema, defs: Schema, path: str) -> Schema:
    out: Schema = {}
    for key, value in node.items():
        if key in _DROP or (key == "default" and value is None):
            continue
        if key == "const":
            out["enum"] = [value]
        elif key == "description":
            out["description"] = reflow(value)
        elif key == "properties":
            out["properties"] = {
                name: _convert(sub, defs, f"{path}.{name}") for name, sub in value.items()
            }
        elif key == "items":
            out["items"] = _convert(value, defs, f"{path}[*]")
        elif key == "additionalProperties":
            if value is True:
                out["x-kubernetes-preserve-unknown-fields"] = True
            elif isinstance(value, dict):
                out["additionalProperties"] = _convert(value, defs, f"{path}[*]")
            # False: extra="forbid"; the API server prunes unknown fields anyway.
        else:
            out[key] = value
    if "properties" in out and "additionalProperties" in out:
        raise SchemaError(f"{path or '<root>'}: both properties and additionalProperties")
    if "enum" in out and "type" not in out:
        kinds = {type(v) for v in out["enum"]}
        if kinds == {str}:
            out["type"] = "string"
    out = _ordered(out)
    if (
        "type" not in out
        and not out.get("x-kubernetes-int-or-string")
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        raise SchemaError(f"{path or '<root>'}: no type")
    return out


_ORDER = (
    "type",
    "format",
    "description",
    "enum",
    "default",
    "minimum",
    "maximum",
    "minLength",
    "maxLength",
    "pattern",
    "minItems",
    "maxItems",
    "x-kubernetes-int-or-string",
    "anyOf",
    "x-kubernetes-preserve-unknown-fields",
    "required",
    "properties",
    "additionalProperties",
    "items",
    "x-kubernetes-validations",
)


def _ordered(node: Schema) -> Schema:
    """Keys in a fixed, readable order (type and description first)."""
    rank = {key: i for i, key in enumerate(_ORDER)}
    return dict(sorted(node.items(), key=lambda kv: (rank.get(kv[0], len(rank)), kv[0])))


def missing_descriptions(schema: Schema, path: str = "") -> list[str]:
    """Paths of properties without a description (kubectl explain would show nothing)."""
    missing: list[str] = []
    for name, sub in schema.get("properties", {}).items():
        here = f"{path}.{name}"
        if not sub.get("description"):
            missing.append(here)
        missing.extend(missing_descriptions(sub, here))
    if "items" in schema:
        missing.extend(missing_descriptions(schema["items"], f"{path}[*]"))
    if isinstance(schema.get("additionalProperties"), dict):
        missing.extend(missing_descriptions(schema["additionalProperties"], f"{path}[*]"))
    return missing
