"""Fault injection: make the CA fail on demand, per operation, so the agent's retry paths and
diagnostics (HTTP_E_STATUS_*, WinHTTP timeouts, truncated replies) can be shown and tested.

A rule says what goes wrong (`kind`), for which operation (`op`: `*`, GetCACaps, GetCACert,
PKIOperation, or a message type: PKCSReq, RenewalReq, CertPoll, GetCert, GetCRL), how often
(`count`: the next N matching requests, or unlimited; `fraction`: the probability for each),
and whether the CA first processes the request (`phase=after`: the certificate is issued but
the reply is lost, as when a proxy times out) or not (`before`, the default).

Kinds:
- `status` (written as the code, e.g. `503`): answer that HTTP status with a short HTML body;
- `timeout`: hold the request `delay` seconds (default 3600: longer than any client timeout)
  and close without answering;
- `slow`: wait `delay` seconds (default 2), then answer normally;
- `truncate`: a valid HTTP reply whose body is cut to `bytes` (default half): the client's
  parser meets the end of data (CRYPT_E_ASN1_EOD);
- `cut`: announce the full Content-Length, send `bytes` of it and close the connection: the
  client's transport fails mid-body (ERROR_WINHTTP_CONNECTION_ERROR);
- `content-type`: the right body with a wrong Content-Type (`value`, default text/html).

Text form (CLI `--fault`, control endpoint `{"spec": …}`): `KIND[@OP][:key=value,…]`, e.g.
`503@PKCSReq:count=2`, `timeout@GetCACert:delay=30`, `slow:delay=1.5,fraction=0.5`,
`truncate@PKIOperation:bytes=100`, `cut`, `content-type@GetCACert:value=text/plain`,
`500@PKCSReq:phase=after,count=1`.
"""

from __future__ import annotations

import enum
import random
import threading
from dataclasses import asdict, dataclass, replace
from typing import Any


class FaultKind(enum.StrEnum):
    STATUS = "status"
    TIMEOUT = "timeout"
    SLOW = "slow"
    TRUNCATE = "truncate"
    CUT = "cut"
    CONTENT_TYPE = "content-type"


OPERATIONS = ("*", "GetCACaps", "GetCACert", "PKIOperation", "PKCSReq", "RenewalReq",
              "CertPoll", "GetCert", "GetCRL")
_OPS_LOWER = {o.lower(): o for o in OPERATIONS}
_DEFAULT_DELAY = {FaultKind.TIMEOUT: 3600.0, FaultKind.SLOW: 2.0}


class FaultSpecError(ValueError):
    pass


@dataclass(frozen=True)
class FaultRule:
    kind: FaultKind
    op: str = "*"
    status: int = 0
    delay: float = 0.0
    count: int | None = None  # None: every matching request until cleared
    fraction: float = 1.0
    phase: str = "before"
    size: int | None = None  # truncate/cut: bytes kept (None: half)
    content_type: str = "text/html"
    id: int = 0
    hits: int = 0

    def __post_init__(self) -> None:
        if self.op not in OPERATIONS:
            raise FaultSpecError(f"unknown operation {self.op!r} ({', '.join(OPERATIONS)})")
        if self.kind is FaultKind.STATUS and not 100 <= self.status <= 599:
            raise FaultSpecError(f"HTTP status {self.status} is out of range")
        if not 0.0 <= self.fraction <= 1.0:
            raise FaultSpecError(f"fraction {self.fraction} is not within 0..1")
        if self.count is not None and self.count < 0:
            raise FaultSpecError("count cannot be negative")
        if self.phase not in ("before", "after"):
            raise FaultSpecError(f"phase must be before or after, not {self.phase!r}")
        if self.delay < 0:
            raise FaultSpecError("delay cannot be negative")
        if self.size is not None and self.size < 0:
            raise FaultSpecError("bytes cannot be negative")

    def matches(self, operation: str, message: str | None) -> bool:
        return self.op in ("*", operation) or (message is not None and self.op == message)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["kind"] = self.kind.value
        d["spec"] = self.spec()
        return d

    def spec(self) -> str:
        head = str(self.status) if self.kind is FaultKind.STATUS else self.kind.value
        if self.op != "*":
            head += f"@{self.op}"
        opts = []
        if self.count is not None:
            opts.append(f"count={self.count}")
        if self.fraction != 1.0:
            opts.append(f"fraction={self.fraction:g}")
        if self.kind in (FaultKind.TIMEOUT, FaultKind.SLOW):
            opts.append(f"delay={self.delay:g}")
        if self.phase != "before":
            opts.append(f"phase={self.phase}")
        if self.size is not None:
            opts.append(f"bytes={self.size}")
        if self.kind is FaultKind.CONTENT_TYPE:
            opts.append(f"value={self.content_type}")
        return head + (":" + ",".join(opts) if opts else "")


