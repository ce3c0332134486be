"""benchmarks/method_speed.py runs every embedded method's real Learner and reports its speed."""

import pytest


@pytest.mark.slow
def test_every_method_is_timed_against_carp():
    from benchmarks import method_speed

    result = method_speed.run(["carp", "carl", "massl"], steps=1, warmup=1, repeats=1, batch_size=4, log=lambda _: None)
    assert set(result["methods"]) == {"carp", "carl", "massl"}
    for timing in result["methods"].values():
        assert timing["ms_per_step"] > 0 and timing["images_per_s"] > 0
    assert result["methods"]["carp"]["carp_time_over_this"] == 1.0


def test_an_unknown_method_is_refused_by_name(capsys):
    from benchmarks import method_speed

    with pytest.raises(SystemExit):
        method_speed.main(["--methods", "carp", "byol"])
    assert "byol" in capsys.readouterr().err
