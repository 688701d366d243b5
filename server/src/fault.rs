//! Crash points for tests: `GRANARY_FAULT=<name>` makes the process kill
//! itself with SIGKILL (exactly like `kill -9`) when it reaches the point of
//! that name, so a test can stop a server between two steps of a multi-step
//! operation (a tier move, say) and check what a restart makes of it.
//!
//! Points: `move-after-upload`, `move-after-record`, `move-after-finish`
//! (the mover's steps, see [`crate::tier::mover`]) and `upload-before-put`
//! (a chunk server about to upload a pack to the object tier).

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
