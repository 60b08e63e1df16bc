"""Instance construction on synthetic token streams with random boundary flags."""
import numpy as np
import pytest

from megatron_miniplm.data.instances import InstanceBuilder, cut_length

EOD = 0


def random_docs(rng, n, domains=3, boundary_rate=0.05):
    """Documents ending in EOD, with flags: EOD always a boundary, others at random
    (some documents have none at all, some are many windows long)."""
    docs = []
    for _ in range(n):
        length = int(rng.choice([rng.integers(1, 20), rng.integers(20, 200), rng.integers(200, 900)]))
        tokens = rng.integers(1, 1000, size=length).astype(np.int32)
        tokens[-1] = EOD
        rate = 0.0 if rng.random() < 0.2 else boundary_rate
        flags = rng.random(length) < rate
        flags[-1] = True
        docs.append((tokens, flags, int(rng.integers(domains))))
    return docs


def build(mode, seq_length, docs, take_every=1):
    b = InstanceBuilder(mode, seq_length)
    out = []
    for i, (tokens, flags, domain) in enumerate(docs):
        b.add(tokens, domain, flags)
        if i % take_every == 0:
            out.append(b.take())
    out.append(b.flush())
    insts = []
    for batch in out:
        ends = np.cumsum(batch.lengths)
        for k, d in enumerate(batch.domains):
            insts.append((batch.tokens[ends[k] - batch.lengths[k]: ends[k]], int(d)))
    return insts


def test_cut_length():
    f = np.zeros(9, dtype=bool)
    assert cut_length(f, 9) == 9  # no boundary: the full window
    f[3] = f[5] = True
    assert cut_length(f, 9) == 6  # up to and including the last boundary
    f[8] = True
    assert cut_length(f, 9) == 9  # the window's last token is a boundary
    g = np.zeros(9, dtype=bool)
    g[0] = True
    assert cut_length(g, 9) == 9  # a cut after the first token is not taken


@pytest.mark.parametrize("seq_length", [16, 63])
def test_miniplm_instances(seq_length):
    rng = np.random.default_rng(seq_length)
    docs = random_docs(rng, 150)
    insts = build("miniplm", seq_length, docs)
    max_len = seq_length + 1
    # Per-domain streams (tokens and flags) in input order.
    streams = {}
    for tokens, flags, d in docs:
        t, f = streams.setdefault(d, ([], []))
        t.append(tokens)
        f.append(flags)
    streams = {d: (np.concatenate(t), np.concatenate(f)) for d, (t, f) in streams.items()}
    pos = {d: 0 for d in streams}
    last = {d: i for i, (_, d) in enumerate(insts)}
    cut_at_boundary = full_without_boundary = 0
    for i, (inst, d) in enumerate(insts):
        tokens, flags = streams[d]
        start = pos[d]
        n = len(inst)
        assert 1 <= n <= max_len
        # Never mixes domains: the instance is the next slice of its own domain's stream.
        np.testing.assert_array_equal(inst, tokens[start:start + n])
        if i != last[d]:
            window = flags[start:start + max_len]
            assert len(window) == max_len
            has_boundary = window[1:].any()
            if has_boundary:
                assert window[n - 1], "ends at a boundary when the window has one"
                assert not window[n:].any(), "and at the last one"
                cut_at_boundary += 1
            else:
                assert n == max_len
                full_without_boundary += 1
        else:
            assert inst[-1] == EOD  # a domain's last instance ends its last document
        pos[d] += n
    # Concatenated instances reproduce each domain's stream exactly.
    assert pos == {d: len(s[0]) for d, s in streams.items()}
    assert cut_at_boundary > 10 and full_without_boundary > 0  # both paths exercised
    assert any(len(x) < max_len for x, _ in insts)


def test_instances_do_not_depend_on_when_they_are_taken():
    docs = random_docs(np.random.default_rng(1), 80)
    a = build("miniplm", 32, docs, take_every=1)
    b = build("miniplm", 32, docs, take_every=1000)
    assert len(a) == len(b)
    assert all(np.array_equal(x, y) and dx == dy for (x, dx), (y, dy) in zip(a, b))


def test_packed_instances():
    docs = random_docs(np.random.default_rng(2), 100)
    insts = build("packed", 31, docs)
    last = {d: i for i, (_, d) in enumerate(insts)}
    for i, (inst, d) in enumerate(insts):
        assert len(inst) == 32 or i == last[d]
    for d in {d for _, _, d in docs}:
        want = np.concatenate([t for t, _, dd in docs if dd == d])
        np.testing.assert_array_equal(np.concatenate([x for x, dd in insts if dd == d]), want)


def test_document_instances():
    docs = random_docs(np.random.default_rng(3), 30)
    insts = build("document", 8, docs)  # seq_length does not cut documents
    assert len(insts) == len(docs)
    for (inst, d), (tokens, _, dd) in zip(insts, docs):
        assert d == dd
        np.testing.assert_array_equal(inst, tokens)


def test_miniplm_needs_flags():
    with pytest.raises(ValueError, match="flags"):
        InstanceBuilder("miniplm", 8).add(np.array([1, 0]), 0)
    with pytest.raises(ValueError):
        InstanceBuilder("bogus", 8)


def test_every_instance_has_a_prediction_that_counts():
    """Predictions from EOD do not count (pad = EOD), and scoring and training need one that
    does: a cut after a carried-over EOD and the next token is not taken, and a domain's
    stream that ends with a carried-over EOD alone drops it."""
    nl = 9  # a newline token: always a boundary
    doc = np.array([1, 2, 3, 4, 5, 6, 7, 8, nl, EOD])  # the window of 9 ends at its newline: EOD carries over
    flags = np.isin(doc, [nl, EOD])
    long_line = np.concatenate([[nl], np.full(20, 3), [EOD]])  # a newline, then no boundary for 20 tokens
    b = InstanceBuilder("miniplm", 8, eod_id=EOD)
    b.add(doc, 0, flags)
    b.add(long_line, 0, np.isin(long_line, [nl, EOD]))
    b.add(doc, 1, flags)  # domain 1 ends with the carried-over EOD
    batch = b.flush()
    insts = np.split(batch.tokens, np.cumsum(batch.lengths)[:-1])
    assert [x.tolist() for x in insts] == [doc[:9].tolist(), [EOD, nl] + [3] * 7, [3] * 9, doc[:9].tolist(),
                                           [3] * 4 + [EOD]]
    assert batch.domains.tolist() == [0, 0, 0, 1, 0]
    assert all(np.any(x[:-1] != EOD) for x in insts)
