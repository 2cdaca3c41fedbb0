"""reflora.conformance: the suite that holds any backend to the oracle.

Run it with ``reflora conform --backend NAME`` (:mod:`reflora.conformance.cli`), from Python with
:func:`reflora.conformance.runner.run`, or under pytest with
``pytest --pyargs reflora.conformance --reflora-backend NAME``. docs/conformance.md describes what is
tested, the tolerance table, the profiles, deviations files and replaying a saved failure. Importing
this package imports nothing; each module loads what it needs.
"""
