"""The pytest plug-in of the conformance suite: its command-line options, a report header, and the
deviation warnings at the end of a run.

Registered under the entry-point group ``pytest11``, so it loads in *every* pytest session where reflora
is installed. It therefore imports nothing at load time beyond the standard library: the suite itself
(hypothesis, the backends, torch behind them) is imported only by ``conformance/test_backends.py``,
which pytest collects for ``pytest --pyargs reflora.conformance --reflora-backend NAME``.
"""

from __future__ import annotations

import random

import pytest

__all__ = [
    "RESULTS",
    "pytest_addoption",
    "pytest_configure",
    "pytest_report_header",
    "pytest_terminal_summary",
]

# config.stash key: {backend spec: [TestResult, ...]}, filled by conformance/test_backends.py.
RESULTS = pytest.StashKey[dict]()
SEED = pytest.StashKey[int]()
PROFILE_SEEDS = {"ci": 0, "audit": None}  # as reflora.conformance.profiles, without importing it


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("reflora", "reflora conformance suite (pytest --pyargs reflora.conformance)")
    group.addoption(
        "--reflora-backend",
        action="append",
        default=[],
        metavar="NAME|module:attr",
        help="run the conformance suite against this backend (repeatable; default: every "
        "available registered backend)",
    )
    group.addoption(
        "--reflora-profile",
        default="ci",
        choices=tuple(PROFILE_SEEDS),
        help="ci: bounded and reproducible (seed 0); audit: thorough, a fresh seed",
    )
    group.addoption("--reflora-seed", type=_seed_int, default=None, metavar="N",
                    help="the run's seed, in [0, 2**32)")  # fmt: skip
    group.addoption("--reflora-bundle-dir", default="reflora-failures", metavar="DIR",
                    help="where failing inputs are saved as .npz bundles")  # fmt: skip
    group.addoption("--reflora-select", action="append", default=[], metavar="PATTERN",
                    help="run only tests whose id matches PATTERN ('*' wildcards, repeatable), as "
                    "reflora conform -k; ids hold characters pytest's -k cannot")  # fmt: skip
    group.addoption("--reflora-deviations", default=None, metavar="FILE",
                    help="a deviations file (TOML) to use instead of each backend's own")  # fmt: skip


def _seed_int(text: str) -> int:
    from reflora.cli import seed_int  # only when the option is given: the plug-in loads the stdlib only

    return seed_int(text)


def _seed(config: pytest.Config) -> int:
    given = config.getoption("reflora_seed")
    if given is not None:
        return int(given)
    default = PROFILE_SEEDS[config.getoption("reflora_profile")]
    return default if default is not None else random.SystemRandom().randrange(2**32)


def pytest_configure(config: pytest.Config) -> None:
    if _conformance_session(config):
        # Before collection imports any backend (bitsandbytes imports Triton): see cli._choose_triton_mode.
        from reflora.backends.triton.backend import use_interpreter

        use_interpreter()
    config.stash[SEED] = _seed(config)  # one seed for the whole session, printed in the header
    config.stash[RESULTS] = {}


def _conformance_session(config: pytest.Config) -> bool:
    asked = config.option.pyargs and any(str(a).startswith("reflora.conformance") for a in config.args)
    return bool(config.getoption("reflora_backend")) or asked


def pytest_report_header(config: pytest.Config) -> list[str]:
    if not _conformance_session(config):
        return []
    return [f"reflora conformance: profile {config.getoption('reflora_profile')}, seed {config.stash[SEED]} "
            f"(repeat with --reflora-seed {config.stash[SEED]})"]  # fmt: skip


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    ran = config.stash.get(RESULTS, {})
    if not ran:
        return
    from reflora.conformance import runner

    for spec, (entries, results) in ran.items():
        for warning in runner._deviation_warnings(results, entries):
            terminalreporter.write_line(f"WARNING reflora {spec}: {warning}", yellow=True)
