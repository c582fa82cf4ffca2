"""Names unique to one test run, so that nothing another run left behind (a
container, a project dir, a task the daemon still knows) can match or clash
with what this run makes.

`RUN_ID` is fixed for the whole test session (BOINCD_TEST_RUN_ID sets it, e.g.
to tie a CI run's leftovers to its log); `unique()` adds a counter, so two
tests of one session never share a name either.
"""

from __future__ import annotations

import itertools
import os
import uuid

RUN_ID = os.environ.get("BOINCD_TEST_RUN_ID") or uuid.uuid4().hex[:8]
_counter = itertools.count(1)


def unique(base: str) -> str:
    """`<base>_<run id><n>`: lower case, digits and `_`, valid in BOINC result
    names, project URLs and container names."""
    return f"{base}_{RUN_ID}{next(_counter)}"
