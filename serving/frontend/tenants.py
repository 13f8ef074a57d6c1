"""Tenants and their quotas (`--tenants FILE`): who a request is, and whether it may pass now.

A tenant is named in a JSON file (schema in docs/operations.md, "Tenants and quotas") with the
bearer tokens and mTLS identities (a client certificate's subject CN or a SAN) that are it, a
requests/s and a rows/s quota (token buckets that start full, refill at the rate and hold at most
`*_burst`), and a priority. A request's tenant is decided when it arrives (its first
`authorization: Bearer` value, else its certificate's names); an unknown one is UNAUTHENTICATED.
Quotas are charged where the rows are known, after parsing: a request over either bucket is
refused at once with RESOURCE_EXHAUSTED naming the tenant and the quota (HTTP 429), and charges
nothing. The native front end keeps the same buckets in C++ (native/tenants.cc); `TenantTable`
here is the Python one, and both follow tests/serving/frontend/tenant_cases.py.
"""

from __future__ import annotations

import dataclasses
import hmac
import json
import math
import pathlib
import re
from typing import Any, Sequence

from serving.frontend.auth import check_token
from serving.types import Code, ServingError

UNLIMITED = math.inf
DEFAULT_PRIORITY = 1 << 30  # a request without a priority (Triton's "default")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_FIELDS = ("name", "tokens", "identities", "requests_per_s", "requests_burst", "rows_per_s",
           "rows_burst", "priority")


class OverQuota(ServingError):
  """RESOURCE_EXHAUSTED because a tenant is over a quota; HTTP answers it with 429. `hold_s`: how
  long the front end holds the refusal before answering (serving/frontend/refusals.py)."""

  http_status = 429

  def __init__(self, message: str, hold_s: float = 0.0):
    super().__init__(Code.RESOURCE_EXHAUSTED, message)
    self.hold_s = hold_s


@dataclasses.dataclass(frozen=True, slots=True)
class Tenant:
  """One tenant as configured; a rate of `UNLIMITED` has no bucket; priority 0: the request's."""

  name: str
  tokens: tuple[str, ...] = ()
  identities: tuple[str, ...] = ()
  requests_per_s: float = UNLIMITED
  requests_burst: float = UNLIMITED
  rows_per_s: float = UNLIMITED
  rows_burst: float = UNLIMITED
  priority: int = 0

  def native(self) -> tuple:
    """The tuple the C++ table is built from (0 stands for unlimited)."""
    z = lambda v: 0.0 if v == UNLIMITED else float(v)  # noqa: E731
    return (self.name, list(self.tokens), list(self.identities), z(self.requests_per_s),
            z(self.requests_burst), z(self.rows_per_s), z(self.rows_burst), self.priority)


def _number(where: str, value: Any, *, low: float) -> float:
  """A finite number >= `low` (> 0 when `low` is 0)."""
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
      or value < low or value <= 0:
    raise ValueError(f"{where} must be a number {f'>= {low:g}' if low else '> 0'}, not {value!r}")
  return float(value)


def _strings(where: str, value: Any) -> tuple[str, ...]:
  if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
    raise ValueError(f"{where} must be a list of non-empty strings")
  return tuple(value)


def _rate(where: str, entry: dict, kind: str) -> tuple[float, float]:
  """(rate, burst) of one bucket; absent: unlimited; the burst defaults to one second's worth."""
  rate = entry.get(f"{kind}_per_s")
  burst = entry.get(f"{kind}_burst")
  if rate is None:
    if burst is not None:
      raise ValueError(f"{where}.{kind}_burst needs {kind}_per_s")
    return UNLIMITED, UNLIMITED
  rate = _number(f"{where}.{kind}_per_s", rate, low=0)
  burst = _number(f"{where}.{kind}_burst", rate if burst is None else burst, low=1)
  return rate, burst


def parse_tenant(where: str, entry: Any) -> Tenant:
  """One entry of the file's `tenants` list; ValueError naming the field when it is wrong."""
  if not isinstance(entry, dict):
    raise ValueError(f"{where} must be an object")
  for key in entry:
    if key not in _FIELDS:
      raise ValueError(f"{where}.{key} is not a tenant field (fields: {', '.join(_FIELDS)})")
  name = entry.get("name")
  if not isinstance(name, str) or not _NAME.match(name):
    raise ValueError(f"{where}.name must be 1-64 of A-Z a-z 0-9 . _ - (not starting with . _ -)")
  tokens = _strings(f"{where}.tokens", entry.get("tokens", []))
  for i, t in enumerate(tokens):
    try:
      check_token(t)
    except ValueError as e:
      raise ValueError(f"{where}.tokens[{i}]: {e}") from None
  identities = _strings(f"{where}.identities", entry.get("identities", []))
  if not tokens and not identities:
    raise ValueError(f"{where} ({name}) needs tokens or identities: nothing would be it")
  priority = entry.get("priority", 0)
  if isinstance(priority, bool) or not isinstance(priority, int) or \
      not 0 <= priority <= DEFAULT_PRIORITY:
    raise ValueError(f"{where}.priority must be an integer in [1, {DEFAULT_PRIORITY}] (1 is"
                     " highest), or 0 for none")
  return Tenant(name, tokens, identities, *_rate(where, entry, "requests"),
                *_rate(where, entry, "rows"), priority)


