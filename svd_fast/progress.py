"""Progress bars for long jobs (tqdm when installed, silent otherwise)."""


def progress_bar(iterable, total, enabled=True, desc=None, unit="batch"):
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc=desc, unit=unit)
