//! Our own compact encoding of the IPAM messages (spec §1.10 semantics; a Rust-only cluster, so
//! no gob). Every message: a format byte, a type byte, then the body. Integers are LEB128
//! varints, peer names 6 bytes, strings a varint length and UTF-8. Decoding is bounds-checked,
//! caps every count by what the remaining bytes could hold, and never panics.

use std::collections::BTreeMap;

use super::paxos::{AcceptedValue, GossipState, NodeClaims, NodeId, ProposalId};
use super::ring::{Entry, Ring};
use crate::mesh::peer::{PeerName, MAX_NICKNAME_LEN};

pub const FORMAT: u8 = 1;
/// Largest message we build or accept (a ring of ~100k entries).
pub const MAX_MESSAGE: usize = 4 << 20;

const TYPE_SPACE_REQUEST: u8 = 0;
const TYPE_STATE: u8 = 1;
const TYPE_DENIED: u8 = 2;

const BODY_REQUEST: u8 = 0;
const BODY_PAXOS: u8 = 1;
const BODY_RING: u8 = 2;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// "Give me some space in `[start, end)`" (unicast).
    SpaceRequest { start: u64, end: u64 },
    /// Gossip, or a ring update sent to one peer.
    State(State),
    /// "I have nothing free in `[start, end)`" (unicast).
    Denied { start: u64, end: u64 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct State {
    pub nicknames: BTreeMap<PeerName, String>,
    pub body: Body,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    /// Neither ring nor Paxos: an observer asking for a ring.
    Request,
    Paxos(GossipState),
    /// The ring (its `me` is meaningless on the wire).
    Ring(Ring),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("message too long ({0} bytes)")]
    TooLong(usize),
    #[error("truncated")]
    Truncated,
    #[error("unknown format {0}")]
    Format(u8),
    #[error("unknown message type {0}")]
    Type(u8),
    #[error("bad {0}")]
    Bad(&'static str),
    #[error("{0} trailing bytes")]
    Trailing(usize),
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_name(out: &mut Vec<u8>, p: PeerName) {
    out.extend_from_slice(&p.to_bytes());
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    // Nicknames are capped at the mesh's limit; cut at a char boundary.
    let mut n = s.len().min(MAX_NICKNAME_LEN);
    while !s.is_char_boundary(n) {
        n -= 1;
    }
    put_varint(out, n as u64);
    out.extend_from_slice(&s.as_bytes()[..n]);
}

fn put_node(out: &mut Vec<u8>, n: &NodeId) {
    put_name(out, n.name);
    put_varint(out, n.uid);
}

fn put_proposal(out: &mut Vec<u8>, p: &ProposalId) {
    put_varint(out, p.round);
    put_node(out, &p.proposer);
}

impl Message {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![FORMAT];
        match self {
            Message::SpaceRequest { start, end } | Message::Denied { start, end } => {
                out.push(if matches!(self, Message::SpaceRequest { .. }) {
                    TYPE_SPACE_REQUEST
                } else {
                    TYPE_DENIED
                });
                put_varint(&mut out, *start);
                put_varint(&mut out, *end);
            }
            Message::State(state) => {
                out.push(TYPE_STATE);
                put_varint(&mut out, state.nicknames.len() as u64);
                for (p, n) in &state.nicknames {
                    put_name(&mut out, *p);
                    put_str(&mut out, n);
                }
                match &state.body {
                    Body::Request => out.push(BODY_REQUEST),
                    Body::Paxos(knows) => {
                        out.push(BODY_PAXOS);
                        put_varint(&mut out, knows.len() as u64);
                        for (id, c) in knows {
                            put_node(&mut out, id);
                            put_proposal(&mut out, &c.promise);
                            put_proposal(&mut out, &c.accepted);
                            put_proposal(&mut out, &c.accepted_value.origin);
                            put_varint(&mut out, c.accepted_value.value.len() as u64);
                            for p in &c.accepted_value.value {
                                put_name(&mut out, *p);
                            }
                        }
                    }
                    Body::Ring(r) => {
                        out.push(BODY_RING);
                        put_varint(&mut out, r.start);
                        put_varint(&mut out, r.end);
                        put_varint(&mut out, r.entries.len() as u64);
                        for e in &r.entries {
                            put_varint(&mut out, e.token);
                            put_name(&mut out, e.peer);
                            put_varint(&mut out, u64::from(e.version));
                            put_varint(&mut out, e.free);
                        }
                        put_varint(&mut out, r.seeds.len() as u64);
                        for p in &r.seeds {
                            put_name(&mut out, *p);
                        }
                    }
                }
            }
        }
        out
    }

    pub fn decode(data: &[u8]) -> Result<Message, DecodeError> {
        if data.len() > MAX_MESSAGE {
            return Err(DecodeError::TooLong(data.len()));
        }
        let mut r = Reader { data };
        let format = r.u8()?;
        if format != FORMAT {
            return Err(DecodeError::Format(format));
        }
        let msg = match r.u8()? {
            TYPE_SPACE_REQUEST => Message::SpaceRequest {
                start: r.varint()?,
                end: r.varint()?,
            },
            TYPE_DENIED => Message::Denied {
                start: r.varint()?,
                end: r.varint()?,
            },
            TYPE_STATE => Message::State(r.state()?),
            t => return Err(DecodeError::Type(t)),
        };
        if !r.data.is_empty() {
            return Err(DecodeError::Trailing(r.data.len()));
        }
        Ok(msg)
    }
}

struct Reader<'a> {
    data: &'a [u8],
}

