//! Single-decree Paxos over broadcast gossip (spec §1.3): every elector is proposer, acceptor
//! and learner; the whole claims map is gossiped and merged (higher promise / accepted wins),
//! so the state is a CRDT and delivery order does not matter.

use std::collections::BTreeMap;

use crate::mesh::peer::PeerName;

/// A process: the UID changes on every start, so a restarted peer is a fresh acceptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct NodeId {
    pub name: PeerName,
    pub uid: u64,
}

/// Ordered by round, then proposer name, then UID; round 0 is "none".
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ProposalId {
    pub round: u64,
    pub proposer: NodeId,
}

impl ProposalId {
    pub fn valid(&self) -> bool {
        self.round > 0
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AcceptedValue {
    /// The peers to create the ring for.
    pub value: Vec<PeerName>,
    /// The proposal that first chose this value.
    pub origin: ProposalId,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeClaims {
    pub promise: ProposalId,
    pub accepted: ProposalId,
    pub accepted_value: AcceptedValue,
}

/// What is gossiped: every node's claims as we know them.
pub type GossipState = BTreeMap<NodeId, NodeClaims>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub id: NodeId,
    pub quorum: usize,
    pub knows: GossipState,
}

impl Node {
    pub fn new(id: NodeId, quorum: usize) -> Self {
        let mut knows = GossipState::new();
        knows.insert(id, NodeClaims::default());
        Node {
            id,
            quorum: quorum.max(1),
            knows,
        }
    }

    /// Start a new round above every round seen.
    pub fn propose(&mut self) {
        let round = self
            .knows
            .values()
            .map(|c| c.promise.round.max(c.accepted.round))
            .max()
            .unwrap_or(0);
        let me = self.id;
        if let Some(ours) = self.knows.get_mut(&me) {
            ours.promise = ProposalId {
                round: round.saturating_add(1),
                proposer: me,
            };
        }
    }

    /// Merge a received state; true when something we know changed.
    pub fn update(&mut self, from: &GossipState) -> bool {
        let mut changed = false;
        for (id, theirs) in from {
            match self.knows.get_mut(id) {
                Some(ours) => {
                    if ours.promise < theirs.promise {
                        ours.promise = theirs.promise;
                        changed = true;
                    }
                    if ours.accepted < theirs.accepted {
                        ours.accepted = theirs.accepted;
                        ours.accepted_value = theirs.accepted_value.clone();
                        changed = true;
                    }
                }
                None => {
                    self.knows.insert(*id, theirs.clone());
                    changed = true;
                }
            }
        }
        changed
    }

    /// Promise, accept and learn from what we know; true when our own claims changed.
    pub fn think(&mut self) -> bool {
        let Some(before) = self.knows.get(&self.id).cloned() else {
            return false;
        };
        let mut ours = before.clone();
        // Promise: the highest promise anyone made.
        for c in self.knows.values() {
            if ours.promise < c.promise {
                ours.promise = c.promise;
            }
        }
        // Accept our own proposal once a quorum promised it.
        if ours.promise.proposer == self.id && ours.promise.valid() {
            let mut count = 0;
            let mut accepted = ProposalId::default();
            let mut value = AcceptedValue::default();
            for (id, c) in &self.knows {
                let promise = if *id == self.id {
                    ours.promise
                } else {
                    c.promise
                };
                if promise == ours.promise {
                    count += 1;
                    if accepted < c.accepted {
                        accepted = c.accepted;
                        value = c.accepted_value.clone();
                    }
                }
            }
            if count >= self.quorum {
                if !accepted.valid() {
                    value = AcceptedValue {
                        value: self.pick_value(),
                        origin: ours.promise,
                    };
                }
                ours.accepted = ours.promise;
                ours.accepted_value = value;
            }
        }
        // Accept what someone accepted for the proposal we promised.
        for c in self.knows.values() {
            if c.accepted == ours.promise && c.accepted.valid() {
                ours.accepted = c.accepted;
                ours.accepted_value = c.accepted_value.clone();
            }
        }
        let changed = ours != before;
        self.knows.insert(self.id, ours);
        changed
    }

    /// The value a quorum accepted, if any.
    pub fn consensus(&self) -> Option<AcceptedValue> {
        let mut counts: BTreeMap<ProposalId, usize> = BTreeMap::new();
        for c in self.knows.values() {
            if c.accepted.valid() {
                let n = counts.entry(c.accepted_value.origin).or_default();
                *n += 1;
                if *n >= self.quorum {
                    return Some(c.accepted_value.clone());
                }
            }
        }
        None
    }

    /// Every peer name we have heard of.
    fn pick_value(&self) -> Vec<PeerName> {
        let mut v: Vec<PeerName> = self.knows.keys().map(|id| id.name).collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Someone proposed: consensus is under way.
    pub fn in_progress(&self) -> bool {
        self.knows.values().any(|c| c.promise.valid())
    }

    /// Nodes heard from (us included).
    pub fn known_nodes(&self) -> usize {
        self.knows.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u64) -> NodeId {
        NodeId {
            name: PeerName::from_u64(n),
            uid: n * 10,
        }
    }

    #[test]
    fn quorum_one_decides_alone() {
        let mut n = Node::new(id(1), 1);
        n.propose();
        assert!(n.think());
        let v = n.consensus().unwrap();
        assert_eq!(v.value, vec![PeerName::from_u64(1)]);
    }

    /// Full exchange among `nodes` until nothing changes: all learn the same value.
    #[test]
    fn three_nodes_agree_even_with_two_proposers() {
        let mut nodes: Vec<Node> = (1..=3).map(|i| Node::new(id(i), 2)).collect();
        nodes[0].propose();
        nodes[2].propose();
        for _ in 0..10 {
            for a in 0..3 {
                for b in 0..3 {
                    if a != b {
                        let s = nodes[a].knows.clone();
                        nodes[b].update(&s);
                        nodes[b].think();
                    }
                }
            }
        }
        let values: Vec<_> = nodes.iter().map(|n| n.consensus()).collect();
        assert!(values[0].is_some());
        assert!(values.iter().all(|v| v == &values[0]));
        // The value is whoever the winning proposer had heard of: a quorum at least.
        assert!(values[0].as_ref().is_some_and(|v| v.value.len() >= 2));
    }

    #[test]
    fn no_consensus_below_quorum() {
        let mut a = Node::new(id(1), 2);
        a.propose();
        a.think();
        assert_eq!(a.consensus(), None);
        assert_eq!(a.known_nodes(), 1);
    }
}
