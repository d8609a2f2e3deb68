import pytest
import torch

# The shared checks of the detector tests report their operands like the tests' own asserts.
pytest.register_assert_rewrite("detection_helpers")


@pytest.fixture(scope="module")
def single_thread():
    """The tiny models gain nothing from intra-op threads, and on a shared 2-core machine the
    OpenMP synchronisation of two threads can make them ten times slower.  A module opts in with
    ``pytestmark = pytest.mark.usefixtures("single_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- tests against real detrex
DETREX_HOW_TO = "run them with `make test-detrex DETREX_SRC=<detrex checkout or source archive>`"


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "cuda: device checks that run on a GPU (skipped without one; `pytest -m cuda` on the GPU machine)"
    )
    config.addinivalue_line(
        "markers", f"detrex: tests against real detrex (skipped when it is not available; {DETREX_HOW_TO})"
    )


def _require_detrex() -> bool:
    import os

    return os.environ.get("ENACT_REQUIRE_DETREX", "") not in ("", "0")


def _require_compiled() -> bool:
    import os

    return os.environ.get("ENACT_REQUIRE_COMPILED", "") not in ("", "0")


NOT_BUILT = "enact_ops._C is not built"  # the skip reason of the tests that need the CPU kernels


def pytest_collection_modifyitems(config, items):
    if _require_compiled():  # CI: the compiled kernels must have loaded, else nothing is skipped quietly
        import enact_ops

        if not enact_ops.compiled_available("cpu"):
            status = enact_ops.extension_status()
            raise pytest.UsageError(
                f"ENACT_REQUIRE_COMPILED is set but the enact_ops extension did not load "
                f"({status['extension_file'] or 'no file'}: {status['reason']}); build it with "
                "`pip install --no-build-isolation -e .` or `python -m enact_ops` to see why"
            )
    marked = [item for item in items if item.get_closest_marker("detrex")]
    if not marked:
        return
    try:
        from projects.enact.detrex_support import detrex_root

        detrex_root()
    except Exception as e:  # noqa: BLE001 - any failure to find detrex means: skip (or fail)
        reason = f"detrex is not available ({e}); {DETREX_HOW_TO}"
        if _require_detrex():
            raise pytest.UsageError(f"ENACT_REQUIRE_DETREX is set but {reason}")
        for item in marked:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and _require_compiled() and NOT_BUILT in str(report.longrepr) and "CUDA" not in str(report.longrepr):
        report.outcome = "failed"  # a skip for lack of a GPU stays a skip
        report.longrepr = f"skipped under ENACT_REQUIRE_COMPILED=1: {report.longrepr}"
    if report.skipped and _require_detrex() and item.get_closest_marker("detrex"):
        report.outcome = "failed"
        report.longrepr = f"skipped under ENACT_REQUIRE_DETREX=1 (make test-detrex): {report.longrepr}"
