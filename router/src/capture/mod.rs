//! Sleeve capture and injection on the router's end of the capture pair, `vethwe-pcap` (shell,
//! spec router §4.1).
//!
//! Reading: libpcap blocks, so one dedicated OS thread owns the read handle (promiscuous,
//! immediate mode, direction "in" so frames we inject — outbound on this interface — are never
//! captured back). Each loop turn handles at most [`BATCH`] frames, then looks at the stop flag and
//! refreshes the statistics. A frame is copied out of libpcap's ring only once a slot in the
//! bounded channel is reserved: when the consumer falls behind, frames are dropped and counted,
//! never queued without bound. Copies go into one reusable arena (`BytesMut`), so steady state does
//! not allocate per frame.
//!
//! Writing: [`Injector`] (module `inject`), a packet socket of its own that takes virtio-net
//! headers, so merged TCP frames go into the bridge whole.
//!
//! Both act in the network namespace of the thread that calls [`Capture::open`].

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use pcap::{Active, Direction};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;

mod inject;
pub use inject::Injector;

/// Default capture length: whole frames up to the largest bridge MTU. Use
/// [`CaptureConfig::for_mtu`] when the bridge MTU is known: in immediate mode libpcap uses
/// fixed-size ring slots sized from the snaplen, so 65535 leaves an 8 MB ring with room for
/// about 120 frames, and a fast TCP flow overflows it.
pub const DEFAULT_SNAPLEN: u32 = 65535;
/// Ethernet header plus one VLAN tag: what a frame adds to the bridge MTU.
const L2_OVERHEAD: u32 = 14 + 4;
/// Default kernel buffer of the read handle (`--bufsz`, 8 MB).
pub const DEFAULT_BUFFER_SIZE: usize = 8 << 20;
/// Default depth of the channel between the capture thread and its consumer.
pub const DEFAULT_QUEUE: usize = 4096;
/// Frames handled per loop turn before the thread checks for shutdown and statistics.
pub const BATCH: usize = 64;
/// Read timeout: how long a quiet capture thread sleeps before it looks at its stop flag (a
/// stop also wakes it at once through `pcap_breakloop`). Must stay well below 2^31 µs.
const READ_TIMEOUT_MS: i32 = 1000;
/// How often the thread copies libpcap's counters into the shared statistics.
const STATS_EVERY: Duration = Duration::from_secs(1);
/// Size of each arena chunk frames are copied into; a chunk is reused once every frame cut
/// from it has been dropped.
const ARENA_CHUNK: usize = 256 * 1024;
/// Shortest frame worth passing on: an Ethernet header.
const MIN_FRAME: usize = 14;
/// Kernel-side direction filter; `Direction::In` alone is applied in user space by libpcap.
const INBOUND: &str = "inbound";
/// Name of the capture thread.
const THREAD_NAME: &str = "weave-capture";

/// Settings of [`Capture::open`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CaptureConfig {
    /// Bytes captured per frame (longer frames are cut).
    pub snaplen: u32,
    /// Kernel buffer of the read handle, in bytes.
    pub buffer_size: usize,
    /// Frames that may wait between the capture thread and [`CaptureRx::recv`]; more are
    /// dropped (and counted).
    pub queue: usize,
}

impl CaptureConfig {
    /// Default settings, with the snaplen cut to whole frames of a bridge with `mtu`.
    pub fn for_mtu(mtu: u32) -> Self {
        CaptureConfig {
            snaplen: mtu.saturating_add(L2_OVERHEAD).min(DEFAULT_SNAPLEN),
            ..CaptureConfig::default()
        }
    }
}

