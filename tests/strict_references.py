"""pytest hooks: in CI a skipped conformance test is a failure.

Conformance tests compare kdet with its references (torch/torchvision, timm/effdet,
pycocotools, the PyPI weight packages) and the shared real data, and skip with a
reason when one is missing, so that a user's fresh clone still runs. In CI
(``CI=true``, or ``KDET_REQUIRE_REFERENCES=1``) every one of them is installed by
``scripts/test``: a skip there means a test checked nothing, and fails the run.
Skips for other reasons (a TensorFlow-only feature on the JAX backend) stay skips.

conftest.py imports these hooks; a test runs them on a throwaway test folder.
"""
import os
import re

# What a missing reference says: importorskip ("could not import 'x'", "No module
# named"), the explicit skips ("torchvision not installed", "pycocotools is the
# reference") and the shared data fixture.
REFERENCE_SKIP = re.compile(r"not installed|could not import|No module named|"
                            r"is the reference|shared test data not found")


def references_required():
    return (os.environ.get("CI", "").lower() in ("true", "1")
            or os.environ.get("KDET_REQUIRE_REFERENCES", "") == "1")


_reference_skips = []


def _skip_reason(report):
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr)


def pytest_runtest_logreport(report):
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = _skip_reason(report)
        if REFERENCE_SKIP.search(reason):
            _reference_skips.append((report.nodeid, reason))


def pytest_sessionfinish(session, exitstatus):
    if _reference_skips and references_required() and session.exitstatus == 0:
        session.exitstatus = 1


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _reference_skips:
        return
    strict = references_required()
    terminalreporter.section("reference skips" + (" (a failure in CI)" if strict else ""))
    for nodeid, reason in _reference_skips:
        terminalreporter.write_line(f"{nodeid}: {reason}")
    if strict:
        terminalreporter.write_line(
            f"{len(_reference_skips)} conformance test(s) skipped for a missing reference; "
            "CI installs every reference (scripts/test), so this run fails.")
