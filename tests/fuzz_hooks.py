"""schemathesis hooks for the fuzz runs (tests/test_fuzz.py, scripts/fuzz_serve.py), loaded
through SCHEMATHESIS_HOOKS. They bound the run's time, not what it may send:
- a valid max_tokens / max_completion_tokens above MAX_NEW is lowered to it (the server
  would generate up to the context for each; invalid values are left alone, so negative
  cases stay negative);
- bodies larger than the fuzz server's --max-body-bytes are skipped (a 413 is the transport
  limit, not the schema)."""

from __future__ import annotations

import json
import os

import schemathesis

MAX_NEW = int(os.environ.get("FUZZ_MAX_NEW_TOKENS", "4"))
MAX_BODY = int(os.environ.get("FUZZ_MAX_BODY_BYTES", str(64 * 1024)))


@schemathesis.hook
def map_case(context, case):
    if isinstance(case.body, dict):
        for key in ("max_tokens", "max_completion_tokens"):
            value = case.body.get(key)
            if type(value) is int and value > MAX_NEW:
                case.body[key] = MAX_NEW
    return case


@schemathesis.hook
def filter_case(context, case):
    try:
        return len(json.dumps(case.body).encode()) < MAX_BODY
    except (TypeError, ValueError):  # not JSON-serializable as is: schemathesis sends it its own way
        return True
