"""Price cards and the rating of one usage event. Pure logic: no Kafka, no warehouse.

Price cards are YAML files (``config/price_cards/*.yaml``, format in that directory's
README.md). One file is one version of the card, in force from its ``effective_from``
(timezone-aware) until the next version's. ``load_cards`` reads and validates them into a
``PriceBook``; a bad file raises ``PriceCardError`` whose message names the file and the
YAML path of each bad setting (``default.yaml: lines[3].prices.output: must be >= 0``).

Rating one event (``PriceBook.rate``)
-------------------------------------
* Version: the card in force at the event's own ``event_time`` (a card is in force from
  its ``effective_from`` inclusive). An event before the first card is unpriced.
* Line: the first line that matches, in this order:
  ``(serving_carrier, model_id)`` > ``(serving_carrier, *)`` > ``(*, model_id)`` > ``(*, *)``.
  No match means unpriced: an event is never silently priced at zero.
* Token classes: each token is billed in exactly one class. ``input_tokens`` counts the
  whole prompt and ``cached_tokens`` the part of it served from the context cache (as
  the OpenAI and DeepSeek APIs report it, and as ``tokenmeter simulate`` produces it), so
  class ``input`` is ``input_tokens - cached_tokens`` and class ``cached_input`` is
  ``cached_tokens``; ``output_tokens`` (visible output) and ``reasoning_tokens`` (thinking
  output) are separate counts. An event with ``cached_tokens > input_tokens`` is unpriced
  (``cached_exceeds_input``). A line prices each class in CNY per million tokens;
  ``cached_input`` defaults to the line's ``input`` price, ``reasoning`` to ``output``.
* Token Units (TU): the unified measure that quotas and tiers count. One token of class
  ``c`` of model ``m`` is worth ``token_unit_factor(m) * class_weight(c)`` TU. The factor
  is the model's (``models:`` section, carrier-independent, ``*`` = default); class
  weights come from the model, else the card, else 1 (cached_input follows input,
  reasoning follows output).
* Status: the card's ``billable`` policy (default ``ok`` and ``failover`` billable; for a
  failover the event's model_id is the model that answered, so it is billed to that one).
  A non-billable event still gets its ``token_units`` (it measures what was consumed and
  is shown in usage reports) but ``amount = 0`` and ``billable = False``; its TU do not
  count towards the tenant's tier usage (``Rating.tier_usage_tu`` is 0).
* Plan tiers (graduated): the tenant's plan lists ``from_tu`` boundaries with a
  ``discount_percent``. The event's TU are placed after the tenant's usage so far in the
  period, split at the boundaries, and each part's share of the list amount gets its
  tier's discount. ``tenant_plan=None`` means list price; a plan name the card does not
  know means unpriced (a misconfigured tenant must not be charged list price silently).

Rounding: exactly one rounding point per reported number, mode ROUND_HALF_EVEN, to
0.000001 (CNY for ``amount`` and ``list_amount``, TU for ``token_units``). Everything
before it is exact: prices and factors have at most 6 decimal places (4 for discount
percentages), so the arithmetic runs on exact integers (prices in 1e-12 CNY per token,
TU in 1e-12 TU per token) and the one division is rounded half-even. The result is
identical to evaluating the same formulas with unbounded-precision Decimal. The tier
split uses the event's rounded ``token_units`` and the caller's running usage (a sum of
rounded ``token_units``; finer digits are dropped), so re-rating from the warehouse
reproduces it.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import ROUND_FLOOR, Context, Decimal, InvalidOperation
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StringConstraints,
    ValidationError,
)

from pipeline.events import Reason, Rejection, Stage

TOKEN_CLASSES: tuple[str, ...] = ("input", "output", "cached_input", "reasoning")
WILDCARD = "*"
CURRENCY = "CNY"
DEFAULT_CARD_DIR = Path("config/price_cards")

_CTX = Context(prec=60)  # only for int -> Decimal conversion, which is exact anyway
_MICRO = Decimal("0.000001")
_ZERO6 = Decimal("0.000000")
_E6 = 10**6
_E12 = 10**12
_CACHE_LIMIT = 8192  # (version, carrier, model) lookups kept; model_id comes from producers


class PriceCardError(Exception):
    """A price card file is unreadable or invalid. ``errors`` holds one line per problem,
    each ``<file>: <yaml path>: <what is wrong>``; ``str()`` joins them."""

    def __init__(self, errors: Sequence[str]) -> None:
        self.errors: list[str] = list(errors)
        super().__init__("\n".join(self.errors))


# ---- the file format (pydantic) ---------------------------------------------

_Price = Annotated[Decimal, Field(ge=0, max_digits=18, decimal_places=6)]
_Weight = Annotated[Decimal, Field(ge=0, max_digits=12, decimal_places=6)]
_Name = Annotated[str, StringConstraints(min_length=1, max_length=256)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Prices(_Strict):
    """CNY per million tokens, per token class. Unset classes follow input/output."""

    input: _Price
    output: _Price
    cached_input: _Price | None = None
    reasoning: _Price | None = None

    def price(self, token_class: str) -> Decimal:
        """The price of one token class, applying the defaults."""
        if token_class == "cached_input":
            return self.input if self.cached_input is None else self.cached_input
        if token_class == "reasoning":
            return self.output if self.reasoning is None else self.reasoning
        value: Decimal = getattr(self, token_class)
        return value


class ClassWeights(_Strict):
    """TU weight per token class; ``None`` means "not set here"."""

    input: _Weight | None = None
    output: _Weight | None = None
    cached_input: _Weight | None = None
    reasoning: _Weight | None = None


class ModelUnits(_Strict):
    """A model's Token Unit factor and optional per-class weights."""

    token_unit_factor: Annotated[Decimal, Field(gt=0, max_digits=12, decimal_places=6)]
    class_weights: ClassWeights | None = None


