"""RolloutStore: one pair per prompt, preference orientation, ties, parquet persistence."""

import json
import math

import pyarrow.parquet as pq
import pytest

from optune_nemo.algorithm.store import PairRecord, PreferencePair, RolloutStore
from optune_nemo.interfaces import Prompt, Sample

REQUIRED_COLUMNS = ("prompt_id", "prompt", "response_a", "response_b", "reward_a", "reward_b",
                    "generated_at_iteration")


def _prompts(n=4, start=0):
    return [Prompt(start + i, f"question {i} é✓", tuple(range(256 + i, 256 + i + 3 + i)),
                   {"answer": i * 3, "tags": ["x", str(i)], "nested": {"k": i}})
            for i in range(n)]


def _sample(ids, text, reason="stop"):
    return Sample(list(ids), text, reason)


def _filled(n=4, rewards=None):
    store = RolloutStore(_prompts(n))
    rewards = rewards or [(0.5 + i, -0.25 * i) for i in range(n)]
    for pid, (ra, rb) in zip(store.prompt_ids(), rewards, strict=True):
        store.set_pair(pid, _sample([1, 2, pid], f"a{pid} ünï", "stop"),
                       _sample([3, 4, 5, pid], f"b{pid} 中文", "length"), ra, rb, iteration=pid % 3)
    return store


def test_new_store_has_no_pairs():
    store = RolloutStore(_prompts(3))
    assert len(store) == 3
    assert store.prompt_ids() == [0, 1, 2]
    assert not all(store.pair(i).has_pair for i in store.prompt_ids())
    assert store.ranking_scores() == {}
    assert store.preference_pairs() == ([], 0)
    rec = store.pair(1)
    assert isinstance(rec, PairRecord)
    assert not rec.has_pair and rec.generated_at_iteration == -1
    assert math.isnan(rec.reward_a) and math.isnan(rec.reward_b)


def test_set_pair_and_ranking_scores():
    store = RolloutStore(_prompts(3))
    sa, sb = _sample([7, 8], "x"), _sample([9], "y", "length")
    store.set_pair(1, sa, sb, 0.25, 0.75, iteration=2)
    rec = store.pair(1)
    assert rec.has_pair and rec.response_a is sa and rec.response_b is sb
    assert (rec.reward_a, rec.reward_b, rec.generated_at_iteration) == (0.25, 0.75, 2)
    assert isinstance(rec.reward_a, float)
    assert rec.ranking_score == 0.75
    assert store.ranking_scores() == {1: 0.75}
    assert not all(store.pair(i).has_pair for i in store.prompt_ids())
    store.set_pair(0, sa, sb, -1, -3, iteration=0)  # ints become floats
    store.set_pair(2, sa, sb, 0.1, 0.1, iteration=0)
    assert all(store.pair(i).has_pair for i in store.prompt_ids())
    assert store.ranking_scores() == {0: -1.0, 1: 0.75, 2: 0.1}
    assert isinstance(store.pair(0).reward_a, float)
    # replacing a pair overwrites it (regeneration)
    store.set_pair(1, sb, sa, -0.5, -0.6, iteration=3)
    assert store.ranking_scores()[1] == -0.5
    assert store.pair(1).generated_at_iteration == 3 and store.pair(1).response_a is sb


def test_unknown_prompt_id_raises():
    store = RolloutStore(_prompts(2))
    with pytest.raises(KeyError):
        store.set_pair(99, _sample([1], "a"), _sample([2], "b"), 0.0, 1.0, iteration=0)


def test_preference_pairs_orientation():
    store = RolloutStore(_prompts(3))
    store.set_pair(0, _sample([10, 11], "a0"), _sample([20], "b0"), 0.9, 0.1, iteration=0)  # a wins
    store.set_pair(1, _sample([12], "a1"), _sample([21, 22, 23], "b1"), -0.4, 0.3, iteration=0)  # b wins
    store.set_pair(2, _sample([13], "a2"), _sample([24], "b2"), -1.0, -0.5, iteration=0)  # b wins
    pairs, ties = store.preference_pairs()
    assert ties == 0
    assert [p.prompt_id for p in pairs] == [0, 1, 2]
    p0, p1, p2 = pairs
    assert isinstance(p0, PreferencePair)
    assert p0.chosen_token_ids == (10, 11) and p0.rejected_token_ids == (20,)
    assert (p0.chosen_reward, p0.rejected_reward) == (0.9, 0.1)
    assert p1.chosen_token_ids == (21, 22, 23) and p1.rejected_token_ids == (12,)
    assert (p1.chosen_reward, p1.rejected_reward) == (0.3, -0.4)
    assert p2.chosen_token_ids == (24,) and p2.rejected_token_ids == (13,)
    assert (p2.chosen_reward, p2.rejected_reward) == (-0.5, -1.0)
    assert p1.prompt_token_ids == store.pair(1).prompt.token_ids
    for p in pairs:
        assert p.chosen_reward > p.rejected_reward


