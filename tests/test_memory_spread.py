"""benchmarks/memory_spread.py against hand-computed memories."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.memory_spread import main, spread  # noqa: E402


def test_two_directions_twice():
    # slots e1, e1, e2, e2: 2 of the 6 pairs agree (cosine 1), the rest are orthogonal; the mean
    # (1/2, 1/2) has norm sqrt(1/2); centred, every slot is +-(1/2, -1/2): one line
    got = spread(torch.tensor([[3.0, 0, 0], [1, 0, 0], [0, 2, 0], [0, 1, 0]]))  # lengths do not matter
    assert got["mean_cosine"] == pytest.approx(2 / 6)
    assert got["mean_norm"] == pytest.approx(0.5**0.5)
    assert got["effective_rank"] == pytest.approx(1.0)


def test_four_opposite_directions():
    # e1, -e1, e2, -e2: two pairs at cosine -1, four at 0; mean 0; two equal singular values
    got = spread(torch.tensor([[1.0, 0], [-1, 0], [0, 1], [0, -1]]))
    assert got["mean_cosine"] == pytest.approx(-2 / 6)
    assert got["mean_norm"] == pytest.approx(0.0)
    assert got["effective_rank"] == pytest.approx(2.0)


def test_it_reads_a_runs_memory_and_refuses_a_checkpoint_without_one(tmp_path, capsys):
    torch.save({"model": {"memory.embeddings": torch.eye(4)}}, tmp_path / "sop.pth")
    torch.save({"model": {"prototypes.weight": torch.eye(4)}}, tmp_path / "carp.pth")
    (row,) = main([str(tmp_path / "sop.pth")])
    assert row["slots"] == 4 and row["mean_cosine"] == pytest.approx(0.0)
    with pytest.raises(SystemExit):
        main([str(tmp_path / "carp.pth")])
    assert "holds no memory" in capsys.readouterr().err
