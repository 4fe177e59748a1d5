"""`distserve up` hands out ports before their servers bind them: never one it already gave, nor one the
command line names for a router or its HTTP API (a decode worker once got the HTTP port the caller had
chosen, and the router could not bind it)."""

from distserve.state.redis_server import free_port
from services import up


def test_a_fresh_port_is_none_already_taken(monkeypatch):
    picks = iter([5000, 5001, 5000, 5001, 5002])
    monkeypatch.setattr(up, "free_port", lambda host: next(picks))
    taken = {5000}  # say, the HTTP port on the command line
    assert up.fresh_port("127.0.0.1", taken) == 5001
    assert up.fresh_port("127.0.0.1", taken) == 5002  # 5000 and 5001 come again and are passed over
    assert taken == {5000, 5001, 5002}


def test_more_routers_take_the_next_free_ports_but_not_taken_ones():
    first = free_port()
    taken = {first + 1}  # a worker got it a moment ago and has not bound it yet
    ports = up.router_ports("127.0.0.1", first, 3, taken)
    assert ports[0] == first and len(set(ports)) == 3
    assert first + 1 not in ports and set(ports[1:]) <= taken  # the ones it chose are taken now too


def test_each_process_gets_a_metrics_port_of_its_own_unless_its_flags_name_one(monkeypatch):
    picks = iter([6000, 6001, 6002])
    monkeypatch.setattr(up, "free_port", lambda host: next(picks))
    taken = {6000}
    assert up.metrics_flags("127.0.0.1", taken, ["--tpot-slo-ms=150"]) == (["--metrics-port", "6001"], "127.0.0.1:6001")
    assert 6001 in taken  # no worker or router gets it after
    for extra in (["--metrics-port", "9100"], ["--metrics-port=9100"]):  # the operator's port wins, and up names none
        assert up.metrics_flags("127.0.0.1", taken, extra) == ([], "")
    assert taken == {6000, 6001}
