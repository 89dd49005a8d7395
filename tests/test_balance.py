"""The balancer's choices and health rules, driven with plain numbers for time: no sockets."""

from __future__ import annotations

from collections import Counter
from itertools import groupby

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from portway.balance import MODES, Balancer, HealthPolicy, Mode, TargetSpec, TargetState, Transition


def specs(*weights: int, backup: tuple[int, ...] = ()) -> list[TargetSpec]:
    return [TargetSpec(f"10.0.0.{i + 1}:80", w, i in backup) for i, w in enumerate(weights)]


def picks(b: Balancer, n: int, client: str = "192.0.2.1", now: float = 0.0) -> list[int]:
    out = []
    for _ in range(n):
        i = b.choose(client, now)
        assert i is not None
        out.append(i)
    return out


def eject(b: Balancer, index: int | TargetState, now: float) -> Transition | None:
    t = None
    for _ in range(b.health.passive_fall):
        t = b.dial_failed(index, now)
    return t


#: The heavier properties build many balancers; a loaded CI machine must not fail them on time alone.
slow_ok = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])

weight_lists = st.lists(st.integers(min_value=1, max_value=9), min_size=1, max_size=8)


# -- roundrobin ---------------------------------------------------------------------------------------


def test_smooth_roundrobin_is_nginx_sequence() -> None:
    b = Balancer(specs(5, 1, 1))
    assert picks(b, 14) == [0, 0, 1, 0, 2, 0, 0] * 2


def test_roundrobin_1_1_2_within_5_percent_over_10000() -> None:
    counts = Counter(picks(Balancer(specs(1, 1, 2)), 10_000))
    for index, share in ((0, 0.25), (1, 0.25), (2, 0.5)):
        assert abs(counts[index] / 10_000 - share) <= 0.05 * share


@given(weight_lists)
def test_roundrobin_exact_shares_per_cycle(weights: list[int]) -> None:
    """Over each full cycle of sum(weights) picks, every target gets exactly its weight."""
    b = Balancer(specs(*weights))
    total = sum(weights)
    for _ in range(3):
        assert Counter(picks(b, total)) == {i: w for i, w in enumerate(weights)}


@given(weight_lists)
def test_roundrobin_is_smooth(weights: list[int]) -> None:
    """No burst: after any number k of picks, no target is a whole pick ahead of its share k*w/W.

    Plain weighted round robin (a,a,a,a,a,b,c for 5,1,1) breaks this after the second pick; the
    smooth variant's running weights stay above -W, which is exactly this bound.
    """
    b = Balancer(specs(*weights))
    total = sum(weights)
    counts = [0] * len(weights)
    for k, i in enumerate(picks(b, total * 3), 1):
        counts[i] += 1
        for j, w in enumerate(weights):
            assert counts[j] < k * w / total + 1
            assert counts[j] > k * w / total - len(weights)


def test_roundrobin_heavy_target_runs_are_short() -> None:
    b = Balancer(specs(1, 18, 1))
    seq = picks(b, 200)
    longest = max(len(list(run)) for target, run in groupby(seq) if target == 1)
    assert longest <= 12  # plain weighted round robin sends all 18 in a row


def test_roundrobin_skips_excluded_and_unavailable() -> None:
    b = Balancer(specs(1, 1, 1))
    eject(b, 1, 0.0)
    assert set(picks(b, 30)) == {0, 2}
    assert b.choose("c", 0.0, exclude={0}) == 2
    assert b.choose("c", 0.0, exclude={0, 2}) is None


# -- weight 0, backups, first -------------------------------------------------------------------------


@given(st.lists(st.integers(min_value=0, max_value=5), min_size=1, max_size=6), st.sampled_from(MODES))
def test_weight_zero_is_never_chosen(weights: list[int], mode: Mode) -> None:
    b = Balancer(specs(*weights), mode, seed=1)
    for n in range(50):
        i = b.choose(f"198.51.100.{n}", 0.0)
        if all(w == 0 for w in weights):
            assert i is None
        else:
            assert i is not None and weights[i] > 0


