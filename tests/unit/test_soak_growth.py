"""The soak's leak figure: growth per process from the end of its warm-up, over the
processes watched long enough (a process restarted late is not judged on a short life)."""

from __future__ import annotations

from bench.soak import MIN_OBSERVED_S, WARMUP_S, Sample, growth


def life(pid: int, start: float, end: float, rss, fds, tasks=None) -> list[Sample]:
    """Samples of one PID every 10 s, `rss`/`fds`/`tasks` functions of the time."""
    at, samples = start, []
    while at <= end:
        samples.append(
            Sample(at, f"p{pid}", pid, rss(at), fds(at), None if tasks is None else tasks(at))
        )
        at += 10
    return samples


def test_growth_is_the_worst_process_after_its_warm_up():
    steady = life(1, 0, 900, rss=lambda t: 100.0, fds=lambda t: 40, tasks=lambda t: 12)
    # grows fast while warming up (not counted), then leaks 1 fd and 0.1 MiB a minute
    leaking = life(
        2,
        0,
        900,
        rss=lambda t: 200.0 + (0.1 * (t - WARMUP_S) / 60 if t >= WARMUP_S else -50),
        fds=lambda t: 30 + (int((t - WARMUP_S) // 60) if t >= WARMUP_S else -10),
        tasks=lambda t: 20,
    )
    worst = growth(steady + leaking)
    last = max(s.at for s in leaking)
    start = min(s.at for s in leaking if s.at >= WARMUP_S)
    assert worst["fds"] == int((last - WARMUP_S) // 60) - int((start - WARMUP_S) // 60)
    assert round(worst["rss_mb"], 3) == round(0.1 * (last - start) / 60, 3)
    assert worst["tasks"] == 0


def test_a_process_watched_too_briefly_after_warm_up_is_not_judged():
    restarted = life(3, 600, 600 + WARMUP_S + MIN_OBSERVED_S - 20, rss=lambda t: t, fds=lambda t: 1)
    assert growth(restarted) == {"rss_mb": 0.0, "fds": 0.0, "tasks": 0.0}
    watched = life(4, 0, WARMUP_S + MIN_OBSERVED_S, rss=lambda t: t, fds=lambda t: 1)
    assert growth(watched)["rss_mb"] == MIN_OBSERVED_S
