//! User-defined functions: crates written with `arroyo-udf-plugin`'s `#[udf]`,
//! built as dynamic libraries and loaded by the job at start.
//!
//! A UDF is a crate (`crate-type = ["cdylib"]`) holding one `#[udf]`
//! function, exactly as for Arroyo: the same crate builds for an Arroyo
//! cluster. `engage udf build` builds it (`build.rs`) and writes a manifest
//! next to the library with the function's signature (read from its source,
//! as Arroyo reads it: `signature.rs`), the library's hash and the plugin
//! version. At start, `engage run`/`demo` gather the UDFs the job can call
//! (`discover.rs`), load each library (`ffi.rs`: only the Arrow C Data
//! Interface crosses, so the plugin's arrow 51 and engage's arrow 59 never
//! meet) and register each with DataFusion (`functions.rs`): a scalar UDF as
//! a scalar function, a UDAF (a `Vec` argument) as an aggregate. In windows,
//! a UDAF keeps every value of its group in the window state (a multiset, so
//! a delete takes its value back out) and is called once per group as the
//! window closes.
//!
//! An async UDF (`async fn`) runs batch by batch: each row of the batch is
//! sent to the plugin's own runtime, and the call returns once every result
//! is back, in row order (`ffi.rs`). No row is ever in flight at a
//! checkpoint barrier, so exactly-once needs nothing more; a batch takes as
//! long as its slowest call. A timeout is handled as a panic.
//!
//! # A UDF that panics
//!
//! The plugin catches a panic and fails the whole call. The engine then finds
//! the rows it panics on by re-running the failed step over halves of its
//! input (only that step: nothing of it has been written), records their
//! positions, and restarts the run from the newest checkpoint, as after a
//! crash. In the new run, those rows are left out of every step that calls
//! the UDF and written to `dead_letter` with reason `udf_error:<name>`;
//! every other row, and every query that does not call the UDF, flows on.
//! The rows are found again the same way if the process itself restarts.

pub mod bench;
pub mod discover;
pub mod ffi;
pub mod functions;
pub mod signature;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::ArrayRef;
use sha2::{Digest, Sha256};

pub use discover::{prepare, prepare_async, UdfOptions};
use ffi::{CallError, Library};
use signature::{Manifest, Signature};

/// The plugin ABI engage hosts: `arroyo-udf-plugin` 0.2.x.
pub const PLUGIN_ABI: &str = "0.2";

/// One loaded UDF.
#[derive(Debug)]
pub struct Udf {
    pub signature: Signature,
    pub library_path: PathBuf,
    pub library_sha256: String,
    /// The crate it was built from (for error messages).
    pub crate_dir: String,
    library: Library,
}

impl Udf {
    /// Loads the UDF a manifest describes. Errors name the file and say
    /// what to do.
    pub fn load(manifest_path: &Path) -> Result<Udf, String> {
        let text = std::fs::read_to_string(manifest_path)
            .map_err(|e| format!("cannot read UDF manifest {}: {e}", manifest_path.display()))?;
        let manifest: Manifest = serde_json::from_str(&text).map_err(|e| {
            format!(
                "{} is not a UDF manifest ({e}); rebuild with `engage udf build`",
                manifest_path.display()
            )
        })?;
        let dir = manifest_path.parent().unwrap_or(Path::new("."));
        let library_path = dir.join(&manifest.library);
        if !abi_compatible(&manifest.plugin_version) {
            return Err(format!(
                "{} was built with arroyo-udf-plugin {}, but engage hosts the {PLUGIN_ABI}.x ABI: \
                 set `arroyo-udf-plugin = \"{PLUGIN_ABI}\"` in {}/Cargo.toml and rebuild",
                library_path.display(),
                manifest.plugin_version,
                manifest.crate_dir
            ));
        }
        let library_sha256 = file_sha256(&library_path)?;
        if library_sha256 != manifest.library_sha256 {
            return Err(format!(
                "{} changed after its manifest was written; rebuild it with `engage udf build {}`",
                library_path.display(),
                manifest.crate_dir
            ));
        }
        let library = Library::open(&library_path, manifest.signature.asynchronous.is_some())?;
        Ok(Udf {
            signature: manifest.signature,
            library_path,
            library_sha256,
            crate_dir: manifest.crate_dir,
            library,
        })
    }

    pub fn name(&self) -> &str {
        &self.signature.name
    }

