//! [`Client`]: the SDK's entry point.

use std::path::Path;
use std::sync::Arc;

use crate::chunks::ChunkServers;
use crate::diff::Change;
use crate::download::DownloadReport;
use crate::error::ClientError;
use crate::meta::MetaClient;
use crate::upload::{UploadOptions, UploadProgress, UploadReport};
use crate::version::VersionReader;

/// A connection to a Granary cluster; cheap to clone.
#[derive(Clone)]
pub struct Client {
    meta: MetaClient,
    chunks: ChunkServers,
}

impl Client {
    /// Prepares connections to any of `addrs` (`host:port`); nothing is sent yet.
    pub fn connect(addrs: &[String]) -> Result<Self, ClientError> {
        let meta = MetaClient::connect(addrs)?;
        Ok(Self {
            chunks: ChunkServers::new(meta.clone()),
            meta,
        })
    }

    /// The metadata API.
    pub fn meta(&self) -> &MetaClient {
        &self.meta
    }

    /// Uploads `dir` as the next version of `dataset`.
    pub async fn upload_dir(
        &self,
        dir: &Path,
        dataset: &str,
        opts: &UploadOptions,
        progress: Arc<dyn UploadProgress>,
    ) -> Result<UploadReport, ClientError> {
        crate::upload::upload_dir(&self.meta, &self.chunks, dir, dataset, opts, progress).await
    }

    /// Opens version `number` of `dataset` (the latest when `None`).
    pub async fn open_version(
        &self,
        dataset: &str,
        number: Option<u64>,
    ) -> Result<VersionReader, ClientError> {
        let version = self.meta.get_version(dataset, number).await?;
        VersionReader::new(self.meta.clone(), self.chunks.clone(), version)
    }

    /// Downloads a version into `dest` (new or empty).
    pub async fn download(
        &self,
        dataset: &str,
        number: Option<u64>,
        dest: &Path,
    ) -> Result<DownloadReport, ClientError> {
        let reader = self.open_version(dataset, number).await?;
        crate::download::download(&reader, dest, Arc::new(|_| {})).await
    }

    /// What changed from one version to another.
    pub async fn diff(
        &self,
        dataset_a: &str,
        a: Option<u64>,
        dataset_b: &str,
        b: Option<u64>,
    ) -> Result<Vec<Change>, ClientError> {
        let (ra, rb) = (
            self.open_version(dataset_a, a).await?,
            self.open_version(dataset_b, b).await?,
        );
        crate::diff::diff(&ra, &rb).await
    }
}
