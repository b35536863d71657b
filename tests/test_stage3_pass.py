"""Stage 3 under irregular training loops (stage3_pass.py's [Note: stage-3 pass state]).

Each scenario against an unsharded torch reference (gradients all-reduced, AdamW), with
prefetch off and on: losses rtol 1e-5 at every step, final parameters atol 1e-6, and
every parameter released after every optimizer step (nothing gathered survives a step).
"""

import pytest

import stage3_pass_cases as cases
from hf_zero.testing import run_on_ranks

_cache: dict = {}


PREFETCH = {2: (0, 10**9), 3: (10**9,)}   # world 3: prefetch on only (keeps the suite short)


def _results(world):
    if world not in _cache:
        _cache[world] = run_on_ranks(cases.pass_scenarios, world, PREFETCH[world], timeout_s=400)
    return _cache[world]


@pytest.mark.parametrize(("world", "prefetch"), [(2, 0), (2, 10**9), (3, 10**9)],
                         ids=("world2-no-prefetch", "world2-prefetch", "world3-prefetch"))
@pytest.mark.parametrize("scenario", sorted(cases.SCENARIOS))
def test_irregular_loop_matches_reference(scenario, world, prefetch):
    for rank, r in enumerate(_results(world)):
        run = r[(scenario, prefetch)]
        assert "error" not in run, f"rank {rank}: {run.get('error')}"
        assert run["losses"] == pytest.approx(run["ref"], rel=1e-5), f"rank {rank}"
        assert run["param_diff"] <= 1e-6, f"rank {rank}: parameters differ by {run['param_diff']:.3g}"
        assert run["released"], f"rank {rank}: parameters still gathered after a step"
