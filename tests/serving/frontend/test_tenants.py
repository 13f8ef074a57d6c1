"""Tenant identification and quotas: the shared table of decisions (tenant_cases.py) against the
Python table and the C++ one, and the tenants file's validation."""

from __future__ import annotations

import json

import pytest

from serving.frontend import native as native_frontend
from serving.frontend.tenants import (DEFAULT_PRIORITY, TenantTable, effective_priority,
                                      load_tenants, parse_tenants)
from tenant_cases import BAD_FILES, CASES, TENANTS

NATIVE, WHY = native_frontend.load_extension()


def _tables():
  tenants = parse_tenants({"tenants": TENANTS})
  yield "python", TenantTable(tenants)
  if NATIVE is not None:
    yield "native", NATIVE.Tenants([t.native() for t in tenants])


def test_a_refusal_says_when_the_quota_admits_the_request_again():
  """The wait a refusal reports (what the front ends hold it for), from the token-bucket
  definition by hand: tokens refill at the rate up to the burst; a request needs one request
  token and its rows in row tokens."""
  for impl, table in _tables():
    online, batch = table.index("online"), table.index("batch-jobs")  # 2 req/s; 500 rows/s
    assert table.admit(online, 1, 10.0) == ("", 0.0)
    assert table.admit(online, 1, 10.0) == ("", 0.0)  # the burst of 2 spent
    why, retry = table.admit(online, 1, 10.25)  # 0.5 of a token refilled: 0.5 more at 2/s
    assert why and retry == pytest.approx(0.25), impl
    assert table.admit(batch, 900, 0.0)[0] == ""  # 100 of the burst of 1000 rows left
    why, retry = table.admit(batch, 300, 0.1)  # 150 rows: 150 more at 500 rows/s
    assert why and retry == pytest.approx(0.3), impl
    why, retry = table.admit(batch, 1001, 0.1)  # more than the burst: never
    assert why.startswith("tenant 'batch-jobs' sent 1001 rows") and retry == 0.0, impl


@pytest.mark.parametrize("case", sorted(CASES))
def test_both_tables_follow_the_shared_table(case):
  assert NATIVE is not None or "XLASERVE_REQUIRE_NATIVE" not in __import__("os").environ, WHY
  for impl, table in _tables():  # a fresh table per case: buckets start full
    for step in CASES[case]:
      if step[0] == "identify":
        _, auth, names, want = step
        got = table.identify(auth, names)
        assert (table.name(got) if got >= 0 else None) == want, (impl, step)
      else:
        _, tenant, rows, now, want = step
        assert table.admit(table.index(tenant), rows, now)[0] == want, (impl, step)
    counts = {name: n for name, n in table.stats().items() if n != (0, 0)}
    admits = [s for s in CASES[case] if s[0] == "admit"]
    want = {}
    for _, tenant, _, _, msg in admits:
      ok, over = want.get(tenant, (0, 0))
      want[tenant] = (ok + (msg == ""), over + (msg != ""))
    assert counts == want, impl


def test_identification_takes_bytes_as_http_headers_come():
  for impl, table in _tables():
    assert table.name(table.identify(b"Bearer tok-batch", [])) == "batch-jobs", impl
    assert table.identify(b"Bearer \xff", []) == -1, impl


@pytest.mark.skipif(NATIVE is None, reason=WHY)
def test_a_relay_mark_without_the_tables_secret_names_no_tenant():
  """The HTTP relay's mark (x-xlaserve-tenant) counts only with the secret drawn per table;
  the genuine marks are exercised end to end in test_https_tenants.py."""
  table = NATIVE.Tenants([t.native() for t in parse_tenants({"tenants": TENANTS})])
  assert table.index("batch-jobs") >= 0
  for forged in ("batch-jobs", "", " batch-jobs", "0" * 32 + " batch-jobs", "x" * 33):
    assert table.from_relay_mark(forged) == -1, forged


def test_effective_priority_never_beats_the_tenants():
  assert effective_priority(DEFAULT_PRIORITY, 3) == 3  # none asked: the tenant's
  assert effective_priority(1, 3) == 3  # a better one is capped
  assert effective_priority(7, 3) == 7  # a worse one is kept
  assert effective_priority(7, 0) == 7  # a tenant without a priority: the request's


@pytest.mark.parametrize("doc,piece", BAD_FILES)
def test_a_bad_tenants_file_is_refused_naming_the_field(tmp_path, doc, piece):
  path = tmp_path / "tenants.json"
  path.write_text(json.dumps(doc))
  with pytest.raises(ValueError) as e:
    load_tenants(path)
  assert piece in str(e.value) and str(path) in str(e.value)


def test_unreadable_and_non_json_files_are_refused(tmp_path):
  with pytest.raises(ValueError, match="cannot read the tenants file"):
    load_tenants(tmp_path / "missing.json")
  (tmp_path / "t.json").write_text("{tenants: ")
  with pytest.raises(ValueError, match="not JSON"):
    load_tenants(tmp_path / "t.json")


def test_a_good_file_parses_with_its_defaults(tmp_path):
  path = tmp_path / "tenants.json"
  path.write_text(json.dumps({"tenants": TENANTS}))
  online, batch, mtls, _ = load_tenants(path)
  assert (online.requests_per_s, online.requests_burst, online.priority) == (2, 2, 1)
  assert batch.rows_burst == 1000 and batch.requests_per_s == float("inf")
  assert mtls.identities == ("CN-peer", "spiffe://ads/scorer") and mtls.priority == 0


def test_the_cli_refuses_a_bad_tenants_file_at_start_naming_the_field(tmp_path):
  from procutil import run_cli
  bad = tmp_path / "tenants.json"
  bad.write_text(json.dumps({"tenants": [{"name": "batch-jobs", "tokens": ["t"],
                                          "rows_per_s": -5}]}))
  p = run_cli("--model-repository", str(tmp_path), "--tenants", str(bad))
  assert p.returncode == 2, p.stderr
  assert "tenants[0].rows_per_s must be a number > 0, not -5" in p.stderr and str(bad) in p.stderr
  help_text = run_cli("--help").stdout
  assert "--tenants" in help_text and "--tls-client-ca" in help_text