@pytest.mark.parametrize("mode", MODES)
def test_backups_only_when_no_primary_is_available(mode: Mode) -> None:
    b = Balancer(specs(1, 1, 1, 1, backup=(2, 3)), mode, seed=7)
    assert {b.choose(f"192.0.2.{n}", 0.0) for n in range(100)} <= {0, 1}
    eject(b, 0, 0.0)
    assert {b.choose(f"192.0.2.{n}", 0.0) for n in range(100)} == {1}
    assert b.choose("192.0.2.1", 0.0, exclude={1}) in {2, 3}  # the last primary already failed this dial
    eject(b, 1, 0.0)
    assert {b.choose(f"192.0.2.{n}", 0.0) for n in range(100)} <= {2, 3}
    b.dial_succeeded(0, 0.5)
    assert {b.choose(f"192.0.2.{n}", 0.5) for n in range(100)} == {0}


def test_first_is_ordered_failover() -> None:
    b = Balancer(specs(1, 5, 1), "first")
    assert set(picks(b, 20)) == {0}
    eject(b, 0, 0.0)
    assert set(picks(b, 20)) == {1}
    assert b.choose("c", 0.0, exclude={1}) == 2
    b.probe_result(0, True, 0.1)  # an active check success restores the ejected target
    assert b.choose("c", 0.1) == 0


def test_single_target_fast_path() -> None:
    b = Balancer(specs(1))
    assert b.choose("c", 0.0) == 0
    assert b.choose("c", 0.0, exclude=(0,)) is None
    eject(b, 0, 0.0)
    assert b.choose("c", 0.5) is None
    assert b.choose("c", 1.0) == 0  # half-open after eject_base


# -- leastconn ----------------------------------------------------------------------------------------


def test_leastconn_picks_fewest_active_per_weight() -> None:
    b = Balancer(specs(1, 1, 2), "leastconn")
    for i, n in ((0, 3), (1, 1), (2, 4)):  # per weight: 3, 1, 2
        for _ in range(n):
            b.acquired(i)
    assert b.choose("c", 0.0) == 1
    b.acquired(1)
    b.acquired(1)  # now 3, 3, 2: target 2 (4 active over weight 2) has the fewest per weight
    assert b.choose("c", 0.0) == 2


def test_leastconn_ties_rotate_by_weight() -> None:
    b = Balancer(specs(1, 1, 2), "leastconn")
    counts = Counter(picks(b, 400))  # nothing acquired: everything ties
    assert counts == {0: 100, 1: 100, 2: 200}


@given(weight_lists, st.integers(min_value=1, max_value=200))
def test_leastconn_long_lived_connections_balance_by_weight(weights: list[int], n: int) -> None:
    """Connections that never end spread so that active/weight differs by at most one unit."""
    b = Balancer(specs(*weights), "leastconn")
    for _ in range(n):
        i = b.choose("c", 0.0)
        assert i is not None
        b.acquired(i)
    loads = [t.active / t.spec.weight for t in b.targets]
    assert max(loads) - min(loads) <= 1.0 + 1e-9


def test_released_frees_capacity() -> None:
    b = Balancer(specs(1, 1), "leastconn")
    held = [b.acquired(0), b.acquired(0), b.acquired(1)]
    assert b.choose("c", 0.0) == 1
    b.released(held[0])
    b.released(held[1])
    assert b.choose("c", 0.0) == 0
    b.released(0)  # extra releases never go negative
    assert b.targets[0].active == 0


# -- iphash -------------------------------------------------------------------------------------------

clients = st.lists(
    st.builds("{}.{}.{}.{}".format, *[st.integers(0, 255)] * 4)
    | st.from_regex(r"[0-9a-f:]{3,20}", fullmatch=True),
    min_size=1,
    max_size=60,
    unique=True,
)
keyed_targets = st.lists(
    st.tuples(st.from_regex(r"[a-z0-9.\-]{1,12}:[0-9]{1,5}", fullmatch=True), st.integers(1, 5)),
    min_size=2,
    max_size=8,
    unique_by=lambda kw: kw[0],
)


def assignment(b: Balancer, cs: list[str]) -> dict[str, str]:
    out = {}
    for c in cs:
        i = b.choose(c, 0.0)
        assert i is not None
        out[c] = b.targets[i].spec.key
    return out


@slow_ok
@given(keyed_targets, clients)
def test_iphash_is_stable_per_client(ts: list[tuple[str, int]], cs: list[str]) -> None:
    b = Balancer([TargetSpec(k, w) for k, w in ts], "iphash")
    first = assignment(b, cs)
    assert assignment(b, cs) == first
    # another balancer (another worker, after a restart) with the targets in another order agrees
    other = Balancer([TargetSpec(k, w) for k, w in reversed(ts)], "iphash")
    assert assignment(other, cs) == first