impl Default for CaptureConfig {
    fn default() -> Self {
        CaptureConfig {
            snaplen: DEFAULT_SNAPLEN,
            buffer_size: DEFAULT_BUFFER_SIZE,
            queue: DEFAULT_QUEUE,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("invalid capture setting {what} = {value}")]
    InvalidConfig { what: &'static str, value: usize },
    #[error("{op} {iface}: {source}")]
    Pcap {
        op: &'static str,
        iface: String,
        #[source]
        source: pcap::Error,
    },
    #[error("{op} {iface}: {source}")]
    Io {
        op: &'static str,
        iface: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot start the capture thread for {iface}: {source}")]
    Thread {
        iface: String,
        #[source]
        source: io::Error,
    },
}

/// Capture statistics for `weave report` (`Router.CaptureStats`, spec router §6.3).
///
/// `PacketsReceived`, `PacketsDropped` and `PacketsIfDropped` are libpcap's counters (refreshed
/// about once a second); `PacketsDropped` also includes the frames this side dropped because
/// its consumer was behind, which [`CaptureStats::queue_dropped`] shows on their own.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct CaptureStats {
    pub packets_received: u64,
    pub packets_dropped: u64,
    pub packets_if_dropped: u64,
    /// Frames dropped because the channel to the consumer was full.
    #[serde(skip)]
    pub queue_dropped: u64,
    /// Frames read from libpcap by the capture thread.
    #[serde(skip)]
    pub captured: u64,
    /// Frames longer than the snaplen, dropped rather than forwarded cut short.
    #[serde(skip)]
    pub truncated: u64,
}

/// Counters and the stop flag shared by the capture thread and its handles.
#[derive(Debug, Default)]
struct Shared {
    stop: AtomicBool,
    pcap_received: AtomicU64,
    pcap_dropped: AtomicU64,
    pcap_if_dropped: AtomicU64,
    queue_dropped: AtomicU64,
    captured: AtomicU64,
    truncated: AtomicU64,
}

impl Shared {
    fn stats(&self) -> CaptureStats {
        let queue_dropped = self.queue_dropped.load(Ordering::Relaxed);
        CaptureStats {
            packets_received: self.pcap_received.load(Ordering::Relaxed),
            packets_dropped: self
                .pcap_dropped
                .load(Ordering::Relaxed)
                .saturating_add(queue_dropped),
            packets_if_dropped: self.pcap_if_dropped.load(Ordering::Relaxed),
            queue_dropped,
            captured: self.captured.load(Ordering::Relaxed),
            truncated: self.truncated.load(Ordering::Relaxed),
        }
    }

    fn store_pcap(&self, stat: pcap::Stat) {
        self.pcap_received
            .store(u64::from(stat.received), Ordering::Relaxed);
        self.pcap_dropped
            .store(u64::from(stat.dropped), Ordering::Relaxed);
        self.pcap_if_dropped
            .store(u64::from(stat.if_dropped), Ordering::Relaxed);
    }
}

/// Entry point: [`Capture::open`].
#[derive(Debug)]
pub struct Capture;

impl Capture {
    /// Open the read and write handles on `iface` (normally `vethwe-pcap`, which must exist and
    /// be up) in the calling thread's network namespace, and start the capture thread.
    pub fn open(iface: &str, config: CaptureConfig) -> Result<(CaptureRx, Injector), CaptureError> {
        let snaplen = config_i32("snaplen", config.snaplen as usize)?;
        let buffer_size = config_i32("buffer_size", config.buffer_size)?;
        if config.queue == 0 {
            return Err(CaptureError::InvalidConfig {
                what: "queue",
                value: 0,
            });
        }
        let pcap_err = |op: &'static str| {
            let iface = iface.to_string();
            move |source| CaptureError::Pcap { op, iface, source }
        };

        let mut reader = pcap::Capture::from_device(iface)
            .map_err(pcap_err("open capture handle on"))?
            .promisc(true)
            .snaplen(snaplen)
            .buffer_size(buffer_size)
            .immediate_mode(true)
            .timeout(READ_TIMEOUT_MS)
            .open()
            .map_err(pcap_err("activate capture on"))?;
        reader
            .direction(Direction::In)
            .map_err(pcap_err("capture only inbound frames on"))?;
        if let Err(e) = reader.filter(INBOUND, true) {
            // libpcap still drops outbound frames in user space (direction above).
            tracing::debug!(%iface, error = %e, "no kernel-side inbound filter");
        }

        let injector = Injector::open(iface)?;

        let shared = Arc::new(Shared::default());
        let (tx, rx) = mpsc::channel(config.queue);
        let breaker = reader.breakloop_handle();
        let thread = {
            let shared = Arc::clone(&shared);
            let name = iface.to_string();
            std::thread::Builder::new()
                .name(THREAD_NAME.to_string())
                .spawn(move || capture_loop(reader, tx, &shared, &name))
                .map_err(|source| CaptureError::Thread {
                    iface: iface.to_string(),
                    source,
                })?
        };
        tracing::info!(%iface, snaplen, buffer_size, queue = config.queue, "capturing");
        let capture = CaptureRx {
            rx,
            shared,
            breaker,
            thread: Some(thread),
        };
        Ok((capture, injector))
    }
}

fn config_i32(what: &'static str, value: usize) -> Result<i32, CaptureError> {
    match i32::try_from(value) {
        Ok(v) if v > 0 => Ok(v),
        _ => Err(CaptureError::InvalidConfig { what, value }),
    }
}

/// The receiving end of a capture: frames captured inbound on the interface, in order. Dropping
/// it stops the capture thread (without waiting for it; see [`CaptureRx::close`]).
pub struct CaptureRx {
    rx: mpsc::Receiver<Bytes>,
    shared: Arc<Shared>,
    breaker: pcap::BreakLoop,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for CaptureRx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaptureRx")
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl CaptureRx {
    /// The next captured frame; `None` once the capture has ended (the interface went away or
    /// a read failed; the reason is logged).
    pub async fn recv(&mut self) -> Option<Bytes> {
        self.rx.recv().await
    }

    /// Wait for at least one frame, then move up to `limit` waiting frames into `frames`;
    /// returns how many were added (0 once the capture has ended).
    pub async fn recv_many(&mut self, frames: &mut Vec<Bytes>, limit: usize) -> usize {
        self.rx.recv_many(frames, limit).await
    }

    /// A frame if one is waiting.
    pub fn try_recv(&mut self) -> Option<Bytes> {
        self.rx.try_recv().ok()
    }

    /// Current counters.
    pub fn stats(&self) -> CaptureStats {
        self.shared.stats()
    }

    /// Stop the capture thread and wait for it to exit. Blocks the calling thread briefly
    /// (libpcap is woken at once; at worst one read timeout).
    pub fn close(mut self) {
        self.signal_stop();
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("capture thread panicked");
            }
        }
    }

