//! Synthetic guest: a vhost-user *frontend* that drives virtio-net split rings the way a Linux
//! guest's virtio-net driver does, without a VM. Used by tests, benchmarks and the
//! `vhost-user-tap-guest` binary. Also the project's test kit ([`kit`]) and the in-process
//! loopback of the daemon's data path ([`loopback`]): everything that tests the daemon and
//! does not ship with it.
//!
//! - [`mem`]: memfd-backed guest memory shared with the backend.
//! - [`ring`]: driver side of a split virtqueue (EVENT_IDX, suppression, barriers as Linux).
//! - [`queue`]: one RX/TX queue pair (mergeable RX reassembly, TX layouts, interrupts).
//! - [`vhost_user`]: the frontend's vhost-user messages.
//! - [`frontend`]: [`Guest`], the handshake and the public API.
//! - [`migration`]: the frontend's side of a migration's dirty log.
//! - [`net`]: vnet header, feature bits, test frames.
//! - [`run`]: the binary's traffic modes (send and receive; echo).
//! - [`bridge`]: forwarding between the rings and a second tap (TCP through a backend).
//! - [`loopback`]: the daemon's RX/TX wired to a guest queue pair in-process.
//! - [`hostile`]: a guest that writes its rings directly to work against the daemon.
//! - [`kit`]: namespaces, the daemon process, counters, prerequisites for integration tests.
//!
//! ```no_run
//! use std::time::Duration;
//! use vhost_user_tap_guest::{Guest, GuestConfig};
//! let mut g = Guest::connect(GuestConfig::new("/tmp/vhost-user-tap.sock"))?;
//! g.post_rx_buffers(usize::MAX)?;
//! g.send_frame(&[0xff; 60])?;
//! if g.wait_interrupt(0, Duration::from_secs(1))? {
//!     g.poll_rx(|frame, hdr| println!("{} bytes, {hdr:?}", frame.len()))?;
//! }
//! let bases = g.disconnect()?;
//! # Ok::<(), vhost_user_tap_guest::GuestError>(())
//! ```
pub mod bridge;
pub mod frontend;
pub mod hostile;
pub mod kit;
pub mod labs;
pub mod loopback;
pub mod mem;
pub mod migration;
pub mod net;
pub mod queue;
pub mod ring;
pub mod run;
pub mod vhost_user;

#[cfg(test)]
mod fake_backend;
#[cfg(test)]
mod testdev;

pub use frontend::{Guest, GuestConfig, GuestError, HandshakeOrder};
pub use net::{FrameSpec, NetConfig, UdpFlow, VirtioNetHdr};
pub use queue::{QueueError, QueuePair, QueueStats, RawCompletion, TxLayout, Wake};
pub use ring::{RawDesc, RawNext};
pub use run::{run, EchoWait, RunConfig, RunError, RunReport, StopReason};