@slow_ok
@given(keyed_targets, clients, st.data())
def test_iphash_only_the_removed_targets_clients_move(
    ts: list[tuple[str, int]], cs: list[str], data: st.DataObject
) -> None:
    b = Balancer([TargetSpec(k, w) for k, w in ts], "iphash")
    before = assignment(b, cs)
    gone = data.draw(st.sampled_from([k for k, _ in ts]))
    b.update([TargetSpec(k, w) for k, w in ts if k != gone])
    after = assignment(b, cs)
    for c in cs:
        if before[c] != gone:
            assert after[c] == before[c]
        else:
            assert after[c] != gone


@slow_ok
@given(keyed_targets, clients, st.data())
def test_iphash_only_the_down_targets_clients_move_and_come_back(
    ts: list[tuple[str, int]], cs: list[str], data: st.DataObject
) -> None:
    b = Balancer([TargetSpec(k, w) for k, w in ts], "iphash", HealthPolicy(fall=1, rise=1))
    before = assignment(b, cs)
    down = data.draw(st.integers(0, len(ts) - 1))
    b.probe_result(down, False, 0.0)
    after = assignment(b, cs)
    for c in cs:
        assert (after[c] == before[c]) == (before[c] != ts[down][0])
    b.probe_result(down, True, 1.0)
    assert assignment(b, cs) == before


@slow_ok
@given(keyed_targets, clients, st.data())
def test_iphash_added_target_only_takes_clients(
    ts: list[tuple[str, int]], cs: list[str], data: st.DataObject
) -> None:
    """Adding a target moves clients only onto it, never between the existing ones."""
    b = Balancer([TargetSpec(k, w) for k, w in ts[:-1]], "iphash")
    before = assignment(b, cs)
    b.update([TargetSpec(k, w) for k, w in ts])
    after = assignment(b, cs)
    new_key = ts[-1][0]
    assert all(after[c] in (before[c], new_key) for c in cs)


@slow_ok
@given(keyed_targets, clients, st.data())
def test_iphash_reweight_moves_clients_only_to_or_from_that_target(
    ts: list[tuple[str, int]], cs: list[str], data: st.DataObject
) -> None:
    b = Balancer([TargetSpec(k, w) for k, w in ts], "iphash")
    before = assignment(b, cs)
    changed = data.draw(st.integers(0, len(ts) - 1))
    key, weight = ts[changed]
    new_weight = data.draw(st.integers(1, 9))
    b.update([TargetSpec(k, new_weight if k == key else w) for k, w in ts])
    after = assignment(b, cs)
    for c in cs:
        if after[c] != before[c]:
            # heavier: clients only move onto it; lighter: only its own clients move away
            assert (after[c] == key) if new_weight > weight else (before[c] == key)
        assert new_weight != weight or after[c] == before[c]


def test_iphash_respects_weights() -> None:
    b = Balancer(specs(1, 1, 2), "iphash")
    counts = Counter(b.choose(f"10.{n // 65536}.{n // 256 % 256}.{n % 256}", 0.0) for n in range(20_000))
    for index, share in ((0, 0.25), (1, 0.25), (2, 0.5)):
        assert abs(counts[index] / 20_000 - share) <= 0.05 * share


def test_iphash_uses_key_not_position() -> None:
    a = Balancer([TargetSpec("a:1"), TargetSpec("b:1"), TargetSpec("c:1")], "iphash")
    b = Balancer([TargetSpec("c:1"), TargetSpec("a:1"), TargetSpec("b:1")], "iphash")
    cs = [f"192.0.2.{n}" for n in range(256)]
    assert assignment(a, cs) == assignment(b, cs)
    assert len(set(assignment(a, cs).values())) == 3


# -- random (power of two choices) -----------------------------------------------------------------------


def test_random_follows_weights_when_idle() -> None:
    counts = Counter(picks(Balancer(specs(1, 1, 2), "random", seed=42), 10_000))
    # two weighted draws, the first wins ties: the first draw's distribution, i.e. the weights
    for index, share in ((0, 0.25), (1, 0.25), (2, 0.5)):
        assert abs(counts[index] / 10_000 - share) <= 0.05 * share


