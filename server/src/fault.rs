//! Crash points for tests: `GRANARY_FAULT=<name>` makes the process kill
//! itself with SIGKILL (exactly like `kill -9`) when it reaches the point of
//! that name, so a test can stop a server between two steps of a multi-step
//! operation (a tier move, say) and check what a restart makes of it.
//!
//! Points: `move-after-upload`, `move-after-record`, `move-after-finish`
//! (the mover's steps, see [`crate::tier::mover`]) and `upload-before-put`
//! (a chunk server about to upload a pack to the object tier).
//!
//! `GRANARY_FAULT_PAUSE=<name>:<secs>` instead holds the task that reaches
//! pause point `<name>` for that long, so a test can act while an operation
//! stands between two steps. Pause points: `move-after-restore` (a move back
//! to SSD has restored a pack's copies, before meta lists them).

/// Waits the seconds `GRANARY_FAULT_PAUSE` gives if it names this point.
pub async fn pause(name: &str) {
    let Ok(spec) = std::env::var("GRANARY_FAULT_PAUSE") else {
        return;
    };
    let Some((point, secs)) = spec.split_once(':') else {
        return;
    };
    if point == name {
        let secs: u64 = secs.parse().unwrap_or(0);
        tracing::warn!("GRANARY_FAULT_PAUSE={spec}: pausing for {secs} s");
        tokio::time::sleep(std::time::Duration::from_secs(secs)).await;
    }
}

/// Kills the process if `GRANARY_FAULT` names this point.
pub fn point(name: &str) {
    if std::env::var("GRANARY_FAULT").is_ok_and(|f| f == name) {
        tracing::error!("GRANARY_FAULT={name}: killing this process");
        // SAFETY: plain syscalls on our own pid.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
}