    /// Calls the function over `args`, cast to the declared types first.
    pub fn call(&self, args: &[ArrayRef]) -> Result<ArrayRef, CallError> {
        let args = args
            .iter()
            .zip(&self.signature.args)
            .map(|(a, declared)| ffi::cast_to(a, &declared.data_type.to_arrow()))
            .collect::<Result<Vec<_>, _>>()?;
        match &self.signature.asynchronous {
            None => self.library.call(&args),
            Some(options) => self.call_async(&args, options),
        }
    }

    /// An async UDF over a batch: every row is sent, and the call returns
    /// once every result is back (see the module docs). A row with NULL in
    /// an argument that is not an `Option` gives NULL without a call, as the
    /// synchronous ABI does (the async one would read the NULL as a value).
    fn call_async(
        &self,
        args: &[ArrayRef],
        options: &signature::AsyncOptions,
    ) -> Result<ArrayRef, CallError> {
        use arrow::array::{Array, UInt32Array};
        let rows = args.first().map_or(0, |a| a.len());
        let skipped: Vec<bool> = (0..rows)
            .map(|row| {
                args.iter()
                    .zip(&self.signature.args)
                    .any(|(a, declared)| !declared.nullable && a.is_null(row))
            })
            .collect();
        let sent: UInt32Array = (0..rows as u32)
            .filter(|&row| !skipped[row as usize])
            .collect();
        let sent_args = if sent.len() == rows {
            args.to_vec()
        } else {
            args.iter()
                .map(|a| arrow::compute::take(a, &sent, None))
                .collect::<Result<Vec<_>, _>>()?
        };
        let config = ffi::AsyncConfig {
            ordered: options.ordered,
            timeout: std::time::Duration::from_millis(options.timeout_ms),
            allowed_in_flight: u32::try_from(options.allowed_in_flight).unwrap_or(u32::MAX),
        };
        let results = if sent.is_empty() {
            Vec::new()
        } else {
            self.library.call_async(&sent_args, config)?
        };
        let ret = self.signature.ret.data_type.to_arrow();
        let values = if results.is_empty() {
            arrow::array::new_empty_array(&ret)
        } else {
            let parts: Vec<&dyn Array> = results.iter().map(|(_, a)| a.as_ref()).collect();
            arrow::compute::concat(&parts)?
        };
        // Row `r` takes the next result, or NULL if it was not sent.
        let mut next = 0u32;
        let positions: UInt32Array = skipped
            .iter()
            .map(|&skip| {
                (!skip).then(|| {
                    next += 1;
                    next - 1
                })
            })
            .collect();
        Ok(arrow::compute::take(&values, &positions, None)?)
    }
}

fn abi_compatible(version: &str) -> bool {
    version == PLUGIN_ABI || version.starts_with(&format!("{PLUGIN_ABI}."))
}

/// SHA-256 of a file, hex.
pub fn file_sha256(path: &Path) -> Result<String, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    Ok(hex(&Sha256::digest(&bytes)))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The UDFs a job runs with, as DataFusion functions (see `functions.rs`).
pub type Udfs = Vec<Arc<Udf>>;

/// A UDF in a plan: equal when name and library are.
#[derive(Clone)]
pub struct UdfRef(pub Arc<Udf>);

impl PartialEq for UdfRef {
    fn eq(&self, other: &Self) -> bool {
        self.0.name() == other.0.name() && self.0.library_sha256 == other.0.library_sha256
    }
}

impl Eq for UdfRef {}

impl std::hash::Hash for UdfRef {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.name().hash(state);
        self.0.library_sha256.hash(state);
    }
}

impl std::fmt::Debug for UdfRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0.signature.display())
    }
}

/// An error a UDF call returns through DataFusion when the function
/// panicked: the engine recognises it and looks for the rows (module docs).
#[derive(Debug, Clone, thiserror::Error)]
#[error("UDF `{udf}` panicked (reason udf_error:{udf})")]
pub struct UdfPanicked {
    pub udf: String,
}

impl UdfPanicked {
    /// The panicked UDF behind a DataFusion error, however it was wrapped.
    pub fn find(error: &datafusion::error::DataFusionError) -> Option<&UdfPanicked> {
        use datafusion::error::DataFusionError;
        match error {
            DataFusionError::External(e) => e.downcast_ref::<UdfPanicked>(),
            DataFusionError::Context(_, inner) => UdfPanicked::find(inner),
            DataFusionError::Shared(inner) => UdfPanicked::find(inner),
            DataFusionError::ArrowError(arrow_error, _) => match arrow_error.as_ref() {
                arrow::error::ArrowError::ExternalError(e) => e
                    .downcast_ref::<datafusion::error::DataFusionError>()
                    .and_then(UdfPanicked::find),
                _ => None,
            },
            _ => None,
        }
    }
}
