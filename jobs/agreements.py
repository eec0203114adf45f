"""Settlement agreements: wholesale rates between carriers and revenue-share splits.

Two YAML files in one directory (default ``config/agreements/``):

* ``wholesale.yaml``: what a serving carrier bills a home carrier for a cross-carrier
  call, as a percentage of the call's list amount (the price card's list price). Rules
  are tried in order, the first whose given keys (``serving_carrier``, ``home_carrier``,
  ``model_id``) all match wins, else ``default_rate_percent``.
* ``revenue_share.yaml``: how a settled amount is split between the serving carrier, the
  model provider and the entry channel (percentages adding up to exactly 100). Rules
  match on ``provider``, ``channel`` and ``serving_carrier``, first match wins, else
  ``default``.

Numbers are read as exact decimals (never floats), at most 4 decimal places. Unknown
settings, duplicate keys, a split not adding up to 100 and unknown carriers are errors;
``AgreementError`` lists them all, each as ``<file>: <yaml path>: <problem>``.

``load_agreements(directory)`` returns both plus ``sha256``, a hash of the two files'
bytes: a settlement id includes it, so editing an agreement makes a new settlement.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

DEFAULT_AGREEMENTS_DIR = Path(__file__).resolve().parents[1] / "config" / "agreements"
WHOLESALE_FILE = "wholesale.yaml"
REVENUE_SHARE_FILE = "revenue_share.yaml"
PARTY_TYPES: tuple[str, ...] = ("serving_carrier", "model_provider", "channel")

Carrier = Literal["CMCC", "CTCC", "CUCC"]
_Percent = Annotated[Decimal, Field(ge=0, le=100, decimal_places=4)]
_Name = Annotated[str, Field(min_length=1, max_length=256)]


class AgreementError(Exception):
    """An agreement file is unreadable or invalid; ``errors`` has one line per problem."""

    def __init__(self, errors: Sequence[str]) -> None:
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WholesaleRule(_Strict):
    """A wholesale rate for the calls it matches (omitted keys match anything)."""

    serving_carrier: Carrier | None = None
    home_carrier: Carrier | None = None
    model_id: _Name | None = None
    rate_percent: _Percent

    def matches(self, serving: str, home: str, model_id: str) -> bool:
        return (
            (self.serving_carrier is None or self.serving_carrier == serving)
            and (self.home_carrier is None or self.home_carrier == home)
            and (self.model_id is None or self.model_id == model_id)
        )


class Wholesale(_Strict):
    """``wholesale.yaml``."""

    version: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
    currency: Literal["CNY"] = "CNY"
    description: str = ""
    default_rate_percent: _Percent
    rules: list[WholesaleRule] = Field(default_factory=list)

    def rate(self, serving: str, home: str, model_id: str) -> Decimal:
        """The rate (percent of the list amount) for a call, first matching rule wins."""
        for rule in self.rules:
            if rule.matches(serving, home, model_id):
                return rule.rate_percent
        return self.default_rate_percent


class Split(_Strict):
    """Percentages of a settled amount per party type; they add up to exactly 100."""

    serving_carrier: _Percent
    model_provider: _Percent
    channel: _Percent

    @model_validator(mode="after")
    def _adds_up(self) -> Split:
        total = self.serving_carrier + self.model_provider + self.channel
        if total != 100:
            raise ValueError(f"shares must add up to 100, not {total}")
        return self

    def items(self) -> list[tuple[str, Decimal]]:
        """``[(party_type, percent)]`` in ``PARTY_TYPES`` order."""
        return [(p, getattr(self, p)) for p in PARTY_TYPES]


class ShareRule(_Strict):
    """A split for the lines it matches (omitted keys match anything)."""

    provider: _Name | None = None
    channel: _Name | None = None
    serving_carrier: Carrier | None = None
    shares: Split

    def matches(self, provider: str, channel: str, serving: str) -> bool:
        return (
            (self.provider is None or self.provider == provider)
            and (self.channel is None or self.channel == channel)
            and (self.serving_carrier is None or self.serving_carrier == serving)
        )


class RevenueShare(_Strict):
    """``revenue_share.yaml``."""

    version: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
    description: str = ""
    default: Split
    rules: list[ShareRule] = Field(default_factory=list)

    def split(self, provider: str, channel: str, serving: str) -> Split:
        """The split for a line, first matching rule wins."""
        for rule in self.rules:
            if rule.matches(provider, channel, serving):
                return rule.shares
        return self.default


@dataclass(frozen=True)
class Agreements:
    """Both agreement files and the hash of their bytes."""

    wholesale: Wholesale
    revenue_share: RevenueShare
    sha256: str
    directory: Path


class _Loader(yaml.SafeLoader):
    """Safe YAML with exact decimals and duplicate keys refused."""

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, str | int) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            if isinstance(key, str | int):
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _decimal(loader: Any, node: Any) -> Any:
    text = str(loader.construct_scalar(node)).replace("_", "")
    try:
        return Decimal(text)
    except InvalidOperation:
        return text


_Loader.add_constructor("tag:yaml.org,2002:float", _decimal)


def _path(loc: Iterable[Any]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def _read(path: Path) -> tuple[Any, bytes]:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise AgreementError([f"{path.name}: cannot read: {exc.strerror or exc}"]) from None
    try:
        data = yaml.load(raw.decode("utf-8"), Loader=_Loader)  # noqa: S506 - SafeLoader subclass
    except UnicodeDecodeError:
        raise AgreementError([f"{path.name}: not UTF-8 text"]) from None
    except yaml.YAMLError as exc:
        raise AgreementError([f"{path.name}: not valid YAML: {exc}"]) from None
    if not isinstance(data, dict):
        raise AgreementError([f"{path.name}: (top level): must be a mapping of settings"])
    return data, raw


def _validate(model: type[BaseModel], data: Any, name: str) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise AgreementError(
            [
                f"{name}: {_path(e['loc'])}: {str(e['msg']).removeprefix('Value error, ')}"
                for e in exc.errors()
            ]
        ) from None


def load_agreements(directory: Path = DEFAULT_AGREEMENTS_DIR) -> Agreements:
    """Read and check ``wholesale.yaml`` and ``revenue_share.yaml`` in ``directory``.

    Raises ``AgreementError`` listing every problem of both files."""
    errors: list[str] = []
    parsed: dict[str, Any] = {}
    digest = hashlib.sha256()
    for name, model in ((WHOLESALE_FILE, Wholesale), (REVENUE_SHARE_FILE, RevenueShare)):
        path = directory / name
        try:
            data, raw = _read(path)
            parsed[name] = _validate(model, data, name)
        except AgreementError as exc:
            errors.extend(exc.errors)
            continue
        digest.update(name.encode() + b"\0" + raw + b"\0")
    if errors:
        raise AgreementError(errors)
    return Agreements(
        wholesale=parsed[WHOLESALE_FILE],
        revenue_share=parsed[REVENUE_SHARE_FILE],
        sha256=digest.hexdigest(),
        directory=directory,
    )
