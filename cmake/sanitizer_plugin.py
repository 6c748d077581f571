"""pytest plugin of cmake/sanitize.sh (`-p sanitizer_plugin`): checks that the tests run the
sanitized leanformer._C, and skips the tests that cannot run under a sanitizer, each with its reason.

SKIPS is the one list of them: fnmatch patterns of node ids, per sanitizer mode ("address", "thread", or
"any"). A test belongs here only when the sanitizer makes it impossible or meaningless (timing,
a tool that cannot start under the preloaded runtime), never to hide a report.
"""
import fnmatch
import os

import pytest

SKIPS = {
    "any": {},
    "address": {
        # Finite differences: thousands of calls on one tiny shape, no path the op tests' forward /
        # backward checks and the fuzz suite's gradient cases do not run; 7x slower under ASan's
        # allocator (linear_attention's: 23 s -> 171 s on 2 loaded cores), 19 of them.
        "*gradcheck*": "gradcheck: minutes per test under ASan, its code paths run by the other tests",
    },
    "thread": {},
}


def pytest_report_header(config):
    import leanformer._C as C

    build = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(C.__file__))))
    return f"sanitizer: {os.environ.get('LEANFORMER_SANITIZE_MODE', '?')}, leanformer._C from {build}"


def pytest_configure(config):
    import leanformer
    from leanformer import _extension

    mode = os.environ.get("LEANFORMER_SANITIZE_MODE")
    built = _extension.build_config().get("sanitize")
    if not mode or built != mode:
        raise pytest.UsageError(
            f"sanitizer_plugin: leanformer at {leanformer.__file__} was built with sanitize={built!r}, "
            f"expected {mode!r}: run the tests through cmake/sanitize.sh")


def pytest_collection_modifyitems(config, items):
    mode = os.environ.get("LEANFORMER_SANITIZE_MODE", "")
    skips = {**SKIPS["any"], **SKIPS.get(mode, {})}
    for item in items:
        for pattern, reason in skips.items():
            if fnmatch.fnmatchcase(item.nodeid, pattern):
                item.add_marker(pytest.mark.skip(reason=f"under {mode} sanitizer: {reason}"))
                break