def test_preference_pairs_in_prompt_id_order_and_skip_missing():
    prompts = [Prompt(pid, f"p{pid}", (pid,)) for pid in (30, 10, 20)]
    store = RolloutStore(prompts)
    assert store.prompt_ids() == [10, 20, 30]
    store.set_pair(30, _sample([1], "a"), _sample([2], "b"), 1.0, 0.0, iteration=0)
    store.set_pair(10, _sample([1], "a"), _sample([2], "b"), 1.0, 0.0, iteration=0)
    pairs, ties = store.preference_pairs()
    assert [p.prompt_id for p in pairs] == [10, 30] and ties == 0
    assert list(store.ranking_scores()) == [10, 30]


def test_ties_excluded_from_loss_kept_in_ranking():
    rewards = [(0.5, 0.5), (1.0, 0.0), (0.30, 0.25), (-0.2, -0.2)]
    store = _filled(4, rewards)
    pairs, ties = store.preference_pairs()  # default gap 0.0: only exact ties excluded
    assert ties == 2
    assert [p.prompt_id for p in pairs] == [1, 2]
    assert store.ranking_scores() == {0: 0.5, 1: 1.0, 2: 0.30, 3: -0.2}
    # within the gap: |0.30 - 0.25| = 0.05 <= 0.1 is a tie too
    pairs, ties = store.preference_pairs(min_reward_gap=0.1)
    assert ties == 3 and [p.prompt_id for p in pairs] == [1]
    # gap exactly equal to |r_a - r_b| counts as a tie (<=)
    pairs, ties = store.preference_pairs(min_reward_gap=1.0)
    assert ties == 4 and pairs == []
    # ties stay in the store
    assert all(store.pair(i).has_pair for i in store.prompt_ids()) and len(store) == 4
    assert store.ranking_scores() == {0: 0.5, 1: 1.0, 2: 0.30, 3: -0.2}


def test_duplicate_prompt_ids_rejected():
    p = _prompts(2)
    with pytest.raises(ValueError, match="unique"):
        RolloutStore([p[0], p[1], Prompt(1, "other", (1,))])


def test_state_dict_round_trip():
    store = _filled(5)
    store2 = RolloutStore([])
    store2.load_state_dict(store.state_dict())
    assert store2 == store
    assert store2.prompt_ids() == store.prompt_ids()
    for pid in store.prompt_ids():
        a, b = store.pair(pid), store2.pair(pid)
        assert a.prompt == b.prompt and a.prompt.metadata == b.prompt.metadata
        assert a.response_a == b.response_a and a.response_b == b.response_b
        assert (a.reward_a, a.reward_b, a.generated_at_iteration) == (
            b.reward_a, b.reward_b, b.generated_at_iteration)
    assert store2.preference_pairs() == store.preference_pairs()


def test_state_dict_round_trip_partial_store():
    store = RolloutStore(_prompts(3))
    store.set_pair(1, _sample([5], "a"), _sample([6], "b"), 0.0, 1.0, iteration=0)
    store2 = RolloutStore([])
    store2.load_state_dict(store.state_dict())
    assert not store2.pair(0).has_pair and store2.pair(1).has_pair
    assert math.isnan(store2.pair(0).reward_a)
    assert store2.ranking_scores() == {1: 1.0}


def test_parquet_round_trip(tmp_path):
    store = _filled(4)
    path = tmp_path / "rollouts.parquet"
    store.to_parquet(path)
    assert path.is_file() and not (tmp_path / "rollouts.parquet.tmp").exists()
    loaded = RolloutStore.from_parquet(path)
    assert loaded == store
    for pid in store.prompt_ids():
        a, b = store.pair(pid), loaded.pair(pid)
        assert b.prompt.token_ids == a.prompt.token_ids
        assert b.prompt.metadata == a.prompt.metadata == {"answer": pid * 3, "tags": ["x", str(pid)],
                                                          "nested": {"k": pid}}
        assert b.response_a.token_ids == a.response_a.token_ids
        assert b.response_b.token_ids == a.response_b.token_ids
        assert (b.response_a.text, b.response_b.text) == (a.response_a.text, a.response_b.text)
        assert b.response_a.finish_reason == "stop" and b.response_b.finish_reason == "length"
        assert b.reward_a == a.reward_a and b.reward_b == a.reward_b
        assert b.generated_at_iteration == a.generated_at_iteration
    assert loaded.preference_pairs() == store.preference_pairs()
    assert loaded.ranking_scores() == store.ranking_scores()