def test_random_prefers_the_less_loaded_of_two() -> None:
    b = Balancer(specs(1, 1), "random", seed=3)
    for _ in range(5):
        b.acquired(0)
    assert set(picks(b, 100)) == {1}  # with two targets, both are always drawn


@given(st.integers(0, 2**32), st.integers(3, 8))
def test_random_never_picks_the_busiest_of_many(seed: int, n: int) -> None:
    """The two draws are distinct targets, so the single most loaded one always loses."""
    b = Balancer(specs(*[1] * n), "random", seed=seed)
    for _ in range(10):
        b.acquired(0)
    assert 0 not in picks(b, 50)


@given(st.integers(1, 9), st.integers(1, 9), st.integers(1, 300), st.integers(0, 2**32))
def test_random_with_two_targets_is_leastconn(w0: int, w1: int, n: int, seed: int) -> None:
    """With two candidates both are always drawn, so long-lived load per weight stays within one unit."""
    b = Balancer(specs(w0, w1), "random", seed=seed)
    for _ in range(n):
        i = b.choose("c", 0.0)
        assert i is not None
        b.acquired(i)
    loads = [t.active / t.spec.weight for t in b.targets]
    assert max(loads) - min(loads) <= 1.0 + 1e-9


@pytest.mark.parametrize("seed", range(5))
def test_random_two_choices_keep_long_lived_load_even(seed: int) -> None:
    """2000 long-lived connections over 8 targets: p2c keeps the spread within a few connections,
    where independent random picks spread by about 45 (measured over 200 seeds: p2c at most 5)."""
    b = Balancer(specs(*[1] * 8), "random", seed=seed)
    for _ in range(2000):
        i = b.choose("c", 0.0)
        assert i is not None
        b.acquired(i)
    active = [t.active for t in b.targets]
    assert max(active) - min(active) <= 8


# -- passive ejection -----------------------------------------------------------------------------------


def test_passive_ejection_backoff_and_half_open() -> None:
    b = Balancer(specs(1, 1), health=HealthPolicy(passive_fall=3, eject_base=1.0, eject_max=5.0))
    assert b.dial_failed(0, 10.0) is None
    assert b.dial_failed(0, 10.0) is None
    t = b.dial_failed(0, 10.0)
    assert t is not None and (t.key, t.old, t.new) == ("10.0.0.1:80", "up", "down")
    assert "ejected for 1s" in t.reason
    assert not b.available(0, 10.5) and b.state_of(0, 10.5) == "down"
    assert b.dial_failed(0, 10.6) is None  # a dial that started before the ejection: no longer
    assert b.targets[0].ejected_until == 11.0
    # half-open: offered again, still reported down, one failure doubles the ejection
    assert b.available(0, 11.0) and b.state_of(0, 11.0) == "down"
    for now, expected_until in ((11.0, 13.0), (13.0, 17.0), (17.0, 22.0), (22.0, 27.0)):  # capped at 5s
        assert b.dial_failed(0, now) is None
        assert b.targets[0].ejected_until == expected_until
    back = b.dial_succeeded(0, 27.0)
    assert back is not None and (back.old, back.new, back.reason) == ("down", "up", "dial succeeded")
    assert b.targets[0].ejections == 0
    # the back-off starts over from the base, and needs passive_fall failures again
    b.dial_failed(0, 30.0)
    b.dial_failed(0, 30.0)
    assert b.available(0, 30.0)
    b.dial_failed(0, 30.0)
    assert b.targets[0].ejected_until == 31.0


def test_success_resets_the_consecutive_count() -> None:
    b = Balancer(specs(1, 1))
    for _ in range(10):
        b.dial_failed(0, 0.0)
        b.dial_failed(0, 0.0)
        assert b.dial_succeeded(0, 0.0) is None
    assert b.available(0, 0.0)


@given(st.lists(st.tuples(st.booleans(), st.floats(0, 5)), max_size=60))
def test_passive_state_machine_invariants(events: list[tuple[bool, float]]) -> None:
    policy = HealthPolicy(passive_fall=2, eject_base=0.5, eject_max=4.0)
    b = Balancer(specs(1, 1), health=policy)
    now = 0.0
    for ok, dt in events:
        now += dt
        before = b.state_of(0, now)
        t = b.dial_succeeded(0, now) if ok else b.dial_failed(0, now)
        after = b.state_of(0, now)
        assert (t is not None) == (before != after)
        if ok:
            assert after == "up" and b.available(0, now)
        target = b.targets[0]
        assert target.ejected_until <= now + policy.eject_max
        assert (target.ejections == 0) == (target.ejected_until == 0.0)


