"""Sequence layouts: split then unsplit is the identity; padding is a global suffix."""
import pytest
import torch

from toolkit.attention.layout import SequenceLayout, chunk_spans


@pytest.mark.parametrize("kind", ["zigzag", "contiguous"])
def test_round_trip_all_lengths_and_worlds(kind):
    for world in range(1, 5):
        for ring in [r for r in range(1, world + 1) if world % r == 0]:
            layout = SequenceLayout(kind, ring=ring, ulysses=world // ring)
            for n in range(1, 71):
                x = torch.arange(n) * 10 + 3
                shards = [layout.split(x, r, u, dim=0, pad_value=-1) for r in range(ring) for u in range(world // ring)]
                assert len({s.numel() for s in shards}) == 1, "every rank holds the same number of slots"
                torch.testing.assert_close(layout.unsplit(shards, n, dim=0), x)
                idx = torch.cat([layout.local_indices(n, r, u) for r in range(ring) for u in range(world // ring)])
                assert sorted(idx.tolist()) == list(range(layout.padded_length(n))), "a partition of the padded range"
                for s, pos in zip(shards, (layout.local_indices(n, r, u) for r in range(ring) for u in range(world // ring))):
                    assert torch.equal(s == -1, pos >= n), "padding exactly where positions run past n"


def test_zigzag_pieces_pair_front_and_back():
    layout = SequenceLayout("zigzag", ring=3)
    assert layout.ring_piece(12, 0).tolist() == [0, 1, 10, 11]
    assert layout.ring_piece(12, 1).tolist() == [2, 3, 8, 9]
    assert layout.ring_piece(12, 2).tolist() == [4, 5, 6, 7]


def test_split_along_other_dims():
    layout = SequenceLayout("zigzag", ring=2, ulysses=2)
    x = torch.randn(2, 3, 13, 5)
    shards = [layout.split(x, r, u, dim=2) for r in range(2) for u in range(2)]
    torch.testing.assert_close(layout.unsplit(shards, 13, dim=2), x)


def test_bad_arguments_say_what_works():
    with pytest.raises(ValueError, match="zigzag, contiguous"):
        SequenceLayout("diagonal")
    with pytest.raises(ValueError, match="positive"):
        chunk_spans(10, 0)
    assert chunk_spans(10, 4) == [(0, 4), (4, 8), (8, 10)]
