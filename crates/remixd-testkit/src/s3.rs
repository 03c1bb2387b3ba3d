//! An S3-protocol server on loopback for the storage tests: the `s3s-fs` crate's
//! file-system backend behind `s3s`'s service, which checks AWS signatures (headers and
//! presigned query strings), served by hyper inside the test process. Not a mock of the
//! client: remixd's `object_store` S3 client talks to it over HTTP as to any bucket.

use std::path::PathBuf;

use s3s::auth::SimpleAuth;
use s3s::service::S3ServiceBuilder;
use tokio_util::sync::CancellationToken;

/// A running S3-compatible server with one empty bucket.
pub struct S3Server {
    /// `http://127.0.0.1:PORT`
    pub endpoint: String,
    pub bucket: String,
    pub access_key: String,
    pub secret: String,
    /// Where the server keeps the objects (`<root>/<bucket>/<key>`).
    pub root: PathBuf,
    _dir: tempfile::TempDir,
    stop: CancellationToken,
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl S3Server {
    /// Starts a server on 127.0.0.1:0 with an empty bucket named `bucket`.
    pub async fn start(bucket: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().to_path_buf();
        std::fs::create_dir_all(root.join(bucket)).expect("bucket dir");
        let (access_key, secret) = (
            "remixd-test-access".to_string(),
            "remixd-test-secret".to_string(),
        );
        let fs = s3s_fs::FileSystem::new(&root).expect("s3s-fs root");
        let service = {
            let mut b = S3ServiceBuilder::new(fs);
            b.set_auth(SimpleAuth::from_single(access_key.clone(), secret.clone()));
            b.build()
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let stop = CancellationToken::new();
        let s = stop.clone();
        tokio::spawn(async move {
            loop {
                let socket = tokio::select! {
                    r = listener.accept() => match r {
                        Ok((socket, _)) => socket,
                        Err(_) => continue,
                    },
                    _ = s.cancelled() => return,
                };
                let service = service.clone();
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(socket), service)
                        .await;
                });
            }
        });
        Self {
            endpoint,
            bucket: bucket.to_string(),
            access_key,
            secret,
            root,
            _dir: dir,
            stop,
        }
    }

    /// The `storage.url` of the bucket, under `prefix` when not empty.
    pub fn url(&self, prefix: &str) -> String {
        if prefix.is_empty() {
            format!("s3://{}", self.bucket)
        } else {
            format!("s3://{}/{prefix}", self.bucket)
        }
    }
}
