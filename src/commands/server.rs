//! `granary server`: run a node until SIGTERM or Ctrl-C.

use anyhow::Context;
use granary_server::{Roles, ServerConfig};

use crate::cli::ServerArgs;

pub fn run(args: ServerArgs) -> anyhow::Result<()> {
    let roles: Roles = args.role.parse().map_err(anyhow::Error::msg)?;
    let cfg = ServerConfig {
        node_id: args.node_id,
        listen: args.listen,
        data_dir: args.data_dir,
        join: args.join,
        roles,
        replicas: args.replicas,
        object_store: args.object_store,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("granary-server")
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        let shutdown = async {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .expect("install SIGTERM handler");
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        };
        granary_server::run(cfg, shutdown).await
    })?;
    Ok(())
}
