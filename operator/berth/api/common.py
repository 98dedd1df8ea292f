"""Building blocks shared by the Berth API models.

Every model here doubles as the source of a CRD schema (see ``crdgen``):
field docstrings become the ``description`` that ``kubectl explain`` prints,
``Field`` constraints become OpenAPI constraints, and ``x-kubernetes-validations``
entries (CEL) carry the cross-field rules.  Each CEL rule has a Python twin in a
validator, so ``model_validate`` refuses what the API server refuses.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from berth.allocator.ranges import MAX_PORT, MIN_PORT

GROUP = "berth.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

#: DNS-1123 label (what Kubernetes requires of container and port names).
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
#: A name that starts with a letter: role and block names end up in env
#: documentation, pod names and ConfigMap keys.
LOWER_NAME = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
#: Env var names Berth injects: the portable C-identifier form, because the
#: names are also used as ``$(NAME)`` references in container args and as
#: ConfigMap keys.
ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"
#: Env var names a user may put in a container (Kubernetes' classic rule).
USER_ENV_NAME = r"^[-._a-zA-Z][-._a-zA-Z0-9]*$"
#: Engine versions: ``0.11``, ``0.11.1``, ``v0.11.1``, ``0.11.1rc1``, ``0.11.1-dev``.
VERSION_PATTERN = r"^v?[0-9]+\.[0-9]+(\.[0-9]+)?([-+.]?[0-9A-Za-z][-0-9A-Za-z.]*)?$"


def cel(
    rule: str,
    message: str,
    *,
    field_path: str | None = None,
    reason: str | None = None,
) -> dict[str, str]:
    """One ``x-kubernetes-validations`` entry."""
    entry = {"rule": rule, "message": message}
    if field_path is not None:
        entry["fieldPath"] = field_path
    if reason is not None:
        entry["reason"] = reason
    return entry


def validations(*rules: dict[str, str]) -> dict[str, Any]:
    """``json_schema_extra`` carrying CEL rules (for ``model_config`` or ``Field``)."""
    return {"x-kubernetes-validations": list(rules)}


class ApiModel(BaseModel):
    """Base of every spec model: camelCase on the wire, strict about unknown keys.

    The API server prunes unknown fields before the operator sees an object,
    so ``extra="forbid"`` only bites on hand-written input (tests, the CLI),
    where a typo should be an error rather than silently ignored.
    """

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_attribute_docstrings=True,
        validate_default=False,
        frozen=False,
    )


class OpenModel(ApiModel):
    """A model that keeps fields it does not declare (``x-kubernetes-preserve-unknown-fields``).

    Used for the parts of the pod template Berth passes through to the Pod
    untouched: the API server validates the real Pod when the operator
    creates it.
    """

    model_config = ConfigDict(extra="allow")


class StatusModel(ApiModel):
    """Status is written by the operator: be lenient when reading it back."""

    model_config = ConfigDict(extra="ignore")


Port = Annotated[int, Field(ge=MIN_PORT, le=MAX_PORT)]
EnvName = Annotated[str, Field(min_length=1, max_length=128, pattern=ENV_NAME)]


class ResourceObject(BaseModel):
    """A whole object as kopf or the API server delivers it: metadata stays a
    dict, status is optional, unknown fields are ignored."""

    model_config = ConfigDict(populate_by_name=True, extra="ignore")

    api_version: str = Field(API_VERSION, alias="apiVersion")
    metadata: dict[str, Any] = Field(default_factory=dict)

    @property
    def name(self) -> str:
        return str(self.metadata.get("name", ""))
