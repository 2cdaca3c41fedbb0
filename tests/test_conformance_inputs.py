"""What the suite hands a backend: the same examples for the same seed, and bad input that must be refused."""

from __future__ import annotations

import functools
import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest

from reflora import lora
from reflora.backends.reference import ReferenceBackend
from reflora.conformance import profiles, runner, suite
from reflora.conformance.dialect import get as get_dialect
from reflora.conformance.properties import Context

CI = profiles.get("ci")


class Recording(ReferenceBackend):
    """The reference, noting a digest of every x it is asked to quantize or run LoRA on."""

    name = "recording"

    def __init__(self) -> None:
        self.seen: list[str] = []

    def _note(self, x) -> None:
        a = np.asarray(x)
        self.seen.append(
            f"{a.dtype}{a.shape}{a.strides}" + hashlib.sha1(np.ascontiguousarray(a).tobytes()).hexdigest()
        )

    def quantize_4bit(self, x, **kw):
        self._note(x)
        return super().quantize_4bit(x, **kw)

    def lora_backward(self, grad_y, x, W, A, B, scaling, **kw):
        self._note(x)
        self._note(A)
        return super().lora_backward(grad_y, x, W, A, B, scaling, **kw)


def _examples(test_id: str, seed: int, tmp_path) -> list[str]:
    backend = Recording()
    ctx = Context(backend, "recording", get_dialect("reflora"), None)
    test = next(t for t in suite.tests() if t.id == test_id)
    result = runner.run_test(ctx, test, CI, seed, tmp_path)
    assert result.status == "pass" and result.examples == CI.max_examples
    return backend.seen


@pytest.mark.parametrize("test_id", ["quantize_4bit[random, float16]", "lora_backward[random, bfloat16]"])
def test_same_seed_same_examples_other_seed_other_examples(test_id, tmp_path):
    first = _examples(test_id, 5, tmp_path)
    assert len(first) >= CI.max_examples
    assert _examples(test_id, 5, tmp_path) == first
    assert _examples(test_id, 6, tmp_path) != first


def test_same_seed_same_failure_same_bundle(tmp_path):
    from mutants import RaggedTail

    def bundle(directory):
        rep = runner.run_backend(RaggedTail(), "mutants:RaggedTail", CI, 3, bundle_dir=directory,
                                 select=["quantize_4bit[random, float32]"], entries=[])  # fmt: skip
        (r,) = rep.by_status("fail")
        return r

    a, b = bundle(tmp_path / "a"), bundle(tmp_path / "b")
    assert a.message.splitlines()[:-2] == b.message.splitlines()[:-2]  # all but the bundle paths
    assert (tmp_path / "a").iterdir().__next__().name == (tmp_path / "b").iterdir().__next__().name


# Run in a child process: a module, once imported, stays in hypothesis' pool for the whole session.
_DRAWS_SCRIPT = r"""
import contextlib, hashlib, importlib, json, sys
import numpy as np
from reflora.conformance import profiles, runner, suite
from reflora.conformance.dialect import get as get_dialect
from reflora.conformance.properties import Context
from reflora.backends.reference import ReferenceBackend

ci = profiles.get("ci")
chosen = [t for t in suite.tests(dtypes=("float32", "bfloat16")) if t.kind != "case"]
seen = []
runner.run_check = lambda ctx, inputs: seen.append(
    "".join(k + str(a.dtype) + str(a.shape) + hashlib.sha1(np.ascontiguousarray(a).tobytes()).hexdigest()
            for k, a in sorted(inputs.arrays.items())) + repr(inputs.params))
ctx = Context(ReferenceBackend(), "reference", get_dialect("reflora"), None)

def draws(fixed):
    runner.seed_only_draws = fixed
    out = {}
    for t in chosen:
        seen.clear()
        result = runner.TestResult(t.id, t.op, t.dtype, t.kind, "pass")
        runner._run_property(ctx, t, ci, runner._test_seed(0, t.id), result, {})
        out[t.id] = hashlib.sha1("|".join(seen).encode()).hexdigest()
    return out

fixed, free = runner.seed_only_draws, contextlib.nullcontext
before = {"free": draws(free), "fixed": draws(fixed)}
sys.path.insert(0, sys.argv[1])
importlib.import_module("plugin_numbers")
after = {"fixed": draws(fixed), "free": draws(free)}
print(json.dumps({"before": before, "after": after}))
"""


