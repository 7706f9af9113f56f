"""stages.data.JoinedLoader: batches joined from several loaders, exact resume by part."""

from __future__ import annotations

import itertools

import pytest

from arr_coc.errors import DataError
from stages.data import JoinedLoader


class CountingLoader:
    """Endless batches of ``{"i": n}`` items with a resumable position (a ShardLoader stand-in)."""

    def __init__(self, batch_size: int, start: int = 0):
        self.batch_size, self.position = batch_size, start

    def __iter__(self):
        while True:
            batch = [{"i": self.position + k} for k in range(self.batch_size)]
            self.position += self.batch_size
            yield batch

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]


def joined(hard_start: int = 0, replay_start: int = 100, replay: bool = True) -> JoinedLoader:
    return JoinedLoader({
        "hard": (CountingLoader(2, hard_start), {"hard": True}),
        "replay": (CountingLoader(1, replay_start), {"hard": False}) if replay else None,
    })


def test_batches_join_the_parts_in_order_with_their_fields():
    batch = next(iter(joined()))
    assert batch == [{"i": 0, "hard": True}, {"i": 1, "hard": True}, {"i": 100, "hard": False}]
    assert set(joined().state_dict()) == {"hard", "replay"}
    assert set(joined(replay=False).state_dict()) == {"hard"}  # a part that is off is left out
    assert next(iter(joined(replay=False))) == [{"i": 0, "hard": True}, {"i": 1, "hard": True}]


def test_resume_from_state_continues_exactly():
    straight = list(itertools.islice(iter(joined()), 5))
    first = joined()
    head = list(itertools.islice(iter(first), 2))
    resumed = joined()
    resumed.load_state_dict(first.state_dict())
    assert head + list(itertools.islice(iter(resumed), 3)) == straight


def test_a_state_without_a_part_is_an_error_naming_it():
    with pytest.raises(DataError, match="replay"):
        joined().load_state_dict({"hard": {"position": 4}})
