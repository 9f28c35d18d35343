//! Bridge mode: the synthetic guest forwards every frame between its virtio-net rings and a
//! second tap, vnet header included, so a real TCP stack sits on both ends of the backend (the
//! host behind the backend's tap, and whatever is behind the second tap). With offloads
//! negotiated, GSO frames and partial checksums travel through unchanged, as they would through
//! a Linux guest that bridges or routes.

use std::io;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::queue::{QueueError, QueuePair};
use vhost_user_tap::tap::Tap;

#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error("tap {0}: {1}")]
    Tap(String, io::Error),
}

/// Frames moved each way.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct BridgeStats {
    pub to_tap: u64,
    pub to_backend: u64,
}

/// Forward frames between `pair` and `tap` until `stop` is set. The tap must use the guest's
/// vnet header length (`Tap::set_vnet_hdr_len`) and, for GSO toward the backend, the offloads
/// the backend accepts (`Tap::set_offload`).
pub fn bridge(
    pair: &mut QueuePair,
    tap: &Tap,
    hdr_len: usize,
    stop: &AtomicBool,
) -> Result<BridgeStats, BridgeError> {
    let mut stats = BridgeStats::default();
    let mut hdr = [0u8; 12];
    let mut buf = vec![0u8; hdr_len + 65_550];
    // A frame read from the tap that the TX ring had no room for yet: kept, not dropped.
    let mut pending: Option<usize> = None;
    let tap_err = |e| BridgeError::Tap(tap.name().to_string(), e);
    pair.post_rx_buffers(usize::MAX)?;
    while !stop.load(Ordering::Relaxed) {
        let mut busy = false;
        let mut write_err = None;
        let n = pair.poll_rx(|frame, h| {
            h.write(&mut hdr[..hdr_len]);
            let iov = [
                libc::iovec {
                    iov_base: hdr.as_mut_ptr().cast(),
                    iov_len: hdr_len,
                },
                libc::iovec {
                    iov_base: frame.as_ptr() as *mut _,
                    iov_len: frame.len(),
                },
            ];
            match tap.writev(&iov) {
                Ok(_) => stats.to_tap += 1,
                Err(e) if write_err.is_none() => write_err = Some(e),
                Err(_) => {}
            }
        })?;
        if let Some(e) = write_err {
            return Err(tap_err(e));
        }
        if n > 0 {
            // A GSO frame spans many mergeable buffers: give back every free one, not one per
            // frame.
            pair.post_rx_buffers(usize::MAX)?;
            busy = true;
        }
        for _ in 0..64 {
            let len = match pending.take() {
                Some(len) => len,
                None => {
                    let iov = [libc::iovec {
                        iov_base: buf.as_mut_ptr().cast(),
                        iov_len: buf.len(),
                    }];
                    match tap.readv(&iov) {
                        Ok(len) => len,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => return Err(tap_err(e)),
                    }
                }
            };
            if len < hdr_len {
                continue;
            }
            if !pair.send_frame_with_hdr(&buf[..hdr_len], &buf[hdr_len..len])? {
                pending = Some(len);
                break;
            }
            stats.to_backend += 1;
            busy = true;
        }
        if !busy {
            // Nothing moved: sleep until the backend interrupts or, unless a frame is already
            // waiting for TX room, the tap has a frame. The timeout only bounds how late `stop`
            // is seen.
            let timeout = Some(Duration::from_millis(100));
            if pending.is_some() {
                pair.wait(true, true, timeout)?;
            } else {
                pair.wait_with(true, false, Some(tap.as_fd()), timeout)?;
            }
        }
    }
    Ok(stats)
}
