"""Claims on the real databases: of two drivers taking the same plan, exactly one gets it."""

from __future__ import annotations

import os
import threading
import uuid

import pytest

from dse.claims import Claims

PG_URL = os.environ.get("DSE_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    return f"sqlite:///{tmp_path / 'claims.db'}" if request.param == "sqlite" else PG_URL


def test_one_claim_per_key_and_compare_and_swap_take_over(url):
    study = f"claims-{uuid.uuid4().hex[:8]}"
    a, b = Claims(url, study), Claims(url, study)
    try:
        assert a.claim("plan", "h1", 3) is None
        held = b.claim("plan", "h1", 5)
        assert held is not None and (held.trial, held.owner) == (3, a.owner)
        assert b.claim("plan", "h2", 5) is None  # another key is free
        assert Claims(url, study + "-other").claim("plan", "h1", 1) is None  # another study is separate
        assert b.take_over("plan", "h1", held, 5)
        assert not a.take_over("plan", "h1", held, 7)  # the claim changed since `held` was read
        assert b.get("plan", "h1").trial == 5
        a.release("plan", "h1")  # not a's claim any more: nothing happens
        assert b.get("plan", "h1").owner == b.owner
        b.release("plan", "h1")
        assert b.get("plan", "h1") is None and set(b.all("plan")) == {"h2"}
    finally:
        a.close()
        b.close()


def test_concurrent_claims_have_one_winner(url):
    study = f"race-{uuid.uuid4().hex[:8]}"
    drivers = [Claims(url, study) for _ in range(6)]
    results, barrier = {}, threading.Barrier(len(drivers))

    def take(i):
        barrier.wait()
        results[i] = drivers[i].claim("plan", "same", i)

    threads = [threading.Thread(target=take, args=(i,)) for i in range(len(drivers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for i, held in results.items() if held is None]
    assert len(winners) == 1
    assert all(held.trial == winners[0] for held in results.values() if held is not None)
    for d in drivers:
        d.close()