impl Reader<'_> {
    fn u8(&mut self) -> Result<u8, DecodeError> {
        let (&b, rest) = self.data.split_first().ok_or(DecodeError::Truncated)?;
        self.data = rest;
        Ok(b)
    }

    fn bytes(&mut self, n: usize) -> Result<&[u8], DecodeError> {
        if self.data.len() < n {
            return Err(DecodeError::Truncated);
        }
        let (b, rest) = self.data.split_at(n);
        self.data = rest;
        Ok(b)
    }

    fn varint(&mut self) -> Result<u64, DecodeError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.u8()?;
            let bits = u64::from(b & 0x7f);
            if shift == 63 && bits > 1 {
                return Err(DecodeError::Bad("varint"));
            }
            v |= bits << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(DecodeError::Bad("varint"))
    }

    /// A count of items each at least `min_size` bytes long, checked against what is left.
    fn count(&mut self, min_size: usize, what: &'static str) -> Result<usize, DecodeError> {
        let n = self.varint()?;
        if n > (self.data.len() / min_size) as u64 {
            return Err(DecodeError::Bad(what));
        }
        Ok(n as usize)
    }

    fn name(&mut self) -> Result<PeerName, DecodeError> {
        let b = self.bytes(6)?;
        let mut a = [0u8; 6];
        a.copy_from_slice(b);
        Ok(PeerName::from_bytes(a))
    }

    fn string(&mut self) -> Result<String, DecodeError> {
        let n = self.varint()?;
        if n > MAX_NICKNAME_LEN as u64 {
            return Err(DecodeError::Bad("nickname length"));
        }
        let b = self.bytes(n as usize)?;
        String::from_utf8(b.to_vec()).map_err(|_| DecodeError::Bad("nickname UTF-8"))
    }

    fn node(&mut self) -> Result<NodeId, DecodeError> {
        Ok(NodeId {
            name: self.name()?,
            uid: self.varint()?,
        })
    }

    fn proposal(&mut self) -> Result<ProposalId, DecodeError> {
        Ok(ProposalId {
            round: self.varint()?,
            proposer: self.node()?,
        })
    }

    fn state(&mut self) -> Result<State, DecodeError> {
        let n = self.count(7, "nickname count")?;
        let mut nicknames = BTreeMap::new();
        for _ in 0..n {
            let p = self.name()?;
            let nick = self.string()?;
            nicknames.insert(p, nick);
        }
        let body = match self.u8()? {
            BODY_REQUEST => Body::Request,
            BODY_PAXOS => {
                let n = self.count(7 + 3 * 8, "paxos node count")?;
                let mut knows = GossipState::new();
                for _ in 0..n {
                    let id = self.node()?;
                    let promise = self.proposal()?;
                    let accepted = self.proposal()?;
                    let origin = self.proposal()?;
                    let m = self.count(6, "paxos value length")?;
                    let value = (0..m).map(|_| self.name()).collect::<Result<_, _>>()?;
                    knows.insert(
                        id,
                        NodeClaims {
                            promise,
                            accepted,
                            accepted_value: AcceptedValue { value, origin },
                        },
                    );
                }
                Body::Paxos(knows)
            }
            BODY_RING => {
                let start = self.varint()?;
                let end = self.varint()?;
                let n = self.count(9, "ring entry count")?;
                let mut entries = Vec::with_capacity(n);
                for _ in 0..n {
                    let token = self.varint()?;
                    let peer = self.name()?;
                    let version = u32::try_from(self.varint()?)
                        .map_err(|_| DecodeError::Bad("entry version"))?;
                    let free = self.varint()?;
                    entries.push(Entry {
                        token,
                        peer,
                        version,
                        free,
                    });
                }
                let m = self.count(6, "seed count")?;
                let seeds = (0..m).map(|_| self.name()).collect::<Result<_, _>>()?;
                Body::Ring(Ring {
                    start,
                    end,
                    me: PeerName::UNKNOWN,
                    entries,
                    seeds,
                })
            }
            _ => return Err(DecodeError::Bad("state body")),
        };
        Ok(State { nicknames, body })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(n: u64) -> PeerName {
        PeerName::from_u64(n)
    }

    pub(crate) fn samples() -> Vec<Message> {
        let mut ring = Ring::new(0x0a20_0000, 0x0a30_0000, PeerName::UNKNOWN);
        ring.claim_for_peers(&[p(1), p(0xffff_ffff_ffff), p(7)]);
        let mut knows = GossipState::new();
        let id = NodeId {
            name: p(1),
            uid: u64::MAX,
        };
        let prop = ProposalId {
            round: 3,
            proposer: id,
        };
        knows.insert(
            id,
            NodeClaims {
                promise: prop,
                accepted: prop,
                accepted_value: AcceptedValue {
                    value: vec![p(1), p(2)],
                    origin: prop,
                },
            },
        );
        let nicknames: BTreeMap<PeerName, String> =
            [(p(1), "host1".to_string()), (p(2), "hôte-2".to_string())].into();
        vec![
            Message::SpaceRequest {
                start: 5,
                end: 1 << 32,
            },
            Message::Denied { start: 0, end: 1 },
            Message::State(State {
                nicknames: nicknames.clone(),
                body: Body::Request,
            }),
            Message::State(State {
                nicknames: nicknames.clone(),
                body: Body::Paxos(knows),
            }),
            Message::State(State {
                nicknames,
                body: Body::Ring(ring),
            }),
        ]
    }

    #[test]
    fn round_trips() {
        for m in samples() {
            assert_eq!(Message::decode(&m.encode()), Ok(m));
        }
    }

    #[test]
    fn refuses_garbage() {
        for m in samples() {
            let bytes = m.encode();
            for cut in 0..bytes.len() {
                assert!(
                    Message::decode(&bytes[..cut]).is_err(),
                    "{m:?} cut at {cut}"
                );
            }
            let mut longer = bytes.clone();
            longer.push(0);
            assert_eq!(Message::decode(&longer), Err(DecodeError::Trailing(1)));
        }
        assert_eq!(Message::decode(&[2, 0]), Err(DecodeError::Format(2)));
        assert_eq!(Message::decode(&[1, 9]), Err(DecodeError::Type(9)));
        // A huge count is refused before anything is allocated for it.
        let mut huge = vec![FORMAT, TYPE_STATE];
        put_varint(&mut huge, u64::MAX);
        assert_eq!(
            Message::decode(&huge),
            Err(DecodeError::Bad("nickname count"))
        );
        assert_eq!(
            Message::decode(&[1, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f]),
            Err(DecodeError::Bad("varint"))
        );
    }

    /// The fuzz target's seeds are valid messages (so the fuzzer starts from deep inside).
    #[test]
    fn fuzz_seeds_decode() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/corpus/ipam_codec");
        let mut n = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            let m = Message::decode(&bytes).unwrap_or_else(|e| panic!("{path:?}: {e}"));
            assert_eq!(m.encode(), bytes, "{path:?} is canonical");
            n += 1;
        }
        assert!(n >= 5);
    }
}
