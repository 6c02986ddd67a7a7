//! The mesh control plane core (spec §1–3). Pure and sans-IO: every entry point takes `now` and,
//! where it needs randomness, an injected RNG; nothing here reads a clock or touches a socket.
//! The router shell owns the TCP connections and drives these state machines.
//!
//! - [`peer`]: peer names, UIDs, nicknames.
//! - [`wire`]: length-prefixed TCP framing and a bounds-checked reader.
//! - [`handshake`]: protocol header, version negotiation, intro, key agreement and confirmation.
//! - [`cpace`]: the CPace PAKE primitives (ristretto255) the password handshake uses.
//! - [`conn`]: post-handshake messages: sealing/opening, tags, heartbeats, rekeying.
//! - [`topology`]: the versioned peer graph, its codec, merge rules and GC.
//! - [`routes`]: deterministic BFS unicast next hops and broadcast fan-out.
//! - [`gossip`]: the generic gossip layer ([`gossip::GossipData`], [`gossip::GossipChannel`]).
//! - [`connmaker`]: dial targets, backoff and their status.
//! - [`node`]: the mesh node: connections, duplicates, gossip fan-out, routing, app channels.
//! - [`sim`]: a simulated mesh of nodes in virtual time, for tests and benches.
//! - [`app`]: what applications riding the gossip (IPAM, DNS) get from a node and give it.

pub mod app;
pub mod conn;
pub mod connmaker;
pub mod cpace;
pub mod gossip;
pub mod handshake;
pub mod node;
pub mod peer;
pub mod routes;
pub mod sim;
pub mod topology;
pub mod wire;
