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


def test_every_tool_has_a_console_script_and_every_console_script_a_tool():
    """tools/<tool>.py and the console script miniplm-<tool, hyphens> run the same
    megatron_miniplm.cli.<tool>:main; the installed metadata is setup.py's after `make install`."""
    import os
    from importlib.metadata import distribution

    tools_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools")
    tools = sorted(name[:-3] for name in os.listdir(tools_dir) if name.endswith(".py"))
    want = {f"miniplm-{tool.replace('_', '-')}": f"megatron_miniplm.cli.{tool}:main" for tool in tools}
    scripts = {ep.name: ep for ep in distribution("megatron-miniplm").entry_points if ep.group == "console_scripts"}
    assert {name: ep.value for name, ep in scripts.items()} == want, "setup.py changed? run `make install`"
    for ep in scripts.values():
        assert callable(ep.load()), ep
