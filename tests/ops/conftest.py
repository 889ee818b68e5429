import pytest

from qvl.kernels import DEVICE_TYPE
from tests.ops.backends import make_ops


@pytest.fixture
def device():
    """Where kernels run: 'cuda', or 'cpu' through the Triton interpreter."""
    return DEVICE_TYPE


@pytest.fixture
def ops(request, monkeypatch):
    """The strict plan of one backend, from `@pytest.mark.parametrize("ops", backend_params(op), indirect=True)`
    (tests/ops/backends.py): every registered backend of an operator, one test each."""
    return make_ops(request.param, monkeypatch)