class PriceLine(_Strict):
    """Prices for one (serving carrier, model); either may be ``*``."""

    serving_carrier: Literal["CMCC", "CTCC", "CUCC", "*"]
    model_id: _Name
    prices: Prices

    @property
    def label(self) -> str:
        return f"{self.serving_carrier}/{self.model_id}"


class Tier(_Strict):
    """From ``from_tu`` TU of period usage on, ``discount_percent`` off the list price."""

    from_tu: Annotated[Decimal, Field(ge=0, max_digits=24, decimal_places=6)]
    discount_percent: Annotated[Decimal, Field(ge=0, le=100, decimal_places=4)]


class Plan(_Strict):
    """A tenant plan: graduated tiers over the tenant's usage in ``period``."""

    period: Literal["month", "day"] = "month"
    tiers: list[Tier] = Field(default_factory=list)


class BillablePolicy(_Strict):
    """Which statuses are billed."""

    ok: StrictBool = True
    failover: StrictBool = True
    error: StrictBool = False
    timeout: StrictBool = False
    rate_limited: StrictBool = False


class PriceCard(_Strict):
    """One version of the price card (one YAML file)."""

    version: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
    effective_from: AwareDatetime
    currency: Literal["CNY"] = "CNY"
    description: str = ""
    class_weights: ClassWeights = ClassWeights()
    models: dict[_Name, ModelUnits]
    lines: list[PriceLine] = Field(min_length=1)
    plans: dict[_Name, Plan] = Field(default_factory=dict)
    billable: BillablePolicy = BillablePolicy()

    @property
    def effective_from_ms(self) -> int:
        """``effective_from`` as UTC epoch milliseconds."""
        return (self.effective_from - _EPOCH) // timedelta(milliseconds=1)

    def line_for(self, serving_carrier: str, model_id: str) -> PriceLine | None:
        """The line that prices this (carrier, model), by the documented precedence."""
        for key in (
            (serving_carrier, model_id),
            (serving_carrier, WILDCARD),
            (WILDCARD, model_id),
            (WILDCARD, WILDCARD),
        ):
            for line in self.lines:
                if (line.serving_carrier, line.model_id) == key:
                    return line
        return None

    def units_for(self, model_id: str) -> ModelUnits | None:
        """The model's TU entry, or the ``*`` default, or ``None``."""
        return self.models.get(model_id) or self.models.get(WILDCARD)

    def tu_per_token(self, model_id: str) -> dict[str, Decimal] | None:
        """TU one token of each class of this model is worth, or ``None`` if the card has
        no factor for it."""
        units = self.units_for(model_id)
        if units is None:
            return None
        own = units.class_weights or ClassWeights()
        card = self.class_weights

        def weight(cls: str) -> Decimal:
            for source in (own, card):
                value: Decimal | None = getattr(source, cls)
                if value is not None:
                    return value
            if cls == "cached_input":
                return weight("input")
            if cls == "reasoning":
                return weight("output")
            return Decimal(1)

        return {cls: units.token_unit_factor * weight(cls) for cls in TOKEN_CLASSES}


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