def parse_fault(text: str) -> FaultRule:
    """`KIND[@OP][:key=value,…]` → FaultRule (see the module docstring)."""
    head, _, tail = text.strip().partition(":")
    kind_text, _, op_text = head.partition("@")
    kind_text = kind_text.strip().lower()
    fields: dict[str, Any] = {}
    if kind_text.isdigit():
        fields["kind"] = FaultKind.STATUS
        fields["status"] = int(kind_text)
    else:
        try:
            fields["kind"] = FaultKind(kind_text)
        except ValueError:
            raise FaultSpecError(f"unknown fault kind {kind_text!r} (an HTTP status, "
                                 "timeout, slow, truncate, cut, content-type)") from None
    if op_text.strip():
        op = _OPS_LOWER.get(op_text.strip().lower())
        if op is None:
            raise FaultSpecError(f"unknown operation {op_text!r} ({', '.join(OPERATIONS)})")
        fields["op"] = op
    for item in filter(None, (p.strip() for p in tail.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise FaultSpecError(f"option {item!r} is not key=value")
        fields.update(_option(key.strip().lower(), value.strip()))
    return build_rule(fields)


def _option(key: str, value: str) -> dict[str, Any]:
    try:
        if key == "count":
            return {"count": None if value in ("", "inf", "all") else int(value)}
        if key in ("fraction", "p"):
            return {"fraction": float(value)}
        if key == "delay":
            return {"delay": float(value)}
        if key in ("bytes", "size"):
            return {"size": int(value)}
        if key == "phase":
            return {"phase": value.lower()}
        if key in ("value", "content_type", "type"):
            return {"content_type": value}
        if key == "status":
            return {"status": int(value)}
    except ValueError:
        raise FaultSpecError(f"option {key}={value!r} is not a number") from None
    raise FaultSpecError(f"unknown option {key!r} (count, fraction, delay, bytes, phase, "
                         "value)")


def build_rule(fields: dict[str, Any]) -> FaultRule:
    """A rule from a JSON object (`{"kind": "status", "status": 503, "op": "PKCSReq"}`) or
    `{"spec": "503@PKCSReq"}`."""
    if "spec" in fields:
        rule = parse_fault(str(fields["spec"]))
        extra = {k: v for k, v in fields.items() if k != "spec"}
        return build_rule({**_rule_fields(rule), **extra}) if extra else rule
    data = dict(fields)
    try:
        kind = FaultKind(str(data.pop("kind")))
    except (KeyError, ValueError):
        raise FaultSpecError(f"a fault needs a kind ({', '.join(k.value for k in FaultKind)})"
                             ) from None
    if "delay" not in data and kind in _DEFAULT_DELAY:
        data["delay"] = _DEFAULT_DELAY[kind]
    if "op" in data:
        op = _OPS_LOWER.get(str(data["op"]).lower())
        if op is None:
            raise FaultSpecError(f"unknown operation {data['op']!r}")
        data["op"] = op
    allowed = {"op", "status", "delay", "count", "fraction", "phase", "size", "content_type"}
    unknown = set(data) - allowed
    if unknown:
        raise FaultSpecError(f"unknown fault field(s): {', '.join(sorted(unknown))}")
    try:
        return FaultRule(kind=kind, **data)
    except TypeError as exc:
        raise FaultSpecError(str(exc)) from None


def _rule_fields(rule: FaultRule) -> dict[str, Any]:
    d = asdict(rule)
    d.pop("id")
    d.pop("hits")
    return d


class FaultSet:
    """The active rules. Thread-safe: the control endpoint, the test thread (through
    `LabScepCA.add_fault`) and the request handlers all touch it."""

    def __init__(self, rules: list[FaultRule] | None = None, *, seed: int | None = None) -> None:
        self._lock = threading.Lock()
        self._rules: list[FaultRule] = []
        self._next_id = 1
        self._random = random.Random(seed)
        for rule in rules or []:
            self.add(rule)

    def add(self, rule: FaultRule) -> FaultRule:
        with self._lock:
            rule = replace(rule, id=self._next_id, hits=0)
            self._next_id += 1
            self._rules.append(rule)
            return rule

    def remove(self, rule_id: int) -> bool:
        with self._lock:
            before = len(self._rules)
            self._rules = [r for r in self._rules if r.id != rule_id]
            return len(self._rules) != before

    def clear(self) -> None:
        with self._lock:
            self._rules = []

    def rules(self) -> list[FaultRule]:
        with self._lock:
            return list(self._rules)

    def take(self, operation: str, message: str | None, phase: str) -> FaultRule | None:
        """The first rule that fires for this request (consuming one of its `count`)."""
        with self._lock:
            for index, rule in enumerate(self._rules):
                if rule.phase != phase or not rule.matches(operation, message):
                    continue
                if rule.count is not None and rule.hits >= rule.count:
                    continue
                if rule.fraction < 1.0 and self._random.random() >= rule.fraction:
                    continue
                fired = replace(rule, hits=rule.hits + 1)
                self._rules[index] = fired
                return fired
        return None
