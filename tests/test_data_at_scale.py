"""benchmarks/data_at_scale.py at tiny sizes: it runs end to end, its last line is JSON with every
measurement, and the scan cache is seen at work (no file checked on the second launch, one after a
change). Checks the contract, not speed; never drops the page cache (--no-cold)."""

import json

import pytest


@pytest.mark.slow
def test_data_at_scale_runs_at_tiny_sizes(tmp_path, capsys):
    from benchmarks import data_at_scale

    data_at_scale.main(["--tmp", str(tmp_path), "--scan-files", "40", "--images", "12", "--classes", "2",
                        "--shard-size", "5", "--seconds", "0.2", "--warmup", "1", "--rounds", "2",
                        "--batch-size", "4", "--workers", "1", "--global-size", "32", "--local-size", "16",
                        "--no-cold"])
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    assert "shards / folder (medians)" in "\n".join(out[:-1])  # the table comes first
    scan = result["scan"]
    assert [scan[k]["checked"] for k in ("first", "second", "after_one_change", "cache_off")] == [40, 0, 1, 40]
    assert all(scan[k]["images"] == 40 for k in ("first", "second", "after_one_change"))
    assert scan["second_over_first"] > 0 and scan["bench_data"]["num_images"] == 40
    convert = result["convert"]["warm"]
    assert convert["images"] == 12 and convert["shards"] == 3 and convert["bad"] == 0 and convert["mb_per_s"] > 0
    through = result["throughput"]
    assert [len(through["runs"][k]) for k in ("folder", "shards")] == [2, 2]
    assert through["shards_over_folder"] > 0
    assert all(0 <= r["feed_wait"] <= 1 for runs in through["runs"].values() for r in runs)
    assert "cold" not in result and set(result["targets"]) == {"scan_second_under_quarter_of_first",
                                                               "shards_at_least_folder"}
    assert list(tmp_path.iterdir()) == []  # the generated data is deleted
