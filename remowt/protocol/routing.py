"""Route learning as plain data: a distance-vector table with split horizon.

Every node tells each neighbour which addresses it can reach and in how many
hops; a node routes to an address through the neighbour that offers the
fewest hops. No threads and no I/O: the router feeds it events.
"""

from __future__ import annotations

from typing import Dict, Generic, Hashable, List, Optional, Set, Tuple, TypeVar

K = TypeVar("K", bound=Hashable)
MAX_HOPS = 16


class RouteTable(Generic[K]):
    """Which neighbour (link key ``K``) leads to each address."""

    def __init__(self, own: str) -> None:
        self.own = own
        self._peers: Dict[K, str] = {}
        self._adverts: Dict[K, List[Tuple[str, int]]] = {}
        self._best: Dict[str, Tuple[K, int]] = {}

    def link_up(self, key: K, peer: str) -> Set[str]:
        """A neighbour ``peer`` is now reachable over ``key``; returns lost addresses (none)."""
        self._peers[key] = peer
        self._adverts.setdefault(key, [])
        return self._recompute()

    def advertised(self, key: K, reachable: List[Tuple[str, int]]) -> Set[str]:
        """The neighbour on ``key`` announced its table; returns addresses now unreachable."""
        if key not in self._peers:
            return set()
        self._adverts[key] = list(reachable)
        return self._recompute()

    def link_down(self, key: K) -> Set[str]:
        """The link ``key`` is gone; returns addresses now unreachable."""
        self._peers.pop(key, None)
        self._adverts.pop(key, None)
        return self._recompute()

    def next_hop(self, address: str) -> Optional[K]:
        """The link to send a message for ``address`` on, or None."""
        best = self._best.get(address)
        return None if best is None else best[0]

    def reachable(self) -> Dict[str, int]:
        """Every address known, with its hop count."""
        return {addr: hops for addr, (_, hops) in self._best.items()}

    def announcement_for(self, key: K) -> List[Tuple[str, int]]:
        """What to tell the neighbour on ``key``: all we reach, except through it."""
        return sorted((addr, hops) for addr, (via, hops) in self._best.items() if via != key)

    def peer_of(self, key: K) -> Optional[str]:
        return self._peers.get(key)

    def _recompute(self) -> Set[str]:
        best: Dict[str, Tuple[K, int]] = {}
        for key, peer in self._peers.items():
            if peer != self.own:
                best.setdefault(peer, (key, 1))
        for key, advert in self._adverts.items():
            for addr, hops in advert:
                if addr == self.own or hops + 1 > MAX_HOPS:
                    continue
                current = best.get(addr)
                if current is None or hops + 1 < current[1]:
                    best[addr] = (key, hops + 1)
        lost = set(self._best) - set(best)
        self._best = best
        return lost

    def signature(self) -> Dict[K, List[Tuple[str, int]]]:
        """The announcement for every link, to tell whether anything changed."""
        return {key: self.announcement_for(key) for key in self._peers}
