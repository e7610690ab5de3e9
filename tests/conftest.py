import os

# Routing follows the default machine profile in tests, whatever `batchnorm tune` stored here.
os.environ["BATCHNORM_PROFILE"] = os.path.join(os.path.dirname(__file__), "no-such-profile.json")

import pytest
import torch
from hypothesis import HealthCheck, settings

# Example counts are chosen so `make test` stays under 15 minutes on 2 cores; the "fuzz" profile
# (HYPOTHESIS_PROFILE=fuzz) runs many more.
settings.register_profile("ci", deadline=None, suppress_health_check=[HealthCheck.too_slow],
                          derandomize=True)
settings.register_profile("fuzz", deadline=None, max_examples=5000,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}


def assert_close_scaled(actual, expected, tol, what=""):
    """|actual - expected| <= tol * max(1, max|expected|): tolerance relative to the output scale."""
    expected = expected.double()
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    err = (actual.double() - expected).abs().max().item() if expected.numel() else 0.0
    assert err <= tol * scale, f"{what}: max error {err:.3e} > {tol:.0e} x scale {scale:.3g}"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
