"""The shared table of tenant decisions: identification and token-bucket admission, which the
Python table (serving/frontend/tenants.py TenantTable) and the C++ one (native/tenants.cc, through
`_native.Tenants`) must both reproduce exactly, messages included (test_tenants.py).

Each case: a tenants file's entries and steps, each
  ("identify", authorization value or None, [certificate names], expected tenant or None), or
  ("admit", tenant, rows, now in seconds, expected refusal message or "" for admitted).
The expectations are worked by hand from the bucket rule: a bucket starts full (its burst),
refills at its rate up to the burst, and a request passes only if the requests bucket holds 1
and the rows bucket holds its rows; a refused request charges nothing.
"""

from __future__ import annotations

TENANTS = [
    {"name": "online", "tokens": ["tok-online", "tok-online-2"], "identities": ["online.svc"],
     "requests_per_s": 2, "requests_burst": 2, "priority": 1},
    {"name": "batch-jobs", "tokens": ["tok-batch"], "rows_per_s": 500, "rows_burst": 1000,
     "priority": 5},
    {"name": "mtls-only", "identities": ["CN-peer", "spiffe://ads/scorer"]},
    {"name": "both", "tokens": ["tok-both"], "requests_per_s": 0.5, "requests_burst": 2,
     "rows_per_s": 10, "rows_burst": 10},
]

OVER_REQ = "tenant 'online' is over its quota of 2 requests/s"
OVER_ROWS = "tenant 'batch-jobs' is over its quota of 500 rows/s"

CASES = {
    "identify": [
        ("identify", "Bearer tok-online", [], "online"),
        ("identify", "bearer tok-online-2", [], "online"),  # scheme case-insensitive
        ("identify", "Bearer   tok-batch  ", [], "batch-jobs"),  # blanks around the token
        ("identify", "Bearer tok-nope", [], None),
        ("identify", "Basic tok-online", [], None),
        ("identify", "tok-online", [], None),
        ("identify", "", [], None),
        ("identify", None, [], None),
        ("identify", None, ["CN-peer"], "mtls-only"),
        ("identify", None, ["nobody", "spiffe://ads/scorer"], "mtls-only"),  # a SAN
        ("identify", None, ["online.svc", "CN-peer"], "online"),  # the first name that is one
        ("identify", "Bearer tok-nope", ["CN-peer"], "mtls-only"),  # the certificate still counts
        ("identify", "Bearer tok-batch", ["CN-peer"], "batch-jobs"),  # the token first
        ("identify", None, ["cn-peer"], None),  # names are exact
    ],
    "requests bucket": [
        ("admit", "online", 1, 10.0, ""),
        ("admit", "online", 1, 10.0, ""),  # the burst of 2
        ("admit", "online", 1, 10.0, OVER_REQ),
        ("admit", "online", 1, 10.25, OVER_REQ),  # 0.5 of a request refilled
        ("admit", "online", 50, 10.5, ""),  # 1 refilled; rows are free for this tenant
        ("admit", "online", 1, 10.5, OVER_REQ),
        ("admit", "online", 1, 100.0, ""),  # refilled to the burst, no more
        ("admit", "online", 1, 100.0, ""),
        ("admit", "online", 1, 100.0, OVER_REQ),
        ("admit", "online", 1, 99.0, OVER_REQ),  # a clock read before the last: no refill
    ],
    "rows bucket": [
        ("admit", "batch-jobs", 600, 0.0, ""),
        ("admit", "batch-jobs", 400, 0.0, ""),  # the burst of 1000 spent
        ("admit", "batch-jobs", 1, 0.0, OVER_ROWS),
        ("admit", "batch-jobs", 300, 0.5, OVER_ROWS),  # 250 refilled
        ("admit", "batch-jobs", 250, 0.5, ""),  # the refused one charged nothing
        ("admit", "batch-jobs", 1001, 9.0, "tenant 'batch-jobs' sent 1001 rows in one request,"
         " more than its burst of 1000 rows (500 rows/s)"),
        ("admit", "batch-jobs", 1000, 9.0, ""),
        ("admit", "batch-jobs", 1, 9.001, OVER_ROWS),  # about 0.5 rows refilled
        ("admit", "batch-jobs", 4, 9.01, ""),  # about 5
    ],
    "both buckets": [
        ("admit", "both", 10, 0.0, ""),
        ("admit", "both", 1, 0.0, "tenant 'both' is over its quota of 10 rows/s"),
        ("admit", "both", 5, 0.5, ""),  # 1.25 requests and 5 rows by then
        # both short: the requests quota is named
        ("admit", "both", 1, 0.5, "tenant 'both' is over its quota of 0.5 requests/s"),
        ("admit", "both", 10, 2.0, ""),  # 1.0 request; rows back to the burst of 10
    ],
    "unlimited": [
        ("admit", "mtls-only", 100000, 0.0, ""),
        ("admit", "mtls-only", 100000, 0.0, ""),
    ],
}

# Tenant-file entries that must be refused at start, and a piece of each message.
BAD_FILES = [
    ({"tenants": []}, "non-empty list"),
    ({"tenants": [{"name": "a"}]}, "tenants[0] (a) needs tokens or identities"),
    ({"tenants": [{"name": "a b", "tokens": ["t"]}]}, "tenants[0].name"),
    ({"tenants": [{"name": "a", "tokens": ["t"], "rows_per_s": -1}]}, "tenants[0].rows_per_s"),
    ({"tenants": [{"name": "a", "tokens": ["t"], "rows_per_s": "5"}]}, "tenants[0].rows_per_s"),
    ({"tenants": [{"name": "a", "tokens": ["t"], "requests_per_s": 5, "requests_burst": 0.5}]},
     "tenants[0].requests_burst"),
    ({"tenants": [{"name": "a", "tokens": ["t"], "rows_burst": 5}]},
     "tenants[0].rows_burst needs rows_per_s"),
    ({"tenants": [{"name": "a", "tokens": ["t"], "priority": -1}]}, "tenants[0].priority"),
    ({"tenants": [{"name": "a", "tokens": ["t"], "quota": 5}]}, "tenants[0].quota is not"),
    ({"tenants": [{"name": "a", "tokens": ["with space"]}]}, "tenants[0].tokens[0]"),
    ({"tenants": [{"name": "a", "tokens": ["t"]}, {"name": "a", "tokens": ["u"]}]},
     "tenants[1].name: 'a' is also a's"),
    ({"tenants": [{"name": "a", "tokens": ["t"]}, {"name": "b", "tokens": ["t"]}]},
     "tenants[1].tokens: a token is also a's"),
    ({"tenants": [{"name": "a", "identities": ["x"]}, {"name": "b", "identities": ["x"]}]},
     "tenants[1].identities: 'x' is also a's"),
]
