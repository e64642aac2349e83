"""PathMtuSearch: which packet size a QUIC connection probes and keeps (sans I/O)."""

from quic_relay.pmtu import BLACK_HOLE_HOLD, MAX_PROBES, RAISE_INTERVAL, PathMtuSearch, packet_size_for_mtu


def lose(search: PathMtuSearch, size: int, times: int = MAX_PROBES) -> None:
    for _ in range(times):
        assert search.next_probe(0.0) == size
        search.probe_lost(size)


def test_packet_sizes_of_common_links() -> None:
    assert packet_size_for_mtu(1500) == 1452
    assert packet_size_for_mtu(9000) == 8952


def test_first_probe_is_the_route_ceiling_and_its_ack_ends_the_search() -> None:
    search = PathMtuSearch(base=1200, ceiling=8952)
    assert search.current == 1200
    assert search.next_probe(0.0) == 8952
    assert search.next_probe(0.0) is None  # one probe in flight at a time
    search.probe_acknowledged(8952)
    assert search.current == 8952
    assert not search.searching
    assert search.next_probe(1.0) is None


def test_a_size_fails_only_after_max_probes_losses_in_a_row() -> None:
    search = PathMtuSearch(base=1200, ceiling=8952)
    lose(search, 8952, MAX_PROBES - 1)
    assert search.next_probe(0.0) == 8952  # still worth another try


def test_bisection_converges_below_a_path_limit() -> None:
    path_limit = 1452  # what the path carries; the route says 9000
    search = PathMtuSearch(base=1200, ceiling=8952)
    probes = 0
    while (size := search.next_probe(0.0)) is not None:
        probes += 1
        if size <= path_limit:
            search.probe_acknowledged(size)
        else:
            search.probe_lost(size)
    assert path_limit - 32 <= search.current <= path_limit
    assert probes < 60


def test_a_late_loss_of_a_smaller_probe_does_not_lower_the_size() -> None:
    search = PathMtuSearch(base=1200, ceiling=8952)
    assert search.next_probe(0.0) == 8952
    search.probe_acknowledged(8952)
    search.probe_lost(4000)
    assert search.current == 8952


def test_black_hole_drops_to_the_base_at_once_and_searches_again_shortly_after() -> None:
    search = PathMtuSearch(base=1200, ceiling=8952)
    assert search.next_probe(0.0) == 8952
    search.probe_acknowledged(8952)
    search.black_hole(now=100.0)
    assert search.current == 1200
    assert search.black_holes == 1
    assert search.next_probe(100.0 + BLACK_HOLE_HOLD / 2) is None
    assert search.next_probe(100.0 + BLACK_HOLE_HOLD) == 8952


def test_a_search_that_ended_below_the_ceiling_tries_it_again_after_the_raise_interval() -> None:
    search = PathMtuSearch(base=1200, ceiling=8952)
    while (size := search.next_probe(0.0)) is not None:
        if size <= 1452:
            search.probe_acknowledged(size)
        else:
            search.probe_lost(size)
    found = search.current
    assert search.next_probe(RAISE_INTERVAL - 1) is None
    assert search.next_probe(RAISE_INTERVAL + 1) == 8952
    search.probe_lost(8952)
    assert search.current == found  # a failed raise keeps the confirmed size


def test_a_ceiling_at_the_base_means_no_search() -> None:
    search = PathMtuSearch(base=1200, ceiling=1200)
    assert not search.searching
    assert search.next_probe(0.0) is None