# ---- loading ------------------------------------------------------------------


class _CardLoader(yaml.SafeLoader):
    """Safe YAML with exact decimals (``2.4`` is ``Decimal("2.4")``, never a float) and
    duplicate keys refused (plain YAML keeps the last one silently)."""

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # unhashable key; the schema check reports it
                continue
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {key!r} (first on line {first + 1})",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _construct_decimal(loader: Any, node: Any) -> Any:
    text = str(loader.construct_scalar(node)).replace("_", "")
    try:
        return Decimal(text)
    except InvalidOperation:
        return text  # e.g. .inf: the schema check says it is not a finite number


_CardLoader.add_constructor("tag:yaml.org,2002:float", _construct_decimal)

_SIMPLE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _yaml_path(loc: Iterable[Any]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and _SIMPLE_KEY.match(part):
            out += f".{part}" if out else part
        else:
            out += f"[{str(part)!r}]".replace("'", '"')
    return out or "(top level)"


def _message(err: Mapping[str, Any]) -> str:
    kind = err["type"]
    ctx = err.get("ctx") or {}
    messages = {
        "missing": "required setting is missing",
        "extra_forbidden": "unknown setting",
        "greater_than_equal": f"must be >= {ctx.get('ge')}",
        "greater_than": f"must be > {ctx.get('gt')}",
        "less_than_equal": f"must be <= {ctx.get('le')}",
        "decimal_parsing": "must be a number",
        "decimal_type": "must be a number",
        "finite_number": "must be a finite number",
        "decimal_max_places": f"at most {ctx.get('decimal_places')} decimal places",
        "decimal_max_digits": f"at most {ctx.get('max_digits')} digits",
        "decimal_whole_digits": "too many digits before the decimal point",
        "literal_error": f"must be one of {ctx.get('expected')}",
        "timezone_aware": "must be a date-time with a UTC offset, e.g. 2026-01-01T00:00:00+08:00",
        "datetime_type": "must be a date-time with a UTC offset, e.g. 2026-01-01T00:00:00+08:00",
        "datetime_parsing": "must be a date-time with a UTC offset, e.g. 2026-01-01T00:00:00+08:00",
        "datetime_from_date_parsing": "must be a date-time with a UTC offset",
        "bool_type": "must be true or false",
        "dict_type": "must be a mapping",
        "model_type": "must be a mapping",
        "model_attributes_type": "must be a mapping",
        "list_type": "must be a list",
        "string_type": "must be text",
        "too_short": "must not be empty",
        "string_too_short": "must not be empty",
        "string_too_long": f"longer than {ctx.get('max_length')} characters",
        "string_pattern_mismatch": "must be 1-64 letters, digits, '.', '_' or '-'",
    }
    return messages.get(kind, str(err["msg"]))


def _cross_check(card: PriceCard) -> list[str]:
    """Rules between settings, which the per-field schema cannot express."""
    errors = []
    first: dict[tuple[str, str], int] = {}
    for i, line in enumerate(card.lines):
        key = (line.serving_carrier, line.model_id)
        if key in first:
            errors.append(
                f"lines[{i}]: duplicate line for serving_carrier {key[0]}, model_id {key[1]} "
                f"(first at lines[{first[key]}])"
            )
        first.setdefault(key, i)
        if card.units_for(line.model_id) is None:
            fix = 'a models["*"] default'
            if line.model_id != WILDCARD:
                fix = f"{_yaml_path(('models', line.model_id))} or {fix}"
            errors.append(
                f"lines[{i}].model_id: no token_unit_factor for {line.model_id!r}; add {fix}"
            )
    for name, plan in card.plans.items():
        for k in range(1, len(plan.tiers)):
            if plan.tiers[k].from_tu <= plan.tiers[k - 1].from_tu:
                errors.append(
                    f"{_yaml_path(('plans', name, 'tiers', k, 'from_tu'))}: must be greater "
                    f"than the previous tier's from_tu ({plan.tiers[k - 1].from_tu})"
                )
    return errors


def load_card_file(path: Path) -> PriceCard:
    """Read and validate one price card file. Raises ``PriceCardError``."""
    name = path.name
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PriceCardError([f"{name}: cannot read: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError:
        raise PriceCardError([f"{name}: not UTF-8 text"]) from None
    try:
        data = yaml.load(text, Loader=_CardLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise PriceCardError([f"{name}: {where}{exc.problem}"]) from None
    except yaml.YAMLError as exc:
        raise PriceCardError([f"{name}: not valid YAML: {exc}"]) from None
    if not isinstance(data, dict):
        raise PriceCardError([f"{name}: (top level): must be a mapping of settings"])
    try:
        card = PriceCard.model_validate(data)
    except ValidationError as exc:
        raise PriceCardError(
            [f"{name}: {_yaml_path(err['loc'])}: {_message(err)}" for err in exc.errors()]
        ) from None
    problems = _cross_check(card)
    if problems:
        raise PriceCardError([f"{name}: {p}" for p in problems])
    return card


def _card_files(paths_or_dir: str | Path | Iterable[str | Path]) -> list[Path]:
    if isinstance(paths_or_dir, str | Path):
        paths_or_dir = [paths_or_dir]
    files: list[Path] = []
    for item in paths_or_dir:
        path = Path(item)
        if path.is_dir():
            found = sorted([*path.glob("*.yaml"), *path.glob("*.yml")])
            if not found:
                raise PriceCardError([f"{path}: no price card files (*.yaml) in this directory"])
            files.extend(found)
        elif path.exists():
            files.append(path)
        else:
            raise PriceCardError([f"{path}: no such file or directory"])
    return files


def load_cards(paths_or_dir: str | Path | Iterable[str | Path]) -> PriceBook:
    """Load price cards from a directory (every ``*.yaml``/``*.yml`` in it), a file, or a
    list of either. Every file is checked and all problems are reported together in one
    ``PriceCardError``; versions and effective_from instants must be unique."""
    errors: list[str] = []
    loaded: list[tuple[PriceCard, Path]] = []
    for path in _card_files(paths_or_dir):
        try:
            loaded.append((load_card_file(path), path))
        except PriceCardError as exc:
            errors.extend(exc.errors)
    if errors:
        raise PriceCardError(errors)
    return PriceBook([card for card, _ in loaded], [path for _, path in loaded])


# ---- rating -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Rating:
    """A priced event. Amounts in CNY and TU rounded once to 0.000001, half-even.

    ``amount`` is what the tenant pays (after plan tiers, 0 if not billable);
    ``list_amount`` the same event at the card's list price (before plan discounts, 0 if
    not billable); ``price_line`` names the line used, e.g. ``CMCC/*``.
    """

    token_units: Decimal
    amount: Decimal
    list_amount: Decimal
    billable: bool
    price_card_version: str
    price_line: str
    currency: str = CURRENCY

    @property
    def tier_usage_tu(self) -> Decimal:
        """TU to add to the tenant's period usage for the next event's tier split."""
        return self.token_units if self.billable else _ZERO6


@dataclass(frozen=True, slots=True)
class Unpriced:
    """The event cannot be priced. ``reason`` is one of ``no_price_card``,
    ``no_price_line``, ``unknown_plan``, ``unknown_status``, ``cached_exceeds_input``;
    ``detail`` is a sentence."""

    reason: str
    detail: str
    price_card_version: str | None = None

    def to_rejection(self) -> Rejection:
        """As a dead-letter rejection (reason ``unpriced``, stage ``rate``)."""
        return Rejection(Reason.UNPRICED, Stage.RATE, self.detail)


# tiers compiled: ((start in micro-TU, kept fraction in 1e-6, start in TU), ...), the first
# starting at 0; the Decimal start lets the common case skip converting the usage
_Tiers = tuple[tuple[int, int, Decimal], ...]
_NO_TIERS: _Tiers = ((0, _E6, Decimal(0)),)


@dataclass(frozen=True, slots=True)
class _Resolved:
    """One (version, carrier, model), ready for arithmetic: integer prices in 1e-12 CNY
    per token and integer TU in 1e-12 TU per token, by class."""

    version: str
    label: str
    p_in: int
    p_out: int
    p_cached: int
    p_reason: int
    w_in: int
    w_out: int
    w_cached: int
    w_reason: int
    billable: dict[str, bool]
    plans: dict[str, _Tiers]


def _compile_tiers(plan: Plan) -> _Tiers:
    tiers = [
        (int(t.from_tu.scaleb(6)), _E6 - int(t.discount_percent.scaleb(4)), t.from_tu)
        for t in plan.tiers
    ]
    if all(keep == _E6 for _, keep, _ in tiers):
        return _NO_TIERS  # no discount anywhere: the fast path
    if tiers[0][0] > 0:
        tiers.insert(0, _NO_TIERS[0])
    return tuple(tiers)


def _div_half_even(num: int, den: int) -> int:
    """``num / den`` rounded half-even to an integer (num >= 0, den > 0)."""
    q, r = divmod(num, den)
    twice = 2 * r
    if twice > den or (twice == den and q & 1):
        q += 1
    return q


def _split(usage_micro: int, tu_micro: int, tiers: _Tiers) -> list[tuple[int, int]]:
    """The parts of [usage, usage + tu) in each tier: ``[(micro-TU, kept fraction)]``."""
    end = usage_micro + tu_micro
    parts = []
    for j, (start, keep, _) in enumerate(tiers):
        stop = tiers[j + 1][0] if j + 1 < len(tiers) else end
        lo, hi = max(usage_micro, start), min(end, stop)
        if hi > lo:
            parts.append((hi - lo, keep))
    return parts


def _to_micro(value: Decimal | int) -> int:
    if isinstance(value, int):
        micro = value * _E6
    else:
        micro = int(value.scaleb(6, _CTX).to_integral_value(ROUND_FLOOR, _CTX))
    if micro < 0:
        raise ValueError(f"period usage must be >= 0, got {value}")
    return micro


def _tiered(
    list_pico: int, tu_micro: int, token_units: Decimal, usage: Decimal | int, tiers: _Tiers
) -> int:
    """The amount in micro-CNY after graduated discounts, rounded once."""
    if usage < 0:
        raise ValueError(f"period usage must be >= 0, got {usage}")
    j = len(tiers) - 1
    while tiers[j][2] > usage:
        j -= 1
    if j + 1 == len(tiers) or _CTX.add(usage, token_units) <= tiers[j + 1][2]:
        return _div_half_even(list_pico * tiers[j][1], _E12)  # all in one tier
    kept = sum(part * keep for part, keep in _split(_to_micro(usage), tu_micro, tiers))
    return _div_half_even(list_pico * kept, tu_micro * _E12)


def split_across_tiers(
    usage_before_tu: Decimal | int, token_units: Decimal | int, tiers: Sequence[Tier]
) -> list[tuple[Decimal, Decimal]]:
    """Graduated tiers as a pure function: the parts of ``token_units`` placed after
    ``usage_before_tu``, per tier, as ``[(tu in tier, discount_percent)]`` in tier order
    (only non-empty parts). Usage below the first ``from_tu`` has no discount."""
    compiled = _compile_tiers(Plan(tiers=list(tiers)))
    parts = _split(_to_micro(usage_before_tu), _to_micro(token_units), compiled)
    return [
        (_CTX.multiply(tu, _MICRO), _CTX.multiply(_E6 - keep, Decimal("0.0001")))
        for tu, keep in parts
    ]


class PriceBook:
    """All versions of the price card, ordered by ``effective_from``.

    ``rate`` is the hot path: the card is found by bisection, the line by a cache keyed
    by (version, serving_carrier, model_id), and the arithmetic is on integers.
    """

    def __init__(self, cards: Sequence[PriceCard], sources: Sequence[Path] | None = None) -> None:
        """``sources`` (one path per card) only serve error messages and ``prices show``.
        Raises ``PriceCardError`` if a card breaks a cross-setting rule, or two cards share
        a version or an effective_from instant."""
        names = [p.name for p in sources] if sources is not None else [c.version for c in cards]
        order = sorted(range(len(cards)), key=lambda i: cards[i].effective_from_ms)
        self.cards: tuple[PriceCard, ...] = tuple(cards[i] for i in order)
        self.sources: dict[str, Path] = {}
        if sources is not None:
            self.sources = {cards[i].version: sources[i] for i in order}
        errors = [f"{names[i]}: {p}" for i in order for p in _cross_check(cards[i])]
        by_version: dict[str, int] = {}
        for i in order:
            if cards[i].version in by_version:
                first = by_version[cards[i].version]
                errors.append(
                    f"{names[i]}: version: {cards[i].version!r} is already used by {names[first]}"
                )
            by_version.setdefault(cards[i].version, i)
        for a, b in zip(order, order[1:], strict=False):
            if cards[a].effective_from_ms == cards[b].effective_from_ms:
                errors.append(
                    f"{names[b]}: effective_from: same instant as {names[a]} "
                    f"({cards[a].effective_from.isoformat()})"
                )
        if errors:
            raise PriceCardError(errors)
        self._starts: list[int] = [card.effective_from_ms for card in self.cards]
        self._runtime: list[tuple[dict[str, bool], dict[str, _Tiers]]] = [
            (card.billable.model_dump(), {n: _compile_tiers(p) for n, p in card.plans.items()})
            for card in self.cards
        ]
        self._cache: dict[tuple[int, str, str], _Resolved | Unpriced] = {}

    @property
    def versions(self) -> list[str]:
        return [card.version for card in self.cards]

    @property
    def starts_ms(self) -> list[int]:
        """Each version's ``effective_from`` in UTC epoch ms, ascending (``cards`` order)."""
        return list(self._starts)

    def resolved(self, index: int, carrier: str, model: str) -> _Resolved | Unpriced:
        """The integer terms (prices, TU weights, billable policy, compiled plans) for
        ``(card index, serving_carrier, model_id)``, or ``Unpriced`` (``no_price_line``):
        what ``rate`` uses, from the same cache. For callers that rate many events."""
        res = self._cache.get((index, carrier, model))
        return res if res is not None else self._resolve(index, carrier, model)

    def card_at(self, event_time_ms: int) -> PriceCard | None:
        """The version in force at this UTC epoch-ms instant, or ``None`` before the first."""
        i = bisect_right(self._starts, event_time_ms) - 1
        return self.cards[i] if i >= 0 else None

    def _resolve(self, index: int, carrier: str, model: str) -> _Resolved | Unpriced:
        card = self.cards[index]
        line = card.line_for(carrier, model)
        tu = card.tu_per_token(model)
        result: _Resolved | Unpriced
        if line is None or tu is None:
            result = Unpriced(
                "no_price_line",
                f"no price line for serving_carrier {carrier}, model_id {model!r} in price "
                f"card {card.version} (tried {carrier}/{model}, {carrier}/*, */{model}, */*)",
                card.version,
            )
        else:
            p = {cls: int(line.prices.price(cls).scaleb(6)) for cls in TOKEN_CLASSES}
            w = {cls: int(tu[cls].scaleb(12)) for cls in TOKEN_CLASSES}
            billable, plans = self._runtime[index]
            result = _Resolved(
                card.version,
                line.label,
                p["input"],
                p["output"],
                p["cached_input"],
                p["reasoning"],
                w["input"],
                w["output"],
                w["cached_input"],
                w["reasoning"],
                billable,
                plans,
            )
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[(index, carrier, model)] = result
        return result

    def rate(
        self,
        record: Mapping[str, Any],
        tenant_plan: str | None = None,
        period_usage_tu_before: Decimal | int = 0,
    ) -> Rating | Unpriced:
        """Price one validated record (events.py shape: ``event_time`` in UTC epoch ms).

        ``tenant_plan`` names the tenant's plan on the card (``None``: list price);
        ``period_usage_tu_before`` is the tenant's billable TU in the plan's period before
        this event (the caller keeps it, adding ``Rating.tier_usage_tu`` after each event).
        Returns a ``Rating``, or ``Unpriced`` saying why not.
        """
        event_time = record["event_time"]
        index = bisect_right(self._starts, event_time) - 1
        if index < 0:
            return Unpriced(
                "no_price_card",
                f"event_time {event_time} ms is before the first price card "
                f"({self.cards[0].version}, effective {self.cards[0].effective_from.isoformat()})"
                if self.cards
                else "no price cards are loaded",
            )
        carrier = record["serving_carrier"]
        model = record["model_id"]
        res = self._cache.get((index, carrier, model))
        if res is None:
            res = self._resolve(index, carrier, model)
        if isinstance(res, Unpriced):
            return res
        billable = res.billable.get(record["status"])
        if billable is None:
            return Unpriced(
                "unknown_status",
                f"status {record['status']!r} has no billable policy",
                res.version,
            )
        if tenant_plan is None:
            tiers = _NO_TIERS
        else:
            found = res.plans.get(tenant_plan)
            if found is None:
                return Unpriced(
                    "unknown_plan",
                    f"tenant plan {tenant_plan!r} is not on price card {res.version}",
                    res.version,
                )
            tiers = found
        n_cached = record["cached_tokens"]
        n_in = record["input_tokens"] - n_cached  # input_tokens includes the cached part
        if n_in < 0:
            return Unpriced(
                "cached_exceeds_input",
                f"cached_tokens {n_cached} is more than input_tokens {record['input_tokens']}",
                res.version,
            )
        n_out = record["output_tokens"]
        n_reason = record["reasoning_tokens"]
        tu_pico = n_in * res.w_in + n_out * res.w_out + n_cached * res.w_cached
        tu_pico += n_reason * res.w_reason
        tu_micro = _div_half_even(tu_pico, _E6)
        token_units = _CTX.multiply(tu_micro, _MICRO)
        if not billable:
            return Rating(token_units, _ZERO6, _ZERO6, False, res.version, res.label)
        list_pico = n_in * res.p_in + n_out * res.p_out + n_cached * res.p_cached
        list_pico += n_reason * res.p_reason
        list_amount = _CTX.multiply(_div_half_even(list_pico, _E6), _MICRO)
        if tiers is _NO_TIERS:
            amount = list_amount
        else:
            amount = _CTX.multiply(
                _tiered(list_pico, tu_micro, token_units, period_usage_tu_before, tiers), _MICRO
            )
        return Rating(token_units, amount, list_amount, True, res.version, res.label)


def price_lines_rows(book: PriceBook) -> list[dict[str, Any]]:
    """One row per version, price line and token class, for the ``price_cards`` table.

    ``unit_price_per_million`` is the class's CNY price per million tokens (defaults
    applied); ``token_unit_factor`` is TU per token of that class for the line's model
    (model factor x class weight). For a ``*`` model line that is the ``*`` default's
    value; a model with its own ``models`` entry uses its own factor when that line
    prices it.
    """
    rows = []
    for card in book.cards:
        for line in card.lines:
            tu = card.tu_per_token(line.model_id)
            if tu is None:  # PriceBook refuses such a card; this keeps mypy honest
                raise PriceCardError([f"{card.version}: lines: {line.label} has no TU factor"])
            for cls in TOKEN_CLASSES:
                rows.append(
                    {
                        "price_card_version": card.version,
                        "effective_from": card.effective_from,
                        "serving_carrier": line.serving_carrier,
                        "model_id": line.model_id,
                        "token_class": cls,
                        "unit_price_per_million": line.prices.price(cls),
                        "token_unit_factor": tu[cls],
                    }
                )
    return rows
