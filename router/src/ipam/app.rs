//! The allocator as a [`App`] on a simulated node: mesh events in, sends out; replies and the
//! last state to persist are kept for the test driving it.

use std::collections::VecDeque;
use std::time::Instant;

use super::{Allocator, IpamError, Output, Persisted, Reply, RequestId, IPAM_CHANNEL};
use crate::mesh::app::{App, AppEvent, AppSend};

#[derive(Debug)]
pub struct IpamApp {
    pub allocator: Allocator,
    /// Replies not yet taken by the test.
    pub replies: VecDeque<(RequestId, Result<Reply, IpamError>)>,
    /// What the allocator last asked to persist.
    pub persisted: Option<Persisted>,
    sends: VecDeque<AppSend>,
}

impl IpamApp {
    pub fn new(allocator: Allocator) -> Self {
        let mut app = IpamApp {
            allocator,
            replies: VecDeque::new(),
            persisted: None,
            sends: VecDeque::new(),
        };
        app.drain();
        app
    }

    /// Move the allocator's outputs into the queues (call after driving it directly).
    pub fn drain(&mut self) {
        while let Some(o) = self.allocator.poll_output() {
            match o {
                Output::Reply { id, result } => self.replies.push_back((id, result)),
                Output::Send(s) => self.sends.push_back(s),
                Output::Persist(p) => self.persisted = Some(p),
            }
        }
    }
}

impl App for IpamApp {
    fn channel(&self) -> &'static str {
        IPAM_CHANNEL
    }

    fn on_event(&mut self, now: Instant, event: AppEvent) -> Result<(), String> {
        let r = self.allocator.on_event(now, event);
        self.drain();
        r.map_err(|e| e.to_string())
    }

    fn handle_timeout(&mut self, now: Instant) {
        self.allocator.handle_timeout(now);
        self.drain();
    }

    fn poll_timeout(&self) -> Option<Instant> {
        self.allocator.poll_timeout()
    }

    fn poll_send(&mut self) -> Option<AppSend> {
        self.drain();
        self.sends.pop_front()
    }
}

/// A shared handle, so a test can drive the allocator the simulated node hosts.
pub type SharedIpam = std::rc::Rc<std::cell::RefCell<IpamApp>>;

impl App for SharedIpam {
    fn channel(&self) -> &'static str {
        IPAM_CHANNEL
    }

    fn on_event(&mut self, now: Instant, event: AppEvent) -> Result<(), String> {
        self.borrow_mut().on_event(now, event)
    }

    fn handle_timeout(&mut self, now: Instant) {
        self.borrow_mut().handle_timeout(now);
    }

    fn poll_timeout(&self) -> Option<Instant> {
        self.borrow().poll_timeout()
    }

    fn poll_send(&mut self) -> Option<AppSend> {
        self.borrow_mut().poll_send()
    }
}
