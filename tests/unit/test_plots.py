"""The run's figure (optune_nemo/evaluation/heldout.py: reward_per_iteration.png): integer iteration ticks with the
starting policy at the tick `start`, the legend outside the axes, the curves where the records put them."""

from __future__ import annotations

import pytest

from optune_nemo.evaluation.heldout import iteration_ticks, plot_rewards, reward_figure


@pytest.mark.parametrize("first, last, start, ticks", [
    (0, 2, True, [-1, 0, 1, 2]),
    (0, 2, False, [0, 1, 2]),
    (3, 3, True, [2, 3]),
    (0, 10, False, list(range(11))),
    (0, 30, True, [-1, 0, 5, 10, 15, 20, 25, 30]),
    (1, 100, False, [10, 20, 30, 40, 50, 60, 70, 80, 90, 100]),
    (0, 18, False, [0, 2, 4, 6, 8, 10, 12, 14, 16, 18]),
])
def test_iteration_ticks(first, last, start, ticks):
    got, labels = iteration_ticks(first, last, start=start)
    assert got == ticks
    assert labels == (["start"] if start else []) + [str(t) for t in ticks[1 if start else 0:]]


def _records(n):
    return [{"iteration": t, "reward_chosen_mean": 0.1 * t, "reward_rejected_mean": -0.1 * t} for t in range(n)]


def _evals(n):
    return {"baseline": {"reward_mean": -0.5}, "iterations": {str(t): {"reward_mean": 0.2 * t} for t in range(n)}}


def _labels(ax):
    return [(t, lab.get_text()) for t, lab in zip(ax.get_xticks(), ax.get_xticklabels())]


def test_starting_policy_is_labelled_start_and_ticks_are_integers():
    fig = reward_figure(_records(3), _evals(3))
    ax, = fig.axes
    assert _labels(ax) == [(-1, "start"), (0, "0"), (1, "1"), (2, "2")]
    lo, hi = ax.get_xlim()
    assert lo < -1 and hi > 2                          # the start point is inside the axes
    held = next(line for line in ax.get_lines() if "held-out" in line.get_label())
    assert list(held.get_xdata()) == [-1, 0, 1, 2] and list(held.get_ydata()) == pytest.approx([-0.5, 0, 0.2, 0.4])


def test_many_iterations_have_integer_ticks():
    fig = reward_figure(_records(31), _evals(31))
    labels = _labels(fig.axes[0])
    assert labels[0] == (-1, "start")
    assert [t for t, _ in labels[1:]] == [0, 5, 10, 15, 20, 25, 30]
    assert all(float(text) == t for t, text in labels[1:])


def test_without_a_baseline_there_is_no_start():
    fig = reward_figure(_records(3), {})
    assert _labels(fig.axes[0]) == [(0, "0"), (1, "1"), (2, "2")]


@pytest.mark.parametrize("evals", [_evals(3), {}])
def test_legend_lies_outside_the_axes(evals):
    fig = reward_figure(_records(3), evals)
    fig.canvas.draw()
    legend, = fig.legends
    box = legend.get_window_extent()
    assert len(legend.get_texts()) == (3 if evals else 2)
    for ax in fig.axes:
        assert not box.overlaps(ax.get_window_extent()), (box, ax.get_window_extent())
    assert box.y1 <= fig.axes[0].get_window_extent().y0     # below the axes
    assert 0 <= box.x0 and box.x1 <= fig.bbox.width          # and inside the figure


def test_plot_rewards_writes_the_png(tmp_path):
    path = plot_rewards(tmp_path, _records(3), _evals(3))
    assert path == tmp_path / "reward_per_iteration.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
