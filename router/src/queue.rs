//! Queues bounded in bytes as well as in count.
//!
//! A count bound alone does not bound memory: a mesh message may be up to
//! [`MAX_FRAME_LEN`](crate::mesh::wire::MAX_FRAME_LEN) (10 MiB), so 256 of them would be 2.5 GiB.
//! Here every item carries a permit for its weight (its size in bytes) from a semaphore holding
//! the queue's byte budget; the permit goes back when the receiver takes the item. A sender
//! either waits for room ([`Sender::send`], backpressure) or refuses at once and counts the drop
//! ([`Sender::try_send`]). An item heavier than the whole budget is charged the whole budget, so
//! it still passes, alone.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

/// What an item costs in a queue's byte budget.
pub trait Weigh {
    /// Approximate heap and inline size in bytes (at least 1).
    fn weight(&self) -> usize;
}

/// Why [`Sender::try_send`] refused an item.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TrySendError {
    #[error("queue full")]
    Full,
    #[error("queue closed")]
    Closed,
}

/// The queue's receiver went away.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("queue closed")]
pub struct Closed;

struct Shared {
    bytes: Arc<Semaphore>,
    max_bytes: usize,
    dropped: AtomicU64,
}

/// The sending side; cheap to clone.
pub struct Sender<T> {
    tx: mpsc::Sender<(T, OwnedSemaphorePermit)>,
    shared: Arc<Shared>,
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        Sender {
            tx: self.tx.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<T> std::fmt::Debug for Sender<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("queue::Sender")
            .field("max_bytes", &self.shared.max_bytes)
            .field("free_bytes", &self.shared.bytes.available_permits())
            .field("dropped", &self.dropped())
            .finish()
    }
}

/// The receiving side.
pub struct Receiver<T> {
    rx: mpsc::Receiver<(T, OwnedSemaphorePermit)>,
}

impl<T> std::fmt::Debug for Receiver<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("queue::Receiver").finish_non_exhaustive()
    }
}

/// A queue of at most `count` items and `max_bytes` bytes (both at least 1).
pub fn channel<T: Weigh>(count: usize, max_bytes: usize) -> (Sender<T>, Receiver<T>) {
    let max_bytes = max_bytes.clamp(1, Semaphore::MAX_PERMITS);
    let (tx, rx) = mpsc::channel(count.max(1));
    let shared = Arc::new(Shared {
        bytes: Arc::new(Semaphore::new(max_bytes)),
        max_bytes,
        dropped: AtomicU64::new(0),
    });
    (Sender { tx, shared }, Receiver { rx })
}

impl<T: Weigh> Sender<T> {
    fn charge(&self, item: &T) -> u32 {
        // Semaphore::MAX_PERMITS < u32::MAX, and max_bytes <= MAX_PERMITS.
        u32::try_from(item.weight().clamp(1, self.shared.max_bytes)).unwrap_or(u32::MAX)
    }

    /// Wait until there is room (count and bytes), then queue `item`.
    pub async fn send(&self, item: T) -> Result<(), Closed> {
        let permit = self
            .shared
            .bytes
            .clone()
            .acquire_many_owned(self.charge(&item))
            .await
            .map_err(|_| Closed)?;
        self.tx.send((item, permit)).await.map_err(|_| Closed)
    }

    /// Queue `item` if there is room now; otherwise drop it and count the drop.
    pub fn try_send(&self, item: T) -> Result<(), TrySendError> {
        if self.tx.is_closed() {
            return Err(TrySendError::Closed);
        }
        let Ok(permit) = self
            .shared
            .bytes
            .clone()
            .try_acquire_many_owned(self.charge(&item))
        else {
            self.shared.dropped.fetch_add(1, Ordering::Relaxed);
            return Err(TrySendError::Full);
        };
        match self.tx.try_send((item, permit)) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.shared.dropped.fetch_add(1, Ordering::Relaxed);
                Err(TrySendError::Full)
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(TrySendError::Closed),
        }
    }
}

impl<T> Sender<T> {
    /// Items [`try_send`](Self::try_send) refused because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// Bytes currently queued.
    pub fn queued_bytes(&self) -> usize {
        self.shared.max_bytes - self.shared.bytes.available_permits()
    }
}

impl<T> Receiver<T> {
    /// The next item; `None` once every sender is gone and the queue is empty.
    pub async fn recv(&mut self) -> Option<T> {
        // The permit drops here: the item's bytes are the receiver's now.
        self.rx.recv().await.map(|(item, _permit)| item)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Weigh for Vec<u8> {
        fn weight(&self) -> usize {
            self.len()
        }
    }

    #[tokio::test]
    async fn bytes_bound_refuses_and_counts() {
        let (tx, mut rx) = channel::<Vec<u8>>(100, 1000);
        tx.try_send(vec![0; 600]).unwrap();
        assert_eq!(tx.queued_bytes(), 600);
        assert_eq!(tx.try_send(vec![0; 600]), Err(TrySendError::Full));
        tx.try_send(vec![0; 400]).unwrap();
        assert_eq!(tx.try_send(vec![0; 1]), Err(TrySendError::Full));
        assert_eq!(tx.dropped(), 2);
        assert_eq!(rx.recv().await.map(|v| v.len()), Some(600));
        assert_eq!(tx.queued_bytes(), 400);
        tx.try_send(vec![0; 600]).unwrap();
    }

    #[tokio::test]
    async fn count_bound_refuses_and_counts() {
        let (tx, mut rx) = channel::<Vec<u8>>(2, 1 << 20);
        tx.try_send(vec![1]).unwrap();
        tx.try_send(vec![2]).unwrap();
        assert_eq!(tx.try_send(vec![3]), Err(TrySendError::Full));
        assert_eq!(tx.dropped(), 1);
        // The refused item's bytes were given back.
        assert_eq!(tx.queued_bytes(), 2);
        assert_eq!(rx.recv().await, Some(vec![1]));
        assert_eq!(rx.recv().await, Some(vec![2]));
    }

    #[tokio::test]
    async fn heavier_than_budget_passes_alone() {
        let (tx, mut rx) = channel::<Vec<u8>>(10, 100);
        tx.try_send(vec![0; 5000]).unwrap();
        assert_eq!(tx.try_send(vec![0; 1]), Err(TrySendError::Full));
        assert_eq!(rx.recv().await.map(|v| v.len()), Some(5000));
        tx.try_send(vec![0; 1]).unwrap();
    }

    #[tokio::test]
    async fn send_waits_for_room() {
        let (tx, mut rx) = channel::<Vec<u8>>(10, 100);
        tx.send(vec![0; 80]).await.unwrap();
        let wait = std::time::Duration::from_millis(50);
        let waited = tokio::time::timeout(wait, tx.send(vec![0; 80])).await;
        assert!(waited.is_err(), "no room: the sender waits");
        assert_eq!(rx.recv().await.map(|v| v.len()), Some(80));
        tokio::time::timeout(wait, tx.send(vec![0; 80]))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(rx.recv().await.map(|v| v.len()), Some(80));
    }

    #[tokio::test]
    async fn closed_receiver() {
        let (tx, rx) = channel::<Vec<u8>>(10, 100);
        drop(rx);
        assert_eq!(tx.try_send(vec![1]), Err(TrySendError::Closed));
        assert_eq!(tx.send(vec![1]).await, Err(Closed));
        assert_eq!(tx.dropped(), 0);
    }
}