def test_draws_depend_on_the_seed_not_on_the_modules_loaded(tmp_path):
    """A local module's literals (here a plug-in's) join hypothesis' pool of constants; under the runner
    they must not change what a seed draws. The free draws show the hazard is real in this Hypothesis."""
    from reflora.conformance.draws import seed_only_provider

    if seed_only_provider() == "none needed":
        pytest.skip("this Hypothesis draws no literals of loaded modules")
    (tmp_path / "plugin_numbers.py").write_text("NUMBERS = (12345, 777, 31337, 0.123, 3.75, 65519.0)\n")
    run = subprocess.run([sys.executable, "-c", _DRAWS_SCRIPT, str(tmp_path)], capture_output=True,
                         text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout)
    before, after = got["before"], got["after"]
    assert len(before["fixed"]) >= 20
    moved = sorted(i for i in before["fixed"] if before["fixed"][i] != after["fixed"][i])
    assert moved == [], f"the runner's draws changed with a module's import: {moved}"
    free_moved = [i for i in before["free"] if before["free"][i] != after["free"][i]]
    assert free_moved, "hypothesis' free draws no longer depend on loaded modules: seed_only_draws may go"


@pytest.mark.parametrize("kind", ["keeps the pool elsewhere", "draws no constants"])
def test_a_hypothesis_the_provider_does_not_fit_is_named_not_ignored(kind, monkeypatch):
    """Where Hypothesis' internals are not the ones seed_only_draws knows, it warns that draws may depend
    on the loaded modules, and leaves the provider alone; where there is nothing to remove, it is silent."""
    import warnings

    from hypothesis.internal.conjecture import providers

    from reflora.conformance import draws

    def draw_constant(self, *args, **kwargs):
        return None

    fields = {"_maybe_draw_constant": draw_constant} if kind == "keeps the pool elsewhere" else {}
    monkeypatch.setattr(providers, "HypothesisProvider", type("Other", (), fields))
    monkeypatch.setattr(draws, "_warn", functools.cache(draws._warn.__wrapped__))
    draws.seed_only_provider.cache_clear()
    before = providers.AVAILABLE_PROVIDERS["hypothesis"]
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with draws.seed_only_draws():
                assert providers.AVAILABLE_PROVIDERS["hypothesis"] is before
    finally:
        draws.seed_only_provider.cache_clear()
    said = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    if kind == "keeps the pool elsewhere":
        assert len(said) == 1 and "may draw different inputs" in said[0], said
    else:
        assert said == []


def test_profiles_ci_is_fixed_audit_is_fresh_and_bigger():
    ci, audit = profiles.get("ci"), profiles.get("audit")
    assert runner.resolve_seed(ci, None) == 0 and runner.resolve_seed(ci, 9) == 9
    assert len({runner.resolve_seed(audit, None) for _ in range(4)}) > 1
    assert runner.resolve_seed(audit, 9) == 9
    assert audit.max_examples >= 10 * ci.max_examples and audit.max_elements >= 16 * ci.max_elements
    assert audit.max_rank == 256
    with pytest.raises(ValueError, match="known: ci, audit"):
        profiles.get("thorough")


# ---- Bad input: a backend that accepts it fails ------------------------------------------------------


class AcceptsInf(ReferenceBackend):
    """Quantizes non-finite weights by clipping them to the largest finite value."""

    name = "accepts-inf"

    def quantize_4bit(self, x, **kw):
        a = np.asarray(x)
        big = np.finfo(np.float16).max if a.dtype == np.float16 else 1e30
        return super().quantize_4bit(
            np.nan_to_num(a.astype(np.float32), nan=0.0, posinf=big, neginf=-big), **kw
        )


