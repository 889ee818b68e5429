import pytest

from qvl.kernels import DEVICE_TYPE


@pytest.fixture
def device():
    """Where kernels run: 'cuda', or 'cpu' through the Triton interpreter."""
    return DEVICE_TYPE
