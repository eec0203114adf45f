"""Synthetic carrier traffic with exact ground truth (``tokenmeter simulate``, the demo, tests).

``Simulation(seed, now_ms).messages(n, dup_rate, bad_rate)`` yields exactly ``n`` Kafka
messages (key = the event's ``tenant_id``, value = Avro single-object bytes) of three
kinds, in a random but reproducible order:

* ``valid``: a usage event that must end up in ``usage_events`` exactly once;
* ``duplicate``: a byte-identical copy of an earlier valid message with the same key
  (a producer retry), emitted after it: the worker must drop it silently;
* ``bad``: something the worker must send to the dead-letter topic, with ``reason`` the
  exact ``Reason`` value it will assign.

Counts are exact: ``round(n * dup_rate)`` duplicates and ``round(n * bad_rate)`` bad
messages (Python's ``round``: a half goes to the even integer), the rest valid. Bad
messages are spread evenly over ``BAD_REASONS``: ``bad // 10`` each, the remainder
``bad % 10`` to distinct, randomly chosen reasons.

About 10 % of calls are cross-carrier (home carrier != serving carrier): both carriers
report such a call, as two valid events with their own event ids and one shared
transaction_id and identical token counts; the second report comes later in the stream.

While the messages are generated, ``Simulation.truth`` accumulates what the pipeline must
report: accepted events and their token sums per reporting carrier, model, status, ...,
dead letters per reason and the number of cross-carrier transactions. The truth is built
from construction, not by re-running the validator; the unit tests check one against the
other.

Everything depends only on ``(seed, now_ms)``: one ``random.Random(seed)`` drives every
choice, and event ids carry a tag derived from both, so two runs with the same seed and a
different ``now_ms`` never collide in the deduplication state. Calling ``messages()``
again continues the same stream (fresh ids; the truth keeps accumulating; duplicates may
copy messages of earlier calls).

Speed (200,000 messages in a few seconds on one core): weighted choices are table
lookups on random bits, and records are encoded by a small Avro encoder written for the
usage_event v1 layout, because ``fastavro.schemaless_writer`` costs more per call than
generating the event does. Its bytes are identical to ``AvroCodec.encode`` (checked at
start-up on sample records, and on every message in the tests); when the codec writes a
schema of another layout, ``AvroCodec.encode`` is used instead. Duplicates and conflicts
are drawn from the latest ``HISTORY`` valid messages, kept as (key, bytes) only.

Nothing here touches Kafka or the network; the only I/O is ``write_truth``.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import json
import math
import os
import random
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist
from typing import Any, TypeVar

from pipeline.events import TOKEN_FIELDS, Reason
from pipeline.serde import MAGIC, V1_LAYOUT, AvroCodec, writer_layout

KIND_VALID = "valid"
KIND_DUPLICATE = "duplicate"
KIND_BAD = "bad"

# The dead-letter reasons the simulation produces, in a fixed order.
BAD_REASONS: tuple[Reason, ...] = (
    Reason.UNDECODABLE,
    Reason.UNKNOWN_SCHEMA,
    Reason.UNKNOWN_ENUM,
    Reason.NEGATIVE_TOKENS,
    Reason.TOO_MANY_TOKENS,
    Reason.FUTURE_EVENT_TIME,
    Reason.TOO_LATE,
    Reason.MISSING_TRANSACTION_ID,
    Reason.INVALID_VALUE,
    Reason.CONFLICTING_DUPLICATE,
)

CARRIER_LIST: tuple[str, ...] = ("CMCC", "CTCC", "CUCC")
WINDOW_MS = 2 * 3600 * 1000  # valid event_time lies in [now - 2 h, now - 1 s]
CROSS_CARRIER_SHARE = 0.10  # share of calls whose home and serving carrier differ
T = TypeVar("T")
HISTORY = 100_000  # duplicates and conflicts copy one of this many latest valid messages

# ---- the world: weights are relative ---------------------------------------------------

_CARRIER_TENANT_SHARE: tuple[tuple[str, int], ...] = (("CMCC", 55), ("CTCC", 25), ("CUCC", 20))

# fmt: off
# mobile number prefixes per carrier (3 digits + 8 digits = an 11-digit number)
_PHONE_PREFIXES: dict[str, tuple[str, ...]] = {
    "CMCC": ("134", "135", "136", "137", "138", "139", "147", "150", "151", "152", "157",
             "158", "159", "178", "182", "183", "184", "187", "188", "198"),
    "CTCC": ("133", "149", "153", "173", "177", "180", "181", "189", "191", "199"),
    "CUCC": ("130", "131", "132", "145", "155", "156", "166", "175", "176", "185", "186"),
}
# fmt: on

# (model_id, provider, popularity, reasoning model?)
MODELS: tuple[tuple[str, str, int, bool], ...] = (
    ("deepseek-v3", "DeepSeek", 25, False),
    ("deepseek-r1", "DeepSeek", 10, True),
    ("qwen-max", "Alibaba", 15, False),
    ("doubao-pro", "ByteDance", 15, False),
    ("kimi-k2", "Moonshot", 8, False),
    ("glm-4.6", "Zhipu", 7, False),
    ("jiutian-13b", "China Mobile", 10, False),
    ("hunyuan-turbo", "Tencent", 5, False),
    ("ernie-4.5", "Baidu", 5, False),
)

CHANNELS: tuple[tuple[str, int], ...] = (
    ("app", 35),
    ("api", 20),
    ("new_calling", 15),
    ("new_messaging", 15),
    ("home_terminal", 10),
    ("business_hall", 5),
)

# timeout / rate_limited / error are failed calls (no output, a smaller input); failover
# was answered by a fallback model (normal tokens, longer latency)
STATUSES: tuple[tuple[str, int], ...] = (
    ("ok", 930),
    ("timeout", 20),
    ("rate_limited", 20),
    ("error", 20),
    ("failover", 10),
)
FAILED_STATUSES = frozenset({"timeout", "rate_limited", "error"})

ROUTING: tuple[tuple[str | None, int], ...] = (
    ("cost_first", 30),
    ("balanced", 30),
    ("quality_first", 20),
    (None, 20),
)

# fmt: off
# ISO 3166-2:CN province codes, weighted roughly by population
REGIONS: tuple[tuple[str, int], ...] = (
    ("CN-GD", 12), ("CN-SD", 10), ("CN-HA", 9), ("CN-JS", 8), ("CN-SC", 8), ("CN-HE", 7),
    ("CN-ZJ", 6), ("CN-HN", 6), ("CN-HB", 6), ("CN-AH", 6), ("CN-GX", 5), ("CN-YN", 5),
    ("CN-JX", 4), ("CN-LN", 4), ("CN-FJ", 4), ("CN-SN", 4), ("CN-GZ", 4), ("CN-SX", 3),
    ("CN-CQ", 3), ("CN-HL", 3), ("CN-XJ", 3), ("CN-GS", 2), ("CN-SH", 2), ("CN-JL", 2),
    ("CN-BJ", 2), ("CN-NM", 2), ("CN-TJ", 1), ("CN-HI", 1), ("CN-NX", 1), ("CN-QH", 1),
    ("CN-XZ", 1),
)
# fmt: on
_GATEWAYS_PER_REGION = 8

# optional free labels: (key, possible values); one label on 1 call in 8
_ATTRIBUTES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("app_version", ("5.1.0", "5.2.1", "5.3.0", "6.0.0-beta")),
    ("scene", ("customer_service", "summary", "translation", "coding", "search", "chat")),
    ("terminal_model", ("ZXV10-B866", "HG680-KA", "EC6110-T", "Q21")),
    ("campaign", ("spring-2026", "5g-new-calling", "ai-pass-trial")),
    ("lang", ("zh-CN", "en", "yue")),
)

# wrong values for the unknown_enum dead letters: (field, value)
_UNKNOWN_ENUMS: tuple[tuple[str, str], ...] = (
    ("reporting_carrier", "XXCC"),
    ("home_carrier", "CBN"),  # China Broadnet: a fourth carrier, not in the enum
    ("serving_carrier", "CBN"),
    ("status", "maybe"),
    ("status", "cancelled"),
    ("source", "satellite"),
    ("routing_policy", "latency_first"),
)


_BITS = 12
_LEVELS = 1 << _BITS  # slots per choice table: a weighted choice is table[12 random bits]
_MASK = _LEVELS - 1


def _table(pairs: tuple[tuple[T, int], ...]) -> tuple[T, ...]:
    """A weighted choice as a table of ``_LEVELS`` slots, each item in proportion to its
    weight (slot i holds the item whose cumulative weight covers (i + 0.5) / levels)."""
    cum: list[float] = []
    total = 0.0
    for _, weight in pairs:
        total += weight
        cum.append(total)
    return tuple(
        pairs[bisect.bisect_right(cum, (i + 0.5) / _LEVELS * total)][0] for i in range(_LEVELS)
    )


def _share(p: float) -> int:
    """A probability as a threshold on 12 random bits: ``bits < _share(p)``."""
    return round(p * _LEVELS)


_NO_REGION_SHARE = _share(0.05)  # events without a region
_HOME_REGION_SHARE = _share(0.05 + 0.85)  # events in the tenant's own province
_NO_LATENCY_SHARE = _share(0.03)  # events without latency_ms
_CACHED_SHARE = _share(0.30)  # successful calls with a context-cache hit


@dataclass(frozen=True, slots=True)
class _Tenant:
    tenant_id: str
    key: bytes
    home: str
    region: str
    prefixes: tuple[str, ...]
    pool: int  # number of subscribers
    base: int  # offset of this tenant's subscribers in the 8-digit number space


# ---- Avro binary encoding ------------------------------------------------------------

_VARINT_TABLE: list[bytes] = []  # varint of every zig-zagged value below 2**16, lazily
_CACHE_MAX = 100_000  # encoded strings kept (labels that repeat: tenants, gateways, ...)


def _varint(z: int) -> bytes:
    """The Avro varint of a non-negative (already zig-zagged) integer."""
    out = bytearray()
    while z > 0x7F:
        out.append((z & 0x7F) | 0x80)
        z >>= 7
    out.append(z)
    return bytes(out)


def _v1_encoder(header: bytes) -> Callable[[dict[str, Any]], bytes]:
    """Avro single-object encoding of a record with the ``V1_LAYOUT`` writer schema
    (``header`` = C3 01 + its fingerprint): the same bytes as ``AvroCodec.encode``."""
    if not _VARINT_TABLE:
        _VARINT_TABLE.extend(_varint(z) for z in range(1 << 16))
    table = _VARINT_TABLE
    cache: dict[str, bytes] = {}
    cached = cache.get

    # for larger values (event_time): the low 14 bits as two continued bytes + the rest
    low14 = [bytes(((z & 0x7F) | 0x80, (z >> 7) | 0x80)) for z in range(1 << 14)]
    high: dict[int, bytes] = {}

    def long_(n: int) -> bytes:
        z = (n << 1) ^ (n >> 63)  # zig-zag
        if z < 65536:
            return table[z]
        rest = high.get(z >> 14)
        if rest is None:
            rest = _varint(z >> 14)
            if len(high) < _CACHE_MAX:
                high[z >> 14] = rest
        return low14[z & 0x3FFF] + rest

    def text(v: str) -> bytes:
        raw = v.encode()
        n = len(raw)
        return (table[n + n] if n < 32768 else long_(n)) + raw

    def label(v: str) -> bytes:
        b = cached(v)
        if b is None:
            b = text(v)
            if len(cache) < _CACHE_MAX:
                cache[v] = b
        return b

    def string_map(v: dict[str, str]) -> bytes:
        if not v:
            return b"\x00"
        parts = [long_(len(v))]
        for key, val in v.items():
            parts.append(label(key))
            parts.append(label(val))
        parts.append(b"\x00")
        return b"".join(parts)

    def encode(rec: dict[str, Any]) -> bytes:
        tx = rec["transaction_id"]
        routing = rec["routing_policy"]
        latency = rec["latency_ms"]
        region = rec["region"]
        i = rec["input_tokens"]
        o = rec["output_tokens"]
        c = rec["cached_tokens"]
        r = rec["reasoning_tokens"]
        return b"".join(
            (
                header,
                text(rec["event_id"]),
                long_(rec["event_time"]),
                cached(rec["source"]) or label(rec["source"]),
                cached(rec["source_id"]) or label(rec["source_id"]),
                cached(rec["reporting_carrier"]) or label(rec["reporting_carrier"]),
                cached(rec["home_carrier"]) or label(rec["home_carrier"]),
                cached(rec["serving_carrier"]) or label(rec["serving_carrier"]),
                b"\x00" if tx is None else b"\x02" + text(tx),
                cached(rec["tenant_id"]) or label(rec["tenant_id"]),
                text(rec["subscriber_id"]),
                cached(rec["channel"]) or label(rec["channel"]),
                cached(rec["model_id"]) or label(rec["model_id"]),
                cached(rec["provider"]) or label(rec["provider"]),
                # token counts are mostly small and non-negative: zig-zag is 2 n
                table[i + i] if 0 <= i < 32768 else long_(i),
                table[o + o] if 0 <= o < 32768 else long_(o),
                table[c + c] if 0 <= c < 32768 else long_(c),
                table[r + r] if 0 <= r < 32768 else long_(r),
                cached(rec["status"]) or label(rec["status"]),
                b"\x00" if routing is None else b"\x02" + (cached(routing) or label(routing)),
                b"\x00" if latency is None else b"\x02" + long_(latency),
                b"\x00" if region is None else b"\x02" + (cached(region) or label(region)),
                string_map(rec["attributes"]),
            )
        )

    return encode


@functools.cache
def _normal_quantiles(levels: int = _LEVELS) -> tuple[float, ...]:
    """Standard normal quantiles at (i + 0.5) / levels: a lognormal draw becomes one
    ``random()`` and an index (``lognormvariate`` costs ~6 times more)."""
    dist = NormalDist()
    return tuple(dist.inv_cdf((i + 0.5) / levels) for i in range(levels))


def _lognormal_table(mu: float, sigma: float, low: int, high: int) -> tuple[int, ...]:
    """Integer lognormal(mu, sigma) quantiles clipped to [low, high]."""
    return tuple(min(max(int(math.exp(mu + sigma * z)), low), high) for z in _normal_quantiles())


# ---- what the generator yields ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SimMessage:
    """One Kafka message of the simulated stream.

    ``key``: the partition key, ``tenant_id.encode()`` of the event (a real tenant's id
    when the record's own tenant_id is unusable). ``value``: the message bytes (Avro
    single-object encoding, or garbage for ``undecodable``). ``kind``: ``"valid"``,
    ``"duplicate"`` or ``"bad"``. ``reason``: for ``bad``, the exact ``Reason`` value the
    worker assigns; else ``None``. ``record``: the record ``value`` encodes (a dict of its
    own, event_time in epoch ms); ``None`` for ``undecodable`` and ``unknown_schema``.
    """

    key: bytes
    value: bytes
    kind: str
    reason: str | None
    record: dict[str, Any] | None


_SUMS = ("events", *TOKEN_FIELDS)
# truth cell key: (reporting_carrier, model_id, tenant_id, status, channel)
_CellKey = tuple[str, str, str, str, str]


@dataclass
class Truth:
    """The exact expected outcome of processing the simulated stream (ints only).

    ``unique_valid`` events must be in ``usage_events``; ``exact_duplicates`` copies must
    be dropped silently; ``dead_letters`` maps reason -> count (reasons that occur only;
    includes ``conflicting_duplicate``). ``tokens`` and the ``by_*`` breakdowns cover the
    unique valid events only. ``cross_carrier_transactions`` counts calls reported by both
    carriers (each is two of the unique valid events, sharing one transaction_id).

    Per event only ``cells`` is updated (sums per reporting carrier, model, tenant,
    status and channel); the breakdowns are computed from it when asked for.
    """

    seed: int
    now_ms: int
    messages: int = 0
    unique_valid: int = 0
    exact_duplicates: int = 0
    dead_letters: dict[str, int] = field(default_factory=dict)
    cross_carrier_transactions: int = 0
    cells: dict[_CellKey, list[int]] = field(default_factory=dict, repr=False)

    def add_valid(self, rec: dict[str, Any]) -> None:
        """Count one accepted event (a record whose token fields are valid ints)."""
        self.unique_valid += 1
        key = (
            rec["reporting_carrier"],
            rec["model_id"],
            rec["tenant_id"],
            rec["status"],
            rec["channel"],
        )
        cell = self.cells.get(key)
        if cell is None:
            cell = self.cells[key] = [0, 0, 0, 0, 0]
        cell[0] += 1
        cell[1] += rec["input_tokens"]
        cell[2] += rec["output_tokens"]
        cell[3] += rec["cached_tokens"]
        cell[4] += rec["reasoning_tokens"]

    def add_dead_letter(self, reason: str) -> None:
        """Count one message the worker must dead-letter with ``reason``."""
        self.dead_letters[reason] = self.dead_letters.get(reason, 0) + 1

    @property
    def dead_letters_total(self) -> int:
        """All dead letters, whatever the reason."""
        return sum(self.dead_letters.values())

    def _group(self, position: int) -> dict[str, dict[str, int]]:
        sums: dict[str, list[int]] = {}
        for key, cell in self.cells.items():
            acc = sums.setdefault(key[position], [0, 0, 0, 0, 0])
            for i, value in enumerate(cell):
                acc[i] += value
        return {name: dict(zip(_SUMS, acc, strict=True)) for name, acc in sorted(sums.items())}

    @property
    def tokens(self) -> dict[str, int]:
        """Token sums over all unique valid events: ``{input_tokens: ..., ...}``."""
        totals = [0, 0, 0, 0]
        for cell in self.cells.values():
            for i in range(4):
                totals[i] += cell[i + 1]
        return dict(zip(TOKEN_FIELDS, totals, strict=True))

    @property
    def by_reporting_carrier(self) -> dict[str, dict[str, int]]:
        """carrier -> {events, input_tokens, output_tokens, cached_tokens, reasoning_tokens}."""
        return self._group(0)

    @property
    def by_model(self) -> dict[str, dict[str, int]]:
        """model_id -> {events, input_tokens, output_tokens, cached_tokens, reasoning_tokens}."""
        return self._group(1)

    @property
    def by_tenant(self) -> dict[str, dict[str, int]]:
        """tenant_id -> {events, input_tokens, output_tokens, cached_tokens, reasoning_tokens}."""
        return self._group(2)

    @property
    def by_status(self) -> dict[str, int]:
        """status -> events."""
        return {k: v["events"] for k, v in self._group(3).items()}

    @property
    def by_channel(self) -> dict[str, int]:
        """channel -> events."""
        return {k: v["events"] for k, v in self._group(4).items()}

    def to_json(self) -> dict[str, Any]:
        """The truth as a JSON-ready dict of ints, strings and dicts (keys sorted)."""
        return {
            "seed": self.seed,
            "now_ms": self.now_ms,
            "messages": self.messages,
            "unique_valid": self.unique_valid,
            "exact_duplicates": self.exact_duplicates,
            "dead_letters": dict(sorted(self.dead_letters.items())),
            "dead_letters_total": self.dead_letters_total,
            "tokens": self.tokens,
            "by_reporting_carrier": self.by_reporting_carrier,
            "by_model": self.by_model,
            "by_status": self.by_status,
            "by_channel": self.by_channel,
            "by_tenant": self.by_tenant,
            "cross_carrier_transactions": self.cross_carrier_transactions,
        }


def write_truth(truth: Truth, path: str | os.PathLike[str]) -> Path:
    """Write ``truth.to_json()`` to ``path`` as indented, key-sorted JSON, atomically (a
    temporary file in the same directory, then a rename). Returns the path written."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(truth.to_json(), indent=2, sort_keys=True) + "\n")
    tmp.replace(target)
    return target


