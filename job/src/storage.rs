//! Where files live: a local directory or an object store URL.
//!
//! Filesystem sinks and checkpoints accept either a plain path (created if
//! missing) or a URL: `file:///abs/dir`, `s3://bucket/prefix` (credentials
//! from the usual `AWS_*` variables) or `gs://bucket/prefix` (`GOOGLE_*`).
//! Both resolve to an [`ObjectStore`] and a prefix inside it, so the code
//! above never cares which one it has.

use std::sync::Arc;

use object_store::aws::AmazonS3Builder;
use object_store::gcp::GoogleCloudStorageBuilder;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::ObjectStore;

/// A store and the prefix inside it that a sink or checkpoint owns.
#[derive(Clone, Debug)]
pub struct Location {
    pub store: Arc<dyn ObjectStore>,
    pub prefix: Path,
    /// As the user wrote it, for messages.
    pub display: String,
}

impl Location {
    /// `prefix/child`.
    pub fn child(&self, child: &str) -> Path {
        let mut path = self.prefix.clone();
        for part in child.split('/').filter(|p| !p.is_empty()) {
            path = path.join(part);
        }
        path
    }
}

/// Resolves `location` (a path or URL) to a store. Local directories are created.
pub fn resolve(location: &str) -> Result<Location, String> {
    let display = location.to_string();
    if let Some((scheme, _)) = location.split_once("://") {
        let url = url::Url::parse(location)
            .map_err(|e| format!("invalid storage URL `{location}`: {e}"))?;
        let prefix = Path::from(url.path().trim_start_matches('/'));
        let store: Arc<dyn ObjectStore> = match scheme {
            "file" => {
                let dir = url.path();
                std::fs::create_dir_all(dir).map_err(|e| format!("failed to create directory {dir}: {e}"))?;
                return local(dir, display);
            }
            "s3" | "s3a" => Arc::new(
                AmazonS3Builder::from_env()
                    .with_url(location)
                    .build()
                    .map_err(|e| format!("failed to open {location}: {e}"))?,
            ),
            "gs" => Arc::new(
                GoogleCloudStorageBuilder::from_env()
                    .with_url(location)
                    .build()
                    .map_err(|e| format!("failed to open {location}: {e}"))?,
            ),
            other => {
                return Err(format!(
                    "unsupported storage scheme `{other}://` in `{location}`; use a local path, file://, s3:// or gs://"
                ))
            }
        };
        return Ok(Location {
            store,
            prefix,
            display,
        });
    }
    std::fs::create_dir_all(location)
        .map_err(|e| format!("failed to create directory {location}: {e}"))?;
    local(location, display)
}

fn local(dir: &str, display: String) -> Result<Location, String> {
    let absolute = std::fs::canonicalize(dir)
        .map_err(|e| format!("failed to resolve directory {dir}: {e}"))?;
    let store = LocalFileSystem::new_with_prefix(&absolute)
        .map_err(|e| format!("failed to open directory {dir}: {e}"))?;
    Ok(Location {
        store: Arc::new(store),
        prefix: Path::default(),
        display,
    })
}
