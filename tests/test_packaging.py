"""What the package declares, checked against what its dependencies declare."""

from importlib.metadata import requires

from packaging.requirements import Requirement
from packaging.version import Version


def _requirement(package: str, name: str, extra: str) -> Requirement:
    for line in requires(package) or []:
        req = Requirement(line)
        if req.name == name and req.marker is not None and req.marker.evaluate({"extra": extra}):
            return req
    raise AssertionError(f"{package} declares no {name} for extra {extra}")


def test_the_gpu_extra_asks_for_a_transformer_engine_megatron_core_supports():
    ours = _requirement("megatron-miniplm", "transformer-engine", "gpu")
    theirs = _requirement("megatron-core", "transformer-engine", "dev")
    assert "pytorch" in ours.extras  # the bare name installs only TE's core library
    candidates = [Version(f"2.{minor}.{patch}") for minor in range(0, 30) for patch in (0, 1)]
    allowed = [v for v in candidates if ours.specifier.contains(v, prereleases=True)]
    assert allowed, ours
    assert all(theirs.specifier.contains(v, prereleases=True) for v in allowed), (ours, theirs)
