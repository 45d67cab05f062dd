"""The soak (make soak): 200 PPO iterations on model=tiny end without a NaN or a skipped iteration, memory flat."""
import pytest


@pytest.mark.slow
def test_ppo_soak_200_iterations(one_thread, tmp_path, cache_dir):
    from bench.soak_ppo import soak

    res = soak(iterations=200, out=tmp_path / "run", cache_dir=cache_dir)
    print(f"\nsoak: {res}")
    assert res["iterations"] == 200 and not res["non_finite"] and res["skipped_iterations"] == 0
    assert res["rss_growth_mib"] <= 64, res