def parse_tenants(doc: Any) -> tuple[Tenant, ...]:
  """The tenants of a parsed file; names, tokens and identities must each be unique."""
  if not isinstance(doc, dict) or set(doc) != {"tenants"} or not isinstance(doc["tenants"], list) \
      or not doc["tenants"]:
    raise ValueError("the file must be an object with one key, tenants: a non-empty list")
  tenants = tuple(parse_tenant(f"tenants[{i}]", e) for i, e in enumerate(doc["tenants"]))
  for field in ("name", "tokens", "identities"):
    seen: dict[str, str] = {}
    for i, t in enumerate(tenants):
      for v in (getattr(t, field),) if field == "name" else getattr(t, field):
        if v in seen:
          shown = repr(v) if field != "tokens" else "a token"
          raise ValueError(f"tenants[{i}].{field}: {shown} is also {seen[v]}'s")
        seen[v] = t.name
  return tenants


def load_tenants(path: str | pathlib.Path) -> tuple[Tenant, ...]:
  """The tenants file at `path`; ValueError saying which file and which field is wrong."""
  try:
    doc = json.loads(pathlib.Path(path).read_text())
  except OSError as e:
    raise ValueError(f"cannot read the tenants file {path}: {e.strerror}") from None
  except json.JSONDecodeError as e:
    raise ValueError(f"tenants file {path}: not JSON: {e}") from None
  try:
    return parse_tenants(doc)
  except ValueError as e:
    raise ValueError(f"tenants file {path}: {e}") from None


def effective_priority(requested: int, tenant_priority: int) -> int:
  """A request's priority under its tenant's: the tenant's when it asks none, and never a
  higher (lower-numbered) one than the tenant's."""
  if tenant_priority <= 0:
    return requested
  return tenant_priority if requested >= DEFAULT_PRIORITY else max(requested, tenant_priority)


class _Bucket:
  __slots__ = ("rate", "burst", "tokens", "last")

  def __init__(self, rate: float, burst: float):
    self.rate, self.burst, self.tokens, self.last = rate, burst, burst, None

  def refill(self, now: float) -> None:
    if self.last is not None and now > self.last:
      self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
    if self.last is None or now > self.last:
      self.last = now


class TenantTable:
  """The Python tenant table: identification and token buckets (the C++ `_native.Tenants` has
  the same methods; the front ends use whichever the server built). Not thread-safe: used from
  the event loop only."""

  def __init__(self, tenants: Sequence[Tenant]):
    self.tenants = tuple(tenants)
    self._tokens = [(t.encode(), i) for i, ten in enumerate(self.tenants) for t in ten.tokens]
    self._ids = {n: i for i, ten in enumerate(self.tenants) for n in ten.identities}
    self._index = {t.name: i for i, t in enumerate(self.tenants)}
    self._buckets = [(_Bucket(t.requests_per_s, t.requests_burst) if t.requests_per_s != UNLIMITED
                      else None, _Bucket(t.rows_per_s, t.rows_burst)
                      if t.rows_per_s != UNLIMITED else None) for t in self.tenants]
    self._admitted = [0] * len(self.tenants)
    self._over = [0] * len(self.tenants)

  def identify(self, authorization: str | bytes | None, identities: Sequence[str]) -> int:
    """The tenant (index) of a bearer `authorization` value, else of the first of the peer's
    certificate names that is a tenant's; -1 for none. Every token is compared in constant
    time."""
    if authorization is not None:
      if isinstance(authorization, str):
        authorization = authorization.encode("ascii", "replace")
      scheme, _, given = authorization.partition(b" ")
      if scheme.lower() == b"bearer":
        given, found = given.strip(), -1
        for token, i in self._tokens:
          if hmac.compare_digest(given, token) and found < 0:
            found = i
        if found >= 0:
          return found
    for name in identities:
      if (i := self._ids.get(name)) is not None:
        return i
    return -1

  def admit(self, tenant: int, rows: int, now: float) -> tuple[str, float]:
    """Charges one request of `rows` rows to `tenant` at `now` (seconds, monotonic): ("", 0)
    when admitted, else why not (nothing is charged then) and the seconds until the quota would
    admit it (0: never, more rows than the burst)."""
    t = self.tenants[tenant]
    req, row = self._buckets[tenant]
    why, retry_s = "", 0.0
    if req is not None:
      req.refill(now)
      if req.tokens < 1:
        why = f"tenant '{t.name}' is over its quota of {t.requests_per_s:g} requests/s"
        retry_s = (1 - req.tokens) / req.rate
    if row is not None and not why:
      row.refill(now)
      if rows > row.burst:
        why = (f"tenant '{t.name}' sent {rows} rows in one request, more than its burst of"
               f" {t.rows_burst:g} rows ({t.rows_per_s:g} rows/s)")
      elif row.tokens < rows:
        why = f"tenant '{t.name}' is over its quota of {t.rows_per_s:g} rows/s"
        retry_s = (rows - row.tokens) / row.rate
    if why:
      self._over[tenant] += 1
      return why, retry_s
    if req is not None:
      req.tokens -= 1
    if row is not None:
      row.tokens -= rows
    self._admitted[tenant] += 1
    return "", 0.0

  def index(self, name: str) -> int:
    return self._index.get(name, -1)

  def name(self, tenant: int) -> str:
    return self.tenants[tenant].name

  def priority(self, tenant: int) -> int:
    return self.tenants[tenant].priority

  def stats(self) -> dict[str, tuple[int, int]]:
    """Tenant name -> (requests admitted, requests refused over quota)."""
    return {t.name: (self._admitted[i], self._over[i]) for i, t in enumerate(self.tenants)}
