//! Test helpers that need nothing but `std` and `tokio`: shared by the
//! end-to-end harness (`tests/common/mod.rs`) and the server crate's own
//! integration tests (`server/tests/*.rs`, through
//! `#[path = "../../tests/common/std_helpers.rs"] mod std_helpers;`), which
//! cannot use the rest of the harness (it runs the `granary` binary).

#![allow(dead_code)]

use std::future::Future;
use std::net::TcpListener;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// How often [`poll_until`] looks again.
const POLL: Duration = Duration::from_millis(150);

/// A loopback port nobody listens on.
///
/// Ports come from below the kernel's ephemeral range, handed out by a
/// process-wide counter and checked by binding them: an outgoing connection
/// never takes them as its source port, so a node that is killed and restarted
/// can bind its address again, and two tests never pick the same port.
pub fn free_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768);
    if low >= 12_000 {
        let (start, span) = (low - 10_000, 10_000 - 1);
        let base = std::process::id() * 211 % span;
        let _ = NEXT.compare_exchange(0, base + 1, Ordering::SeqCst, Ordering::SeqCst);
        for _ in 0..span {
            let port = (start + NEXT.fetch_add(1, Ordering::SeqCst) % span) as u16;
            if TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return port;
            }
        }
    }
    // Fallback: let the kernel choose, and release it.
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `check` until it returns `Ok`, and returns that value; after
/// `timeout`, an error naming `what` and the last reason `check` gave.
pub async fn poll_until<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let start = Instant::now();
    loop {
        let reason = match check().await {
            Ok(v) => return Ok(v),
            Err(reason) => reason,
        };
        if start.elapsed() >= timeout {
            return Err(format!(
                "timed out after {timeout:?} waiting for {what}; last: {reason}"
            ));
        }
        tokio::time::sleep(POLL).await;
    }
}
