"""Side-by-side timing of several modes on a machine whose speed drifts (shared VMs do): each round runs
every mode once, in an order that rotates from round to round, so drift slows every mode alike."""
import time


def time_interleaved(benchmark, runners, rounds, check=None):
    """Runs pytest-benchmark's `rounds` rounds of all `runners` ({mode: callable}); returns {mode: [seconds
    per round]}. check(output), if given, is asserted on every output."""
    modes = list(runners)
    seconds = {mode: [] for mode in modes}

    def one_round():
        start = len(seconds[modes[0]]) % len(modes)
        for mode in modes[start:] + modes[:start]:
            t0 = time.perf_counter()
            out = runners[mode]()
            seconds[mode].append(time.perf_counter() - t0)
            if check is not None:
                check(out)

    benchmark.pedantic(one_round, rounds=rounds, iterations=1)
    return seconds
