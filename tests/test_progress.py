"""RichProgress in a redirected log (a cluster job's stdout): lines within an epoch, not only at its end."""

from carp_fast.callbacks import RichProgress
from carp_fast.carp import carp_learner


def test_redirected_log_gets_lines_within_each_epoch(tiny_dls, tiny_config, capsys):
    learn = carp_learner(tiny_dls, tiny_config, progress=False)  # the learner's own display off
    learn.add_cb(RichProgress(images_per_batch=8, live=False, print_every_s=0.0))
    learn.fit(2)
    lines = capsys.readouterr().out.splitlines()
    n = len(tiny_dls.train)  # 4 batches: a line after batches 1..3, then the epoch's line
    within = [line for line in lines if " batch " in line]
    assert [line.split()[3] for line in within] == [f"{i}/{n}" for i in range(1, n)] * 2
    assert sum(line.startswith("epoch ") and " step " in line for line in lines) == 2


def test_no_lines_within_an_epoch_before_the_interval(tiny_dls, tiny_config, capsys):
    learn = carp_learner(tiny_dls, tiny_config, progress=False)
    learn.add_cb(RichProgress(images_per_batch=8, live=False, print_every_s=3600.0))
    learn.fit(1)
    lines = capsys.readouterr().out.splitlines()
    assert not any(" batch " in line for line in lines) and len(lines) == 1
