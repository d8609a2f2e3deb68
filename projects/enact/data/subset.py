"""A dataset's first items (detrex's ``train.fast_dev_run``: a short evaluation)."""
from typing import List, Sequence

__all__ = ["first_items"]


def first_items(items: Sequence, count: int) -> List:
    """The first ``count`` items of a dataset's dicts (all of them when it has fewer)."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"first_items: count must be an int >= 1, got {count!r}")
    return list(items)[:count]