def test_parquet_columns(tmp_path):
    store = _filled(3)
    path = tmp_path / "r.parquet"
    store.to_parquet(path)
    table = pq.read_table(path)
    for col in REQUIRED_COLUMNS:
        assert col in table.column_names, col
    assert table.num_rows == 3
    d = table.to_pydict()
    assert d["prompt_id"] == [0, 1, 2]
    assert d["reward_a"] == [store.pair(i).reward_a for i in range(3)]
    assert d["generated_at_iteration"] == [0, 1, 2]
    assert d["response_b"] == ["b0 中文", "b1 中文", "b2 中文"]
    assert json.loads(d["metadata"][1]) == {"answer": 3, "tags": ["x", "1"], "nested": {"k": 1}}
    schema = table.schema
    assert str(schema.field("prompt_id").type) == "int64"
    assert str(schema.field("reward_a").type) == "double"
    assert str(schema.field("generated_at_iteration").type) == "int64"


def test_parquet_round_trip_partial_store(tmp_path):
    store = RolloutStore(_prompts(2))
    store.set_pair(0, _sample([5], "a"), _sample([6], "b"), 0.0, 1.0, iteration=0)
    store.to_parquet(tmp_path / "p.parquet")
    loaded = RolloutStore.from_parquet(tmp_path / "p.parquet")
    # field by field: the NaN rewards of a prompt without a pair defeat `==` on the store
    assert loaded.prompt_ids() == [0, 1]
    assert loaded.pair(0).response_a == store.pair(0).response_a
    assert loaded.pair(0).response_b == store.pair(0).response_b
    assert (loaded.pair(0).reward_a, loaded.pair(0).reward_b) == (0.0, 1.0)
    rec = loaded.pair(1)
    assert not rec.has_pair and rec.response_b is None and rec.generated_at_iteration == -1
    assert math.isnan(rec.reward_a) and math.isnan(rec.reward_b)
    assert rec.prompt == store.pair(1).prompt and rec.prompt.metadata == store.pair(1).prompt.metadata
    assert loaded.ranking_scores() == {0: 1.0}


def test_parquet_overwrite(tmp_path):
    path = tmp_path / "r.parquet"
    _filled(2).to_parquet(path)
    bigger = _filled(4)
    bigger.to_parquet(path)
    assert RolloutStore.from_parquet(path) == bigger