# ---- the generator -------------------------------------------------------------------


class Simulation:
    """A reproducible stream of carrier usage messages and its exact truth.

    ``seed`` drives every random choice; ``now_ms`` (UTC epoch ms) is the processing time
    the stream is valid for: valid events happen in ``[now_ms - 2 h, now_ms - 1 s]``.
    ``tenants`` is the number of tenant accounts (Zipf-skewed traffic: a few tenants make
    most of it). ``codec`` decodes and, when its schema is not the known shape, encodes
    records (default: a new ``AvroCodec()``).
    """

    def __init__(
        self,
        seed: int,
        now_ms: int,
        tenants: int = 200,
        codec: AvroCodec | None = None,
        live_rate: float | None = None,
        late_share: float = 0.0,
    ) -> None:
        if tenants < 1:
            raise ValueError("tenants must be at least 1")
        if live_rate is not None and live_rate <= 0:
            raise ValueError("live_rate must be positive")
        if not 0.0 <= late_share <= 1.0:
            raise ValueError("late_share must be within [0, 1]")
        # Live traffic: call i happens at now_ms + i / live_rate (events per second), as if
        # the gateways were sending now; late_share of them come from terminals that were
        # offline and report 10 to 60 minutes after the call.
        self.live_rate = live_rate
        self.late_share = late_share
        self.seed = seed
        self.now_ms = now_ms
        self.codec = codec if codec is not None else AvroCodec()
        self.truth = Truth(seed=seed, now_ms=now_ms)
        self._rng = random.Random(seed)
        # a tag of (seed, now_ms) in every id: a run at another now_ms never collides
        self._run = hashlib.blake2b(f"{seed}:{now_ms}".encode(), digest_size=5).hexdigest()
        self._counter = 0
        self._id_prefix = {c: f"{c.lower()}-{self._run}-" for c in CARRIER_LIST}
        self._history: list[tuple[bytes, bytes]] = []  # latest valid (key, value)
        self._history_next = 0

        # token counts and time to first token: lognormal, clipped to realistic ranges
        self._input = _lognormal_table(6.7, 1.0, 50, 20_000)  # median ~800
        self._failed_input = _lognormal_table(5.8, 0.9, 50, 8000)  # median ~330
        self._output = _lognormal_table(5.5, 0.9, 10, 4000)  # median ~245
        self._reasoning = _lognormal_table(7.0, 0.8, 50, 16_000)  # median ~1100
        self._first_token_ms = _lognormal_table(5.8, 0.5, 20, 60_000)  # median ~330 ms
        self._models = _table(tuple(((m, p, r), w) for m, p, w, r in MODELS))
        self._channels = _table(CHANNELS)
        self._statuses = _table(STATUSES)
        self._routing = _table(ROUTING)
        self._regions = _table(REGIONS)
        self._gateways = {
            (carrier, region): tuple(
                f"gw-{carrier.lower()}-{region[3:].lower()}-{i:02d}"
                for i in range(1, _GATEWAYS_PER_REGION + 1)
            )
            for carrier in CARRIER_LIST
            for region, _ in REGIONS
        }
        self._other_carriers = {c: tuple(o for o in CARRIER_LIST if o != c) for c in CARRIER_LIST}

        rng = self._rng
        carriers = _table(_CARRIER_TENANT_SHARE)
        weights = [1.0 / (rank + 1) ** 1.1 for rank in range(tenants)]  # Zipf, s = 1.1
        self._tenants: list[_Tenant] = []
        for i in range(tenants):
            home = carriers[int(rng.random() * len(carriers))]
            tenant_id = f"tn-{home.lower()}-{i + 1:04d}"
            self._tenants.append(
                _Tenant(
                    tenant_id=tenant_id,
                    key=tenant_id.encode(),
                    home=home,
                    region=self._regions[int(rng.random() * len(self._regions))],
                    prefixes=_PHONE_PREFIXES[home],
                    pool=20 + int(20_000 * weights[i]),
                    base=rng.randrange(100_000_000),
                )
            )
        self._tenant_cum: list[float] = []
        total = 0.0
        for w in weights:
            total += w
            self._tenant_cum.append(total)

        fast = None
        if writer_layout(self.codec) == V1_LAYOUT:
            fast = _v1_encoder(MAGIC + self.codec.fingerprint)
            for sample in self._samples():
                if fast(sample) != self.codec.encode(sample):  # pragma: no cover - guard
                    fast = None
                    break
        self._encode: Callable[[dict[str, Any]], bytes] = fast or self.codec.encode

    # ---- public ------------------------------------------------------------------

    def messages(
        self, n: int, dup_rate: float = 0.0, bad_rate: float = 0.0
    ) -> Iterator[SimMessage]:
        """Yield exactly ``n`` messages: ``round(n * dup_rate)`` duplicates,
        ``round(n * bad_rate)`` bad ones and the rest valid, in random order.
        ``self.truth`` is complete once the iterator is exhausted.

        Raises ``ValueError`` (at once, not when iterated) for a negative ``n``, rates
        outside [0, 1] or adding up to more than all messages, and for duplicates or
        conflicting duplicates with no valid message to copy.
        """
        if n < 0:
            raise ValueError("n must not be negative")
        if not (0.0 <= dup_rate <= 1.0 and 0.0 <= bad_rate <= 1.0):
            raise ValueError("dup_rate and bad_rate must lie in [0, 1]")
        dups = round(n * dup_rate)
        bad = round(n * bad_rate)
        valid = n - dups - bad
        if valid < 0:
            raise ValueError("dup_rate + bad_rate must not exceed 1")
        rng = self._rng
        reasons: list[Reason] = []
        for reason in BAD_REASONS:
            reasons.extend([reason] * (bad // len(BAD_REASONS)))
        reasons.extend(rng.sample(BAD_REASONS, bad % len(BAD_REASONS)))
        plan: list[str] = [KIND_VALID] * valid + [KIND_DUPLICATE] * dups
        plan.extend(reasons)
        rng.shuffle(plan)
        copies = dups > 0 or Reason.CONFLICTING_DUPLICATE in reasons
        if copies and not self._history:
            if valid == 0:
                raise ValueError("duplicates need at least one valid message to copy")
            first = plan.index(KIND_VALID)
            plan[0], plan[first] = plan[first], plan[0]
        return self._stream(plan, valid)

    # ---- the stream ----------------------------------------------------------------

    def _stream(self, plan: list[str], valid: int) -> Iterator[SimMessage]:
        rng = self._rng
        truth = self.truth
        encode = self._encode
        history = self._history
        valid_left = valid  # valid slots still to fill, including the current one
        pending: deque[tuple[bytes, dict[str, Any]]] = deque()  # second reports of calls
        for slot in plan:
            truth.messages += 1
            if slot == KIND_VALID:
                if pending and (valid_left == len(pending) or rng.random() < 0.3):
                    key, rec = pending.popleft()
                else:
                    # a cross-carrier call needs a later valid slot for its second report
                    cross = rng.random() < CROSS_CARRIER_SHARE and valid_left - 1 > len(pending)
                    key, rec, partner = self._call(cross)
                    if partner is not None:
                        pending.append((key, partner))
                        truth.cross_carrier_transactions += 1
                valid_left -= 1
                value = encode(rec)
                if len(history) < HISTORY:
                    history.append((key, value))
                else:
                    history[self._history_next] = (key, value)
                    self._history_next = (self._history_next + 1) % HISTORY
                truth.add_valid(rec)
                yield SimMessage(key, value, KIND_VALID, None, rec)
            elif slot == KIND_DUPLICATE:
                key, value = history[int(rng.random() * len(history))]
                truth.exact_duplicates += 1
                yield SimMessage(key, value, KIND_DUPLICATE, None, self.codec.decode(value))
            else:
                reason = Reason(slot)
                message = self._bad(reason)
                truth.add_dead_letter(reason.value)
                yield message
        if pending:  # pragma: no cover - the slot accounting above prevents it
            raise AssertionError("a cross-carrier call lost its second report")

    def _event_time(self, rand: Callable[[], float]) -> int:
        if self.live_rate is None:
            return self.now_ms - WINDOW_MS + int(rand() * (WINDOW_MS - 1000))
        at = self.now_ms + int(self._counter * 1000 / self.live_rate)
        if self.late_share and rand() < self.late_share:
            at -= 600_000 + int(rand() * 3_000_000)
        return at

    def _next_id(self, carrier: str) -> str:
        self._counter += 1
        return self._id_prefix[carrier] + str(self._counter)

    def _call(self, cross: bool) -> tuple[bytes, dict[str, Any], dict[str, Any] | None]:
        """One model call: the partition key, the first report and, for a cross-carrier
        call, the other carrier's report of the same call (else ``None``).

        Written for speed: most choices are 12-bit slices of two ``getrandbits(60)``
        draws indexing ``_LEVELS``-slot tables."""
        rng = self._rng
        rand = rng.random
        tenant = self._tenants[bisect.bisect_right(self._tenant_cum, rand() * self._tenant_cum[-1])]
        home = tenant.home
        # 12-bit slices: bits = model | channel | status | routing | region kind,
        # more = input | output | cache hit | reasoning | latency present,
        # extra = first-token time | region | gateway (3) | label (3) | first reporter |
        #         serving carrier (1 bit each)
        bits = rng.getrandbits(60)
        more = rng.getrandbits(60)
        extra = rng.getrandbits(32)
        model_id, provider, reasoning_model = self._models[bits & _MASK]
        channel = self._channels[(bits >> 12) & _MASK]
        status = self._statuses[(bits >> 24) & _MASK]
        routing_policy = self._routing[(bits >> 36) & _MASK]
        where = (bits >> 48) & _MASK

        # subscriber: low indices are the heavy users
        sub = int(tenant.pool * rand() * rand())
        digits = (tenant.base + sub * 7919) % 100_000_000
        subscriber_id = f"{tenant.prefixes[sub % len(tenant.prefixes)]}{digits:08d}"

        # tokens: lognormal tables, clipped to realistic ranges
        if status in FAILED_STATUSES:
            input_tokens = self._failed_input[more & _MASK]
            output_tokens = cached_tokens = reasoning_tokens = 0
        else:
            input_tokens = self._input[more & _MASK]
            output_tokens = self._output[(more >> 12) & _MASK]
            cached_tokens = (
                int(input_tokens * (0.1 + 0.8 * rand()))
                if (more >> 24) & _MASK < _CACHED_SHARE
                else 0
            )
            reasoning_tokens = self._reasoning[(more >> 36) & _MASK] if reasoning_model else 0

        # latency (absent on ~3 % of events)
        latency_ms: int | None
        if (more >> 48) & _MASK < _NO_LATENCY_SHARE:
            latency_ms = None
        elif status == "ok":
            latency_ms = self._first_token_ms[extra & _MASK] + int(
                (output_tokens + reasoning_tokens) * (8 + 32 * rand())
            )
        elif status == "timeout":
            latency_ms = 30_000 + int(rand() * 30_000)
        elif status == "rate_limited":
            latency_ms = 5 + int(rand() * 45)
        elif status == "error":
            latency_ms = 50 + int(rand() * 3000)
        else:  # failover: a fallback model answered, after a delay
            latency_ms = self._first_token_ms[extra & _MASK] + int(
                (output_tokens + reasoning_tokens) * (8 + 32 * rand()) + 1000 + rand() * 4000
            )

        # where it came from: mostly the tenant's province
        region: str | None
        if where < _NO_REGION_SHARE:
            region = None
            gw_region = tenant.region
        elif where < _HOME_REGION_SHARE:
            region = gw_region = tenant.region
        else:
            region = gw_region = self._regions[(extra >> 12) & _MASK]
        gateway = (extra >> 24) & 7
        if cross:  # who reports first: home or serving carrier, at random
            serving = self._other_carriers[home][extra >> 31]
            first = serving if (extra >> 30) & 1 else home
        else:
            first = serving = home
        if channel == "home_terminal" and not cross and gateway < 6:  # 3 in 4
            source = "terminal"  # the subscriber's set-top box
            source_id = f"stb-{digits:08x}"
        else:
            source = "gateway"
            source_id = self._gateways[first, gw_region][gateway]

        attributes: dict[str, str] = {}
        if (extra >> 27) & 7 == 0:  # one call in 8
            label, values = _ATTRIBUTES[int(rand() * len(_ATTRIBUTES))]
            attributes[label] = values[int(rand() * len(values))]

        rec: dict[str, Any] = {
            "event_id": self._next_id(first),
            "event_time": self._event_time(rand),
            "source": source,
            "source_id": source_id,
            "reporting_carrier": first,
            "home_carrier": home,
            "serving_carrier": serving,
            "transaction_id": f"tx-{self._run}-{self._counter}" if cross else None,
            "tenant_id": tenant.tenant_id,
            "subscriber_id": subscriber_id,
            "channel": channel,
            "model_id": model_id,
            "provider": provider,
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
            "cached_tokens": cached_tokens,
            "reasoning_tokens": reasoning_tokens,
            "status": status,
            "routing_policy": routing_policy,
            "latency_ms": latency_ms,
            "region": region,
            "attributes": attributes,
        }
        if not cross:
            return tenant.key, rec, None
        second = home if first == serving else serving
        partner = dict(rec)
        partner["event_id"] = self._next_id(second)
        partner["reporting_carrier"] = second
        partner["source_id"] = self._gateways[second, gw_region][int(rand() * _GATEWAYS_PER_REGION)]
        partner["attributes"] = dict(attributes)
        return tenant.key, rec, partner

    def _samples(self) -> list[dict[str, Any]]:
        """Records exercising every field shape, for checking the fast encoder. Uses a
        private random source, so the stream does not depend on which encoder is used."""
        saved_rng, saved_counter = self._rng, self._counter
        self._rng = random.Random(-1)
        try:
            samples = [self._call(cross=i % 2 == 0)[1] for i in range(40)]
        finally:
            self._rng, self._counter = saved_rng, saved_counter
        samples[0].update(
            latency_ms=None,
            region=None,
            routing_policy=None,
            attributes={"a": "b", "\u7701": "\u5e7f\u4e1c", "": ""},
        )
        samples[1].update(
            latency_ms=10**9,
            input_tokens=-5,
            output_tokens=10**12,
            event_time=-1,
            tenant_id="",
            subscriber_id="\u00e9" * 300,
        )
        return samples

    # ---- bad messages ----------------------------------------------------------------

    def _bad(self, reason: Reason) -> SimMessage:
        """A message the worker must dead-letter with exactly ``reason``."""
        rng = self._rng
        rand = rng.random
        if reason is Reason.CONFLICTING_DUPLICATE:
            # same key and (reporting_carrier, event_id) as an earlier valid event
            key, value = self._history[int(rand() * len(self._history))]
            rec = self.codec.decode(value)
            name = "input_tokens" if rand() < 0.5 else "output_tokens"
            rec[name] += 1 + int(rand() * 500)
            return SimMessage(key, self._encode(rec), KIND_BAD, reason.value, rec)

        # everything else starts from a fresh, valid call (its own event_id)
        key, rec, _ = self._call(cross=reason is Reason.MISSING_TRANSACTION_ID)
        if reason is Reason.UNDECODABLE:
            variant = rand()
            if variant < 0.4:  # random bytes, never starting with the C3 01 marker
                value = bytes([int(rand() * 0xC3)]) + rng.randbytes(int(rand() * 200))
            elif variant < 0.7:  # a truncated encoding
                full = self._encode(rec)
                value = full[: int(rand() * len(full))]
            else:  # a producer that sends JSON instead of Avro
                value = json.dumps(rec, separators=(",", ":")).encode()
            return SimMessage(key, value, KIND_BAD, reason.value, None)
        if reason is Reason.UNKNOWN_SCHEMA:
            fingerprint = rng.randbytes(8)
            while fingerprint == self.codec.fingerprint:  # pragma: no cover - p = 2**-64
                fingerprint = rng.randbytes(8)
            value = MAGIC + fingerprint + self._encode(rec)[len(MAGIC) + 8 :]
            return SimMessage(key, value, KIND_BAD, reason.value, None)

        if reason is Reason.UNKNOWN_ENUM:
            name, wrong = _UNKNOWN_ENUMS[int(rand() * len(_UNKNOWN_ENUMS))]
            rec[name] = wrong
        elif reason is Reason.NEGATIVE_TOKENS:
            rec[TOKEN_FIELDS[int(rand() * 4)]] = -1 - int(rand() * 1000)
        elif reason is Reason.TOO_MANY_TOKENS:
            rec[TOKEN_FIELDS[int(rand() * 4)]] = 10_000_001 + int(rand() * 10**12)
        elif reason is Reason.FUTURE_EVENT_TIME:
            rec["event_time"] = self.now_ms + 3_600_000 + int(rand() * 3_600_000)
        elif reason is Reason.TOO_LATE:
            rec["event_time"] = self.now_ms - 40 * 86_400_000 - int(rand() * 86_400_000)
        elif reason is Reason.MISSING_TRANSACTION_ID:
            rec["transaction_id"] = None  # a cross-carrier call without it
        elif reason is Reason.INVALID_VALUE:
            variant = rand()
            if variant < 0.3:
                rec["tenant_id"] = ""  # the message key stays the real tenant's
            elif variant < 0.6:
                rec["event_id"] += "-" + "x" * (199 - len(rec["event_id"]))  # 200 chars
            elif variant < 0.8:
                rec["subscriber_id"] = "   "
            else:
                rec["latency_ms"] = -1 - int(rand() * 1000)
        else:  # pragma: no cover - BAD_REASONS and this function go together
            raise AssertionError(f"no recipe for {reason}")
        return SimMessage(key, self._encode(rec), KIND_BAD, reason.value, rec)
