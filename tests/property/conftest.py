"""Hypothesis settings for the property tests (issue 10, part 3).

Profiles (``HV_HYPOTHESIS_PROFILE``, default ``ci``):

- ``ci``: the example counts below, which keep every property test together under
  60 s on this 2-core machine while other tests run; no deadline per example (a
  loaded host makes single examples slow, and time is the benchmarks' business);
- ``thorough``: ten times the examples, for a run by hand before a release.

Each test takes its count from :func:`examples`, so the per-test counts are stated
in one place and scale together.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

# Examples per test in the ci profile, by how costly one example is.
EXAMPLES = {
    "pure": 300,  # a parse or a policy call: microseconds
    "cli": 150,  # hv's CLI in-process: argparse plus a failed VM lookup
    "socket": 120,  # a QMP peer on a real unix socket, one connection per example
}

_SCALE = {"ci": 1, "thorough": 10}

settings.register_profile("ci", deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow,
                                                 HealthCheck.function_scoped_fixture])
settings.register_profile("thorough", parent=settings.get_profile("ci"))
PROFILE = os.environ.get("HV_HYPOTHESIS_PROFILE", "ci")
settings.load_profile(PROFILE)


def examples(kind: str) -> int:
    """max_examples for a test of this ``kind`` under the loaded profile."""
    return EXAMPLES[kind] * _SCALE[PROFILE]


def one_line(exc: BaseException) -> str:
    """The error's message, which must be one non-empty line (the CLI prints it as is)."""
    text = str(exc)
    assert text.strip(), f"{type(exc).__name__} with an empty message"
    assert "\n" not in text and "\r" not in text, f"{type(exc).__name__} over several lines: {text!r}"
    return text
