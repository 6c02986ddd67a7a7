//! Routes (spec §3.6): deterministic breadth-first search over the topology. Every peer runs the
//! same BFS (levels processed in ascending name order), so all peers agree on the trees.
//!
//! Two link filters: [`LinkFilter::EstablishedSymmetric`] (a link counts only if both ends
//! report an established connection to each other; for data frames) and [`LinkFilter::All`]
//! (every reported connection; for gossip).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::peer::PeerName;
use super::topology::Topology;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LinkFilter {
    EstablishedSymmetric,
    All,
}

/// The neighbours of `peer` under `filter`, ascending by name.
pub fn neighbours(topo: &Topology, peer: PeerName, filter: LinkFilter) -> Vec<PeerName> {
    let Some(entry) = topo.get(peer) else {
        return Vec::new();
    };
    entry
        .conns
        .iter()
        .filter(|c| match filter {
            LinkFilter::All => true,
            LinkFilter::EstablishedSymmetric => {
                c.established
                    && topo
                        .get(c.remote)
                        .and_then(|r| r.conn_to(peer))
                        .is_some_and(|back| back.established)
            }
        })
        .map(|c| c.remote)
        .collect()
}

/// BFS from `start`. Returns (`stop` was dequeued, route map: peer → first hop from `start`;
/// `start` maps to itself). With `stop`, the map holds exactly what was reached when `stop` was
/// dequeued.
fn bfs(
    topo: &Topology,
    start: PeerName,
    stop: Option<PeerName>,
    filter: LinkFilter,
) -> (bool, BTreeMap<PeerName, PeerName>) {
    let mut routes = BTreeMap::new();
    if topo.get(start).is_none() {
        return (false, routes);
    }
    routes.insert(start, start);
    let mut next = vec![start];
    while !next.is_empty() {
        let mut level = std::mem::take(&mut next);
        level.sort();
        for cur in level {
            if Some(cur) == stop {
                return (true, routes);
            }
            let via = routes.get(&cur).copied().unwrap_or(cur);
            for n in neighbours(topo, cur, filter) {
                if routes.contains_key(&n) {
                    continue;
                }
                routes.insert(n, if cur == start { n } else { via });
                next.push(n);
            }
        }
    }
    (false, routes)
}

/// Next hop from `me` for every reachable peer (not `me` itself).
pub fn unicast(topo: &Topology, me: PeerName, filter: LinkFilter) -> BTreeMap<PeerName, PeerName> {
    let (_, mut routes) = bfs(topo, me, None, filter);
    routes.remove(&me);
    routes
}

/// Which of our neighbours we forward a broadcast from `source` to: BFS from `source` until we
/// are dequeued; neighbours not yet reached by then are ours to cover. Empty if `source` does not
/// reach us.
pub fn broadcast(
    topo: &Topology,
    me: PeerName,
    source: PeerName,
    filter: LinkFilter,
) -> Vec<PeerName> {
    let (found, reached) = bfs(topo, source, Some(me), filter);
    if !found {
        return Vec::new();
    }
    neighbours(topo, me, filter)
        .into_iter()
        .filter(|n| !reached.contains_key(n))
        .collect()
}

/// Route tables for one topology snapshot; broadcast fan-outs computed lazily and cached.
#[derive(Debug, Clone)]
pub struct Routes {
    me: PeerName,
    /// For data frames.
    pub unicast: BTreeMap<PeerName, PeerName>,
    /// For gossip.
    pub unicast_all: BTreeMap<PeerName, PeerName>,
    broadcast_cache: HashMap<(PeerName, LinkFilter), Vec<PeerName>>,
}

impl Routes {
    pub fn compute(topo: &Topology) -> Self {
        let me = topo.me();
        Routes {
            me,
            unicast: unicast(topo, me, LinkFilter::EstablishedSymmetric),
            unicast_all: unicast(topo, me, LinkFilter::All),
            broadcast_cache: HashMap::new(),
        }
    }

    /// Next hop toward `dst` for a data frame (`None`: unknown destination, drop).
    pub fn next_hop(&self, dst: PeerName) -> Option<PeerName> {
        self.unicast.get(&dst).copied()
    }

