//! What the mesh offers the applications that ride its gossip (IPAM now, DNS next). An
//! application owns one named channel: the node hands it [`AppEvent`]s and carries its
//! [`AppSend`]s. Applications are sans-IO too; the router shell runs each in its own task, the
//! simulated network (`sim`) hosts them next to their node through [`App`].

use std::time::Instant;

use super::peer::PeerName;

/// How a gossip payload travelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GossipKind {
    /// Routed hop by hop to one peer.
    Unicast,
    /// Relayed to every peer along the source's broadcast tree.
    Broadcast,
    /// Sent to a few random neighbours (periodic full state, or what was new to the sender).
    Neighbours,
}

/// A peer the topology knows, as an application sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    pub name: PeerName,
    pub nickname: String,
    /// There is a route to it from this node now.
    pub reachable: bool,
}

/// What a node delivers to the application of a channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AppEvent {
    Gossip {
        kind: GossipKind,
        /// The peer that sent it first.
        src: PeerName,
        /// The neighbour that delivered it: the connection to drop when the payload is bad.
        from: PeerName,
        payload: Vec<u8>,
    },
    /// The known peers changed (someone joined, left or became (un)reachable); the whole list,
    /// this node included.
    Peers(Vec<PeerInfo>),
}

/// What an application asks its node to send on its channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AppSend {
    Unicast { dst: PeerName, payload: Vec<u8> },
    Broadcast { payload: Vec<u8> },
    Neighbours { payload: Vec<u8> },
}

/// An application as the simulated network hosts it: fed events and time, polled for sends.
pub trait App {
    /// The channel it owns.
    fn channel(&self) -> &'static str;

    /// An event for this channel. An error names what was wrong with a payload; the node then
    /// drops the connection that delivered it (logged), as Weave does on a bad IPAM ring.
    fn on_event(&mut self, now: Instant, event: AppEvent) -> Result<(), String>;

    /// Timers that are due.
    fn handle_timeout(&mut self, now: Instant);

    /// The next instant [`handle_timeout`](Self::handle_timeout) wants to run, if any.
    fn poll_timeout(&self) -> Option<Instant>;

    /// The next thing to send, if any.
    fn poll_send(&mut self) -> Option<AppSend>;
}
