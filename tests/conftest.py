"""Suite-wide settings that keep the run deterministic on a loaded CI machine."""

from __future__ import annotations

from hypothesis import HealthCheck, settings

# Hypothesis' timing checks (a per-example deadline, "data generation is too slow")
# measure the machine, not the code: on a shared 2-core runner they fail tests that
# would pass. Every property still runs all its examples and every assertion.
settings.register_profile("bastion", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("bastion")