    /// Next hop toward `dst` for a gossip unicast.
    pub fn next_hop_gossip(&self, dst: PeerName) -> Option<PeerName> {
        self.unicast_all.get(&dst).copied()
    }

    /// Our fan-out for a broadcast from `source` (must be called with the same topology).
    pub fn broadcast(
        &mut self,
        topo: &Topology,
        source: PeerName,
        filter: LinkFilter,
    ) -> &[PeerName] {
        let me = self.me;
        self.broadcast_cache
            .entry((source, filter))
            .or_insert_with(|| broadcast(topo, me, source, filter))
    }

    /// Gossip neighbour weights (spec §3.4): how many destinations use each neighbour as next hop.
    pub fn neighbour_weights(&self) -> Vec<(PeerName, u32)> {
        let mut w: BTreeMap<PeerName, u32> = BTreeMap::new();
        for hop in self.unicast_all.values() {
            *w.entry(*hop).or_default() += 1;
        }
        w.into_iter().collect()
    }

    /// All peers reachable for data.
    pub fn reachable(&self) -> BTreeSet<PeerName> {
        self.unicast.keys().copied().collect()
    }
}

/// Data-plane routes: the unicast next hop per destination peer and our broadcast fan-out per
/// source peer (a direct peer is its own next hop).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteTable {
    pub unicast: HashMap<PeerName, PeerName>,
    /// Our broadcast next hops for frames originating at each source peer (including us).
    pub broadcast: HashMap<PeerName, Vec<PeerName>>,
}