class ForgivingShapes(ReferenceBackend):
    """LoRA that silently truncates x, A, B, bias and the mask to fit W instead of raising."""

    name = "forgiving"

    def lora_forward(self, x, W, A, B, scaling, *, bias=None, dropout_mask=None):
        out, n_in = np.shape(W)
        r = min(np.shape(A)[0], np.shape(B)[1])
        x = np.asarray(x)[..., :n_in]
        mask = None if dropout_mask is None else np.asarray(dropout_mask)[..., :n_in]
        bias = None if bias is None else np.asarray(bias)[:out]
        return lora.forward(x, W, np.asarray(A)[:r, :n_in], np.asarray(B)[:out, :r], scaling, bias=bias,
                            dropout_mask=mask)  # fmt: skip


class WrongOutputShape(ReferenceBackend):
    """Returns y flattened to 2-D: the values are right, the shape is not."""

    name = "flat-output"

    def lora_forward(self, x, W, A, B, scaling, **kw):
        y = super().lora_forward(x, W, A, B, scaling, **kw)
        return y.reshape(-1, y.shape[-1]) if y.ndim != 2 else y


def _report(backend, select, tmp_path) -> runner.Report:
    return runner.run_backend(backend, backend.name, CI, 0, bundle_dir=tmp_path, select=select, entries=[])


def test_a_backend_accepting_non_finite_weights_fails(tmp_path):
    rep = _report(AcceptsInf(), ["quantize_4bit[*-> error, *]"], tmp_path)
    failed = {r.id for r in rep.by_status("fail")}
    for dtype in suite.DTYPES:
        for name in ("NaN weight", "+inf weight", "-inf weight", "random non-finite weight"):
            assert f"quantize_4bit[{name} -> error, {dtype}]" in failed
    message = next(r.message for r in rep.results if r.id == "quantize_4bit[+inf weight -> error, float32]")
    assert message.startswith(
        "quantize_4bit: x[4, 37] = inf (accepted: a state was returned), expected an error"
    )


def test_a_backend_accepting_shapes_that_do_not_fit_fails(tmp_path):
    rep = _report(ForgivingShapes(), ["lora_forward[*, float32]"], tmp_path)
    failed = {r.id for r in rep.by_status("fail")}
    expected = {f"lora_forward[{what} -> error, float32]" for what in
                ("A does not fit W", "B does not fit W", "x does not fit W", "bias does not fit",
                 "dropout mask does not fit", "random broken shape")}  # fmt: skip
    assert failed == expected  # and every valid input still passes
    message = next(
        r.message for r in rep.results if r.id == "lora_forward[A does not fit W -> error, float32]"
    )
    assert (
        "result = a result (accepted), expected an error (bad input must raise: A has shape (4, 25))"
        in message
    )


def test_a_backend_returning_the_wrong_shape_fails(tmp_path):
    rep = _report(WrongOutputShape(), ["lora_forward[3-D x, float32]"], tmp_path)
    (r,) = rep.by_status("fail")
    assert r.message.startswith("lora_forward: y.shape = (10, 9), expected (2, 5, 9) (EXACT)")


@pytest.mark.parametrize(
    "recipe, text",
    [
        ((("pad", 1, 3),), "3 more in memory after each run along axis 1"),
        ((("step", 0, 2),), "every 2th along axis 0"),
        ((("T",), ("pad", 1, 2)), "transposed then 2 more in memory after each run along axis 1"),
    ],
)
def test_a_view_a_bundle_saves_is_the_view_it_loads(recipe, text, tmp_path):
    """Row-padded views (unit inner stride, rows further apart than their length) and every other row:
    the backend gets a non-contiguous view with NaN in the memory it skips, and the bundle rebuilds it."""
    from reflora.conformance.bundle import Inputs, describe_view, load, save

    x = np.arange(5 * 7, dtype=np.float32).reshape(5, 7)
    inputs = Inputs("t[case, float32]", "quantize_4bit", "quantize", "float32")
    inputs.put("x", x, recipe)
    view, base = inputs["x"], inputs.arrays["x"]
    assert np.array_equal(view, x) and not view.flags.c_contiguous and np.shares_memory(view, base)
    assert np.isnan(base).sum() == base.size - x.size  # everything the view skips is NaN
    assert describe_view(recipe) == text
    loaded, _ = load(save(inputs, tmp_path))
    assert loaded.views["x"] == recipe and np.array_equal(loaded["x"], x)
    assert loaded["x"].strides == view.strides
