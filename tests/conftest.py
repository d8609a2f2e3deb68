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
