"""Fixtures: ``conn`` is a connection over each transport, closed after the test."""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Iterator

import pytest

if importlib.util.find_spec("remowt") is None:  # plain ``pytest``: use the checkout these tests belong to
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _util import TRANSPORTS, make_connection

import remowt


@pytest.fixture(params=TRANSPORTS)
def transport_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def conn(transport_kind: str) -> Iterator[remowt.Remowt]:
    connection = make_connection(transport_kind)
    try:
        yield connection
    finally:
        connection.close()


@pytest.fixture
def local_conn() -> Iterator[remowt.Remowt]:
    connection = remowt.connect_local()
    try:
        yield connection
    finally:
        connection.close()