impl RouteTable {
    /// Routes for data frames over established, symmetric links of `topo` (spec §3.6).
    pub fn compute(topo: &Topology) -> Self {
        let me = topo.me();
        let unicast: HashMap<PeerName, PeerName> =
            unicast(topo, me, LinkFilter::EstablishedSymmetric)
                .into_iter()
                .collect();
        let broadcast = unicast
            .keys()
            .copied()
            .chain(std::iter::once(me))
            .map(|source| {
                (
                    source,
                    broadcast(topo, me, source, LinkFilter::EstablishedSymmetric),
                )
            })
            .collect();
        RouteTable { unicast, broadcast }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::peer::{Peer, PeerUid};
    use crate::mesh::topology::{ConnSummary, PeerEntry};
    use proptest::prelude::*;
    use std::collections::VecDeque;

    fn name(n: u64) -> PeerName {
        PeerName::from_u64(n + 1)
    }

    /// A topology as seen by peer 0 where every peer reports `edges` (undirected, established),
    /// plus optional one-sided links.
    fn build(n: u64, edges: &[(u64, u64)], one_sided: &[(u64, u64)]) -> Topology {
        let mut adj: BTreeMap<u64, BTreeMap<u64, bool>> = BTreeMap::new();
        for &(a, b) in edges {
            if a != b {
                adj.entry(a).or_default().insert(b, true);
                adj.entry(b).or_default().insert(a, true);
            }
        }
        for &(a, b) in one_sided {
            if a != b {
                adj.entry(a).or_default().entry(b).or_insert(false);
            }
        }
        let mut t = Topology::new(&Peer {
            name: name(0),
            nickname: "me".into(),
            uid: PeerUid(1),
            version: 0,
        });
        let entries: Vec<PeerEntry> = (1..n)
            .map(|p| PeerEntry {
                name: name(p),
                nickname: String::new(),
                uid: PeerUid(p + 1),
                version: 1,
                short_id: None,
                conns: adj
                    .get(&p)
                    .into_iter()
                    .flatten()
                    .map(|(&q, &est)| ConnSummary {
                        remote: name(q),
                        addr: String::new(),
                        outbound: p < q,
                        established: est,
                    })
                    .collect(),
            })
            .collect();
        t.merge(entries);
        for (&q, &est) in adj.get(&0).into_iter().flatten() {
            t.add_local_conn(ConnSummary {
                remote: name(q),
                addr: String::new(),
                outbound: true,
                established: est,
            });
        }
        t
    }

    fn distances(topo: &Topology, from: PeerName) -> BTreeMap<PeerName, usize> {
        let mut d = BTreeMap::from([(from, 0)]);
        let mut q = VecDeque::from([from]);
        while let Some(p) = q.pop_front() {
            let dp = d[&p];
            for n in neighbours(topo, p, LinkFilter::EstablishedSymmetric) {
                if let std::collections::btree_map::Entry::Vacant(e) = d.entry(n) {
                    e.insert(dp + 1);
                    q.push_back(n);
                }
            }
        }
        d
    }

    #[test]
    fn line_and_asymmetry() {
        // 0-1-2, and 0->3 only reported by 0 (not symmetric).
        let t = build(4, &[(0, 1), (1, 2)], &[(0, 3)]);
        let r = unicast(&t, name(0), LinkFilter::EstablishedSymmetric);
        assert_eq!(r.get(&name(1)), Some(&name(1)));
        assert_eq!(r.get(&name(2)), Some(&name(1)));
        assert_eq!(r.get(&name(3)), None);
        let all = unicast(&t, name(0), LinkFilter::All);
        assert_eq!(all.get(&name(3)), Some(&name(3)));
        let routes = Routes::compute(&t);
        assert_eq!(routes.neighbour_weights(), vec![(name(1), 2), (name(3), 1)]);
    }

    #[test]
    fn deterministic_tie_break() {
        // Square 0-1-3, 0-2-3: 3 goes via the lower name, 1.
        let t = build(4, &[(0, 1), (0, 2), (1, 3), (2, 3)], &[]);
        let r = unicast(&t, name(0), LinkFilter::EstablishedSymmetric);
        assert_eq!(r.get(&name(3)), Some(&name(1)));
    }

    proptest! {
        #[test]
        fn routes_are_shortest_and_broadcast_exactly_once(
            n in 2u64..12,
            raw in proptest::collection::vec((0u64..12, 0u64..12), 0..30),
            one_sided in proptest::collection::vec((0u64..12, 0u64..12), 0..5),
        ) {
            let edges: Vec<_> = raw.into_iter().map(|(a, b)| (a % n, b % n)).collect();
            let one: Vec<_> = one_sided.into_iter().map(|(a, b)| (a % n, b % n))
                .filter(|(a, b)| !edges.contains(&(*a, *b)) && !edges.contains(&(*b, *a)))
                .collect();
            let t = build(n, &edges, &one);
            let f = LinkFilter::EstablishedSymmetric;
            // Every peer sees the same topology; view it from each.
            for me_i in 0..n {
                let me = name(me_i);
                let table = unicast(&t, me, f);
                let dist = distances(&t, me);
                let nbrs = neighbours(&t, me, f);
                prop_assert_eq!(table.len() + 1, dist.len());
                for (&dst, &hop) in &table {
                    prop_assert!(nbrs.contains(&hop), "next hop is a neighbour");
                    // Following next hops hop by hop takes exactly dist steps.
                    let mut at = me;
                    let mut steps = 0;
                    while at != dst {
                        at = unicast(&t, at, f)[&dst];
                        steps += 1;
                        prop_assert!(steps <= n as usize);
                    }
                    prop_assert_eq!(steps, dist[&dst]);
                }
            }
            // Broadcast from each source reaches each reachable peer exactly once.
            for s in 0..n {
                let src = name(s);
                let mut received: BTreeMap<PeerName, usize> = BTreeMap::new();
                let mut queue = VecDeque::from([src]);
                while let Some(p) = queue.pop_front() {
                    for next in broadcast(&t, p, src, f) {
                        *received.entry(next).or_default() += 1;
                        queue.push_back(next);
                        prop_assert!(received.values().sum::<usize>() < 200);
                    }
                }
                let reach = distances(&t, src);
                for peer in reach.keys().filter(|p| **p != src) {
                    prop_assert_eq!(received.get(peer).copied(), Some(1), "peer {} from {}", peer, src);
                }
                prop_assert!(!received.contains_key(&src));
                prop_assert_eq!(received.len() + 1, reach.len());
            }
        }
    }
}
