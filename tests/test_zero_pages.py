"""zero_page_flags (kdumpling.pages) against the plain definition: a page is a hole only when
every byte of it is zero, whatever offset the one non-zero byte sits at."""

from __future__ import annotations

import random

import pytest
from kdumpling.pages import zero_page_flags


def _plain(data: bytes, page: int) -> list[bool]:
    return [data[i * page : (i + 1) * page] == bytes(page) for i in range(len(data) // page)]


@pytest.mark.parametrize("page", [4096, 16384, 65536])
def test_one_non_zero_byte_anywhere_keeps_the_page(page: int) -> None:
    # one page per offset: the first sampled offsets miss most of these bytes
    offsets = [0, 1, 8, 63, 64, 100, 2048, page // 2 + 3, page - 8, page - 1]
    data = bytearray(page * (len(offsets) + 2))  # + two zero pages
    for i, off in enumerate(offsets):
        data[i * page + off] = 0x5A
    flags = zero_page_flags(bytes(data), page)
    assert flags == [False] * len(offsets) + [True, True]


def test_random_mixes_match_the_plain_definition() -> None:
    rng = random.Random(12)
    for _ in range(200):
        page = rng.choice([4096, 16384])
        count = rng.randint(0, 24)
        data = bytearray(count * page + rng.choice([0, 0, 100]))  # a partial tail page
        for i in range(count):
            kind = rng.random()
            if kind < 0.4:
                data[i * page + rng.randrange(page)] = rng.randint(1, 255)
            elif kind < 0.7:
                data[i * page : (i + 1) * page] = rng.randbytes(page)
        assert zero_page_flags(bytes(data), page) == _plain(bytes(data), page)


def test_all_pages_with_data_and_all_zero() -> None:
    page = 4096
    full = bytes(range(1, 256)) * (page * 8 // 255 + 1)
    assert zero_page_flags(full[: page * 8], page) == [False] * 8
    assert zero_page_flags(bytes(page * 8), page) == [True] * 8