def test_atomic_write_failure_leaves_nothing(tmp_path, monkeypatch):
    def boom(table, where, *args, **kwargs):
        with open(where, "wb") as f:  # a partial file, as a crash mid-write would leave
            f.write(b"PAR1 partial")
        raise OSError("disk full")

    monkeypatch.setattr(pq, "write_table", boom)
    path = tmp_path / "rollouts.parquet"
    with pytest.raises(OSError, match="disk full"):
        _filled(3).to_parquet(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_atomic_write_failure_keeps_existing_file(tmp_path, monkeypatch):
    path = tmp_path / "rollouts.parquet"
    old = _filled(2)
    old.to_parquet(path)
    before = path.read_bytes()

    def boom(table, where, *args, **kwargs):
        with open(where, "wb") as f:
            f.write(b"garbage")
        raise RuntimeError("killed")

    monkeypatch.setattr(pq, "write_table", boom)
    with pytest.raises(RuntimeError, match="killed"):
        _filled(4).to_parquet(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rollouts.parquet"]
    monkeypatch.undo()
    assert RolloutStore.from_parquet(path) == old


def test_equality():
    assert _filled(3) == _filled(3)
    other = _filled(3)
    other.set_pair(1, _sample([1], "z"), _sample([2], "w"), 0.0, 0.0, iteration=9)
    assert other != _filled(3)
    assert _filled(3) != "not a store"


def test_partial_store_round_trip_equal(tmp_path):
    from optune_nemo.algorithm.store import RolloutStore
    from optune_nemo.interfaces import Prompt, Sample

    store = RolloutStore([Prompt(0, "a", (1, 2)), Prompt(1, "b", (3,))])
    store.set_pair(0, Sample([4], "x", "stop"), Sample([5], "y", "length"), 0.0, 1.0, 0)
    store.to_parquet(tmp_path / "s.parquet")
    loaded = RolloutStore.from_parquet(tmp_path / "s.parquet")
    assert loaded == store
    assert not loaded.pair(1).has_pair and loaded.pair(1).reward_a != loaded.pair(1).reward_a  # NaN


# ---------------------------------------------------------------------- n samples per prompt (schema v2)

@pytest.mark.parametrize("rewards, expected", [
    ([0.2, 0.7], (0, 1)),                       # n = 2: always (0, 1), as before num_samples existed
    ([0.7, 0.2], (0, 1)),
    ([0.4, 0.4], (0, 1)),
    ([1.0, 0.0, 2.0], (1, 2)),                  # highest = sample 2, lowest = sample 1
    ([0.3, 0.9, 0.1, 0.9, 0.1], (1, 4)),        # highest: the earlier 0.9; lowest: the later 0.1
    ([0.5, 0.5, 0.5], (0, 2)),                  # all equal: first and last, a tie
    ([-1.0, 3.0, 3.0, -1.0], (1, 3)),
])
def test_pair_indices_rule(rewards, expected):
    from optune_nemo.algorithm.store import pair_indices

    assert pair_indices(rewards) == expected


def test_pair_indices_needs_two_samples():
    from optune_nemo.algorithm.store import pair_indices

    with pytest.raises(ValueError, match="at least 2"):
        pair_indices([1.0])


def _samples(pid, n):
    return [_sample(list(range(j + 1)) + [pid], f"s{j} of {pid}", "stop" if j % 2 else "length") for j in range(n)]


def test_set_samples_keeps_extremes_and_every_reward():
    store = RolloutStore(_prompts(2))
    samples = _samples(0, 4)
    assert store.set_samples(0, samples, [0.1, -0.5, 0.8, -0.5], iteration=3) == (2, 3)
    rec = store.pair(0)
    assert rec.response_a is samples[2] and rec.response_b is samples[3]
    assert (rec.reward_a, rec.reward_b, rec.generated_at_iteration) == (0.8, -0.5, 3)
    assert rec.rewards == (0.1, -0.5, 0.8, -0.5) and rec.num_tokens == (2, 3, 4, 5) and rec.num_samples == 4
    pairs, ties = store.preference_pairs()
    assert ties == 0 and len(pairs) == 1
    assert pairs[0].chosen_token_ids == (0, 1, 2, 0) and pairs[0].rejected_token_ids == (0, 1, 2, 3, 0)
    assert (pairs[0].chosen_reward, pairs[0].rejected_reward) == (0.8, -0.5)
    assert store.ranking_scores() == {0: 0.8}
    # all rewards equal: a tie, kept in the store and the ranking
    store.set_samples(1, _samples(1, 3), [0.25, 0.25, 0.25], iteration=3)
    assert store.preference_pairs()[1] == 1 and store.ranking_scores()[1] == 0.25


def test_set_samples_with_two_equals_set_pair():
    """n = 2 through set_samples stores exactly what set_pair(sample 0, sample 1) stored before."""
    for rewards in ([0.1, 0.9], [0.9, 0.1], [0.5, 0.5]):
        a, b = _filled(1), _filled(1)
        sa, sb = _sample([7], "x"), _sample([8, 9], "y", "length")
        a.set_samples(0, [sa, sb], rewards, iteration=5)
        b.set_pair(0, sa, sb, rewards[0], rewards[1], iteration=5)
        assert a == b and a.preference_pairs() == b.preference_pairs()


def test_set_samples_checks_lengths():
    with pytest.raises(ValueError, match="3 samples but 2 rewards"):
        RolloutStore(_prompts(1)).set_samples(0, _samples(0, 3), [0.0, 1.0], iteration=0)


def test_v2_columns_round_trip(tmp_path):
    from optune_nemo.algorithm.store import SCHEMA_VERSION, VERSION_KEY

    conv = ({"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"}, {"role": "user", "content": "2 + 2?"})
    store = RolloutStore([Prompt(4, "2 + 2?", (1, 2), {"answer": 4}, conv), Prompt(5, "q", (3,))])
    store.set_samples(4, _samples(4, 3), [0.0, 1.0, -1.0], iteration=1)
    path = tmp_path / "r.parquet"
    store.to_parquet(path)
    table = pq.read_table(path)
    assert table.schema.metadata[VERSION_KEY] == str(SCHEMA_VERSION).encode() == b"2"
    d = table.to_pydict()
    assert d["rewards"] == [[0.0, 1.0, -1.0], None]
    assert d["response_num_tokens"] == [[2, 3, 4], None]
    assert json.loads(d["messages"][0]) == list(conv) and json.loads(d["messages"][1]) == []
    assert (d["response_a"][0], d["response_b"][0]) == ("s1 of 4", "s2 of 4")
    loaded = RolloutStore.from_parquet(path)
    assert loaded == store
    assert loaded.pair(4).prompt.messages == conv and loaded.pair(4).prompt.conversation() == list(conv)
    assert loaded.pair(4).rewards == (0.0, 1.0, -1.0) and loaded.pair(4).num_tokens == (2, 3, 4)
    assert loaded.pair(5).prompt.conversation() == [{"role": "user", "content": "q"}]


def _write_v1(path, rows):
    """A rollouts.parquet as written before schema version 2: its 13 columns, no version in the metadata."""
    import pyarrow as pa

    ids = pa.list_(pa.int64())
    schema = pa.schema([("prompt_id", pa.int64()), ("prompt", pa.string()), ("prompt_token_ids", ids),
                        ("response_a", pa.string()), ("response_b", pa.string()),
                        ("response_a_token_ids", ids), ("response_b_token_ids", ids),
                        ("finish_reason_a", pa.string()), ("finish_reason_b", pa.string()),
                        ("reward_a", pa.float64()), ("reward_b", pa.float64()),
                        ("generated_at_iteration", pa.int64()), ("metadata", pa.string())])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def test_version_1_store_still_loads(tmp_path):
    path = tmp_path / "old.parquet"
    _write_v1(path, [
        {"prompt_id": 0, "prompt": "p0", "prompt_token_ids": [1, 2], "response_a": "aa",
         "response_b": "bbb", "response_a_token_ids": [5, 6], "response_b_token_ids": [7, 8, 9],
         "finish_reason_a": "stop", "finish_reason_b": "length", "reward_a": 0.25, "reward_b": 0.75,
         "generated_at_iteration": 2, "metadata": '{"answer": 3}'},
        {"prompt_id": 1, "prompt": "p1", "prompt_token_ids": [3], "response_a": None, "response_b": None,
         "response_a_token_ids": None, "response_b_token_ids": None, "finish_reason_a": None,
         "finish_reason_b": None, "reward_a": None, "reward_b": None, "generated_at_iteration": -1,
         "metadata": "{}"},
    ])
    store = RolloutStore.from_parquet(path)
    rec = store.pair(0)
    assert rec.response_a == Sample([5, 6], "aa", "stop") and rec.response_b == Sample([7, 8, 9], "bbb", "length")
    assert (rec.reward_a, rec.reward_b, rec.generated_at_iteration) == (0.25, 0.75, 2)
    assert rec.rewards == (0.25, 0.75) and rec.num_tokens == (2, 3)
    assert rec.prompt == Prompt(0, "p0", (1, 2)) and rec.prompt.metadata == {"answer": 3}
    assert rec.prompt.conversation() == [{"role": "user", "content": "p0"}]
    assert not store.pair(1).has_pair and store.pair(1).rewards == ()
    pairs, ties = store.preference_pairs()
    assert ties == 0 and [(p.chosen_token_ids, p.rejected_token_ids) for p in pairs] == [((7, 8, 9), (5, 6))]
    # written again, it is a version-2 file with the same pairs
    store.to_parquet(tmp_path / "new.parquet")
    again = RolloutStore.from_parquet(tmp_path / "new.parquet")
    assert again == store and again.pair(0).rewards == (0.25, 0.75)


def test_newer_store_version_is_refused(tmp_path):
    import pyarrow as pa

    from optune_nemo.algorithm.store import VERSION_KEY

    path = tmp_path / "r.parquet"
    _filled(1).to_parquet(path)
    table = pq.read_table(path)
    pq.write_table(table.replace_schema_metadata({VERSION_KEY: b"99"}), path)
    assert isinstance(table, pa.Table)
    with pytest.raises(ValueError, match="version 99"):
        RolloutStore.from_parquet(path)
