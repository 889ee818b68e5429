import os
import sys

import torch

# Tests import the working tree, installed or not.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.pop("QVL_BACKENDS", None)  # a developer's shell setting must not change what the tests check
# The Triton GEMM runs its first candidate tile instead of autotuning every new shape: tests check results,
# and each candidate is checked once by tests/ops/test_gemm.py (qvl/kernels/gemm.py, AUTOTUNE).
os.environ["QVL_GEMM_AUTOTUNE"] = "0"
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

from hypothesis import HealthCheck, settings  # noqa: E402

# Kernels run through the Triton interpreter on CPU: few examples there, more on a GPU
# (QVL_HYPOTHESIS_EXAMPLES sizes the GPU profile to a lease's time; each new shape is a Triton compile).
# The `ops` fixture (tests/ops/conftest.py) is made once per test, not per example, on purpose: a plan and the
# simulated xformers registration hold for every example.
settings.register_profile("cpu", max_examples=12, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                 HealthCheck.function_scoped_fixture])
settings.register_profile("gpu", max_examples=int(os.environ.get("QVL_HYPOTHESIS_EXAMPLES", 100)), deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.load_profile(os.environ.get("QVL_HYPOTHESIS_PROFILE", "gpu" if torch.cuda.is_available() else "cpu"))

# transformers imports torchvision whenever it is installed; the PyPI wheel needs its op schemas declared
# to import beside a CPU-only torch (see tests/processing/helpers.py).
import importlib.util  # noqa: E402

if importlib.util.find_spec("torchvision") is not None:
    from tests.processing.helpers import define_torchvision_ops

    define_torchvision_ops()