    fn signal_stop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        self.rx.close();
        self.breaker.breakloop();
    }
}

impl Drop for CaptureRx {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.signal_stop();
        }
    }
}

/// Body of the capture thread: read batches until stopped, the consumer is gone, or a read
/// fails.
fn capture_loop(
    mut reader: pcap::Capture<Active>,
    tx: mpsc::Sender<Bytes>,
    shared: &Shared,
    iface: &str,
) {
    let mut arena = BytesMut::with_capacity(ARENA_CHUNK);
    let mut last_stats = Instant::now();
    let mut consumer_gone = false;
    loop {
        if shared.stop.load(Ordering::Acquire) || consumer_gone {
            break;
        }
        let result = reader.dispatch(Some(BATCH), |packet| {
            let frame = packet.data;
            shared.captured.fetch_add(1, Ordering::Relaxed);
            if frame.len() < MIN_FRAME {
                return;
            }
            if packet.header.caplen < packet.header.len {
                shared.truncated.fetch_add(1, Ordering::Relaxed);
                return;
            }
            // Copy only once there is room for the frame.
            match tx.try_reserve() {
                Ok(permit) => {
                    arena.reserve(frame.len());
                    arena.extend_from_slice(frame);
                    permit.send(arena.split().freeze());
                }
                Err(TrySendError::Full(())) => {
                    shared.queue_dropped.fetch_add(1, Ordering::Relaxed);
                }
                Err(TrySendError::Closed(())) => consumer_gone = true,
            }
        });
        match result {
            Ok(_) | Err(pcap::Error::TimeoutExpired) => {}
            Err(_) if shared.stop.load(Ordering::Acquire) => break,
            Err(e) => {
                tracing::error!(%iface, error = %e, "capture failed; stopping");
                break;
            }
        }
        if last_stats.elapsed() >= STATS_EVERY {
            refresh_stats(&mut reader, shared, iface);
            last_stats = Instant::now();
        }
    }
    refresh_stats(&mut reader, shared, iface);
    tracing::debug!(%iface, "capture thread stopped");
}

fn refresh_stats(reader: &mut pcap::Capture<Active>, shared: &Shared, iface: &str) {
    match reader.stats() {
        Ok(stat) => shared.store_pcap(stat),
        Err(e) => tracing::debug!(%iface, error = %e, "cannot read capture statistics"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_use_report_field_names() {
        let stats = CaptureStats {
            packets_received: 7,
            packets_dropped: 2,
            packets_if_dropped: 1,
            queue_dropped: 1,
            captured: 7,
            truncated: 0,
        };
        let json = serde_json::to_string(&stats).unwrap_or_default();
        assert_eq!(
            json,
            r#"{"PacketsReceived":7,"PacketsDropped":2,"PacketsIfDropped":1}"#
        );
    }

    #[test]
    fn queue_drops_count_as_dropped() {
        let shared = Shared::default();
        shared.store_pcap(pcap::Stat {
            received: 10,
            dropped: 3,
            if_dropped: 0,
        });
        shared.queue_dropped.store(2, Ordering::Relaxed);
        let stats = shared.stats();
        assert_eq!(stats.packets_received, 10);
        assert_eq!(stats.packets_dropped, 5);
        assert_eq!(stats.queue_dropped, 2);
    }

    #[test]
    fn snaplen_follows_the_bridge_mtu() {
        assert_eq!(CaptureConfig::for_mtu(1376).snaplen, 1394);
        assert_eq!(CaptureConfig::for_mtu(65535).snaplen, DEFAULT_SNAPLEN);
        assert_eq!(CaptureConfig::for_mtu(u32::MAX).snaplen, DEFAULT_SNAPLEN);
    }

    #[test]
    fn rejects_bad_settings() {
        let open = |config| Capture::open("lo", config).map(|_| ());
        let bad = [
            CaptureConfig {
                queue: 0,
                ..CaptureConfig::default()
            },
            CaptureConfig {
                snaplen: 0,
                ..CaptureConfig::default()
            },
            CaptureConfig {
                buffer_size: usize::MAX,
                ..CaptureConfig::default()
            },
        ];
        for config in bad {
            assert!(
                matches!(open(config), Err(CaptureError::InvalidConfig { .. })),
                "{config:?}"
            );
        }
    }
}