# -- active checks --------------------------------------------------------------------------------------


def test_rise_fall_hysteresis() -> None:
    b = Balancer(specs(1, 1), health=HealthPolicy(rise=2, fall=3))
    assert b.probe_result(0, False, 0.0, "refused") is None
    assert b.probe_result(0, False, 1.0, "refused") is None
    assert b.probe_result(0, True, 2.0) is None  # a success in between restarts the failure count
    assert b.probe_result(0, False, 3.0) is None
    assert b.probe_result(0, False, 4.0) is None
    down = b.probe_result(0, False, 5.0, "connection refused")
    assert down == Transition("10.0.0.1:80", "up", "down", "3 checks failed: connection refused")
    assert not b.available(0, 5.0)
    assert b.probe_result(0, True, 6.0) is None
    assert b.probe_result(0, False, 7.0) is None  # and a failure restarts the success count
    assert b.probe_result(0, True, 8.0) is None
    up = b.probe_result(0, True, 9.0, "ok")
    assert up == Transition("10.0.0.1:80", "down", "up", "2 checks passed: ok")
    assert b.available(0, 9.0)


def test_probe_success_ends_passive_ejection_but_not_an_active_down() -> None:
    b = Balancer(specs(1, 1), health=HealthPolicy(rise=2, fall=1))
    eject(b, 0, 0.0)
    t = b.probe_result(0, True, 0.1)
    assert t is not None and t.new == "up" and b.available(0, 0.1)
    b.probe_result(0, False, 1.0)
    eject(b, 0, 1.0)
    assert b.dial_succeeded(0, 1.1) is None  # a dial success alone does not overrule the checks
    assert not b.available(0, 1.1)


# -- reload ---------------------------------------------------------------------------------------------


def test_update_keeps_state_by_key_and_maps_indexes() -> None:
    b = Balancer([TargetSpec("a:1"), TargetSpec("b:1"), TargetSpec("c:1")], health=HealthPolicy(fall=1))
    held_b = b.acquired(1)
    held_c = b.acquired(2)
    b.probe_result(0, False, 0.0)  # a is down
    mapping = b.update([TargetSpec("c:1", 3), TargetSpec("d:1"), TargetSpec("a:1")], "leastconn")
    assert mapping == {2: 0, 0: 2}
    assert [t.spec.key for t in b.targets] == ["c:1", "d:1", "a:1"]
    assert b.mode == "leastconn"
    assert b.targets[0] is held_c and held_c.active == 1 and held_c.spec.weight == 3
    assert b.targets[2].up is False  # health survives the reload
    assert b.index_of(held_c) == 0 and b.index_of(held_b) is None
    # the removed target's connection can still be released, and reports about it are ignored
    b.released(held_b)
    assert held_b.active == 0
    assert eject(b, held_b, 0.0) is None and b.probe_result(held_b, False, 0.0) is None
    b.released(held_c)
    assert held_c.active == 0


def test_update_can_change_the_health_policy() -> None:
    b = Balancer(specs(1, 1), health=HealthPolicy(fall=3))
    b.probe_result(0, False, 0.0)
    b.update(specs(1, 1), health=HealthPolicy(fall=2))
    t = b.probe_result(0, False, 1.0)  # the failure before the reload still counts
    assert t is not None and t.new == "down"


def test_update_reweights_roundrobin() -> None:
    b = Balancer(specs(1, 1))
    picks(b, 3)
    b.update(specs(3, 1))
    assert Counter(picks(b, 400)) == {0: 300, 1: 100}


def test_bad_input_is_refused_with_the_reason() -> None:
    with pytest.raises(ValueError, match="listed twice"):
        Balancer([TargetSpec("a:1"), TargetSpec("a:1")])
    with pytest.raises(ValueError, match="at least one target"):
        Balancer([])
    with pytest.raises(ValueError, match="unknown load balancing mode 'fastest'"):
        Balancer(specs(1), "fastest")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="weight must be >= 0"):
        TargetSpec("a:1", -1)
    with pytest.raises(ValueError, match="rise must be >= 1"):
        HealthPolicy(rise=0)
    with pytest.raises(ValueError, match="eject_base <= eject_max"):
        HealthPolicy(eject_base=10, eject_max=1)
