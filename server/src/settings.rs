//! Server settings read from the environment (the knobs tests turn down;
//! docs/operations.md lists them all).

use std::time::Duration;

/// The duration in whole seconds named by environment variable `name`, or
/// `default_secs` when it is unset or not a number.
pub fn env_secs(name: &str, default_secs: u64) -> Duration {
    Duration::from_secs(
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default_secs),
    )
}
