//! Blocking work (disk reads) from async code, without a thread hop where
//! the calling thread may block anyway.
//!
//! tokio's workers must not block, so a disk read goes to the blocking pool
//! and back: two thread wake-ups per read. A FUSE mount polls each request
//! once on its own request thread first ([`may_block`]), a thread with
//! nothing else to do meanwhile; a read reached in that first poll runs
//! right there ([`unblock`]).

use std::cell::Cell;

use tokio::task::JoinError;

thread_local! {
    static MAY_BLOCK: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with [`unblock`] running its work inline on this thread.
pub fn may_block<R>(f: impl FnOnce() -> R) -> R {
    struct Reset(bool);
    impl Drop for Reset {
        fn drop(&mut self) {
            MAY_BLOCK.set(self.0);
        }
    }
    let _reset = Reset(MAY_BLOCK.replace(true));
    f()
}

/// Runs the blocking `f`: inline inside [`may_block`], else on tokio's
/// blocking pool.
pub async fn unblock<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, JoinError> {
    if MAY_BLOCK.get() {
        return Ok(f());
    }
    tokio::task::spawn_blocking(f).await
}

#[cfg(test)]
mod tests {
    use std::future::Future;

    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn work_runs_inline_only_inside_may_block() {
        let here = std::thread::current().id();
        // The blocking pool is another thread.
        assert_ne!(unblock(move || std::thread::current().id()).await.unwrap(), here);
        let inline = may_block(|| {
            let mut f = std::pin::pin!(unblock(move || std::thread::current().id()));
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            match f.as_mut().poll(&mut cx) {
                std::task::Poll::Ready(id) => id.unwrap(),
                std::task::Poll::Pending => panic!("inline work was not ready at its first poll"),
            }
        });
        assert_eq!(inline, here);
        // The flag is reset afterwards.
        assert_ne!(unblock(move || std::thread::current().id()).await.unwrap(), here);
    }
}
