//! The plugin ABI of `arroyo-udf-plugin` 0.2, on our side of it.
//!
//! A `#[udf]` crate exports one symbol, `extern "C-unwind" fn __run(FfiArrays)
//! -> RunResult`. Arguments and the result cross as Arrow C Data Interface
//! structs, which is all that may cross: the plugin is built against arrow
//! 51 and engage against arrow 59, so no Rust type of either is shared. The
//! two `#[repr(C)]` types below mirror the plugin's (`arroyo-udf-common`)
//! field for field.
//!
//! Ownership, as the plugin defines it: the argument array (a `Vec` the
//! plugin rebuilds with `Vec::from_raw_parts` and frees with the system
//! allocator) and the arrays in it belong to the plugin once `__run` is
//! called; the returned array belongs to us, and is released through its own
//! release callback. The plugin catches a panic in the user's function and
//! returns `RunResult::Err`. Because returned arrays are released by the
//! plugin's code, a loaded library stays loaded until the process exits.

use std::path::{Path, PathBuf};

use arrow::array::{make_array, Array, ArrayRef};
use arrow::ffi::{from_ffi, to_ffi, FFI_ArrowArray, FFI_ArrowSchema};

/// `arroyo_udf_common::FfiArraySchema`.
#[repr(C)]
struct FfiArraySchema(FFI_ArrowArray, FFI_ArrowSchema);

/// `arroyo_udf_common::FfiArrays`: a `Vec<FfiArraySchema>` taken apart.
#[repr(C)]
struct FfiArrays {
    ptr: *mut FfiArraySchema,
    len: usize,
    capacity: usize,
    error: bool,
}

/// `arroyo_udf_common::RunResult`.
#[repr(C)]
#[allow(dead_code)] // built by the plugin
enum RunResult {
    Ok(FfiArraySchema),
    Err,
}

type RunFn = unsafe extern "C-unwind" fn(FfiArrays) -> RunResult;

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The user's function panicked on some row of the call.
    #[error("the function panicked")]
    Panicked,
    #[error("{0}")]
    Arrow(#[from] arrow::error::ArrowError),
}

/// `arroyo_udf_common::async_udf::SendableFfiAsyncUdfHandle`.
#[repr(C)]
#[derive(Clone, Copy)]
struct AsyncHandle {
    ptr: *mut std::ffi::c_void,
}

// SAFETY: the plugin's handle is a pointer to its channel and result mutex,
// made to be used from any thread (the plugin marks it Send + Sync too).
unsafe impl Send for AsyncHandle {}

/// `arroyo_udf_common::async_udf::DrainResult`.
#[repr(C)]
#[allow(dead_code)] // built by the plugin
enum DrainResult {
    Data(FfiArrays),
    None,
    Error,
}

type StartFn = unsafe extern "C-unwind" fn(bool, u64, u32) -> AsyncHandle;
type SendFn =
    unsafe extern "C-unwind" fn(AsyncHandle, u64, FfiArrays) -> async_ffi::FfiFuture<bool>;
type DrainFn = unsafe extern "C-unwind" fn(AsyncHandle) -> DrainResult;
type StopFn = unsafe extern "C-unwind" fn(AsyncHandle);

/// The entry points of an async UDF (`__start`, `__send`, `__drain_results`,
/// `__stop_runtime`) and its running instance, if started.
struct AsyncEntry {
    start: StartFn,
    send: SendFn,
    drain: DrainFn,
    stop: StopFn,
    running: std::sync::Mutex<Option<AsyncHandle>>,
}

enum Entry {
    Sync(RunFn),
    Async(AsyncEntry),
}

/// How an async UDF runs (from its `#[udf(..)]` options).
#[derive(Debug, Clone, Copy)]
pub struct AsyncConfig {
    pub ordered: bool,
    pub timeout: std::time::Duration,
    pub allowed_in_flight: u32,
}

/// A loaded UDF library and its entry points.
///
/// A library is never unloaded: every array a call returns is released by
/// the plugin's own code (its release callback), and such arrays live on in
/// window outputs, the HTTP server's recent windows and sink buffers, up to
/// the very end of the process. Unloading the library first would leave
/// those callbacks pointing at unmapped code.
pub struct Library {
    path: PathBuf,
    entry: Entry,
    _library: std::mem::ManuallyDrop<libloading::Library>,
}

impl std::fmt::Debug for Library {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Library").field("path", &self.path).finish()
    }
}

/// `symbol` of `library`, or an error naming the file.
///
/// SAFETY: `T` must be the symbol's type in the plugin ABI.
unsafe fn symbol<T: Copy>(
    library: &libloading::Library,
    path: &Path,
    symbol: &str,
) -> Result<T, String> {
    let name = format!("{symbol}\0");
    // SAFETY: per this function's contract.
    unsafe { library.get::<T>(name.as_bytes()) }
        .map(|s| *s)
        .map_err(|e| {
            format!(
                "{} has no `{symbol}` symbol ({e}): it is not a `#[udf]` library built with arroyo-udf-plugin \
                 (or its manifest says sync where the library is async, or the reverse)",
                path.display()
            )
        })
}

impl Library {
    /// Opens `path` and finds its entry points (`asynchronous`: an async
    /// UDF's). Errors name the file.
    pub fn open(path: &Path, asynchronous: bool) -> Result<Library, String> {
        // SAFETY: loading runs the library's initialisers. A UDF library is
        // code the user chose to run in the job, like the job binary itself.
        let library = unsafe { libloading::Library::new(path) }
            .map_err(|e| format!("cannot load UDF library {}: {e}", path.display()))?;
        // SAFETY: the symbols' types are the plugin ABI's (see the module
        // docs); the manifest's plugin version was checked before this.
        let entry = unsafe {
            if asynchronous {
                Entry::Async(AsyncEntry {
                    start: symbol(&library, path, "__start")?,
                    send: symbol(&library, path, "__send")?,
                    drain: symbol(&library, path, "__drain_results")?,
                    stop: symbol(&library, path, "__stop_runtime")?,
                    running: std::sync::Mutex::new(None),
                })
            } else {
                Entry::Sync(symbol(&library, path, "__run")?)
            }
        };
        Ok(Library {
            path: path.to_path_buf(),
            entry,
            _library: std::mem::ManuallyDrop::new(library),
        })
    }

    /// Calls a synchronous UDF over `args` (equal lengths, the declared types).
    pub fn call(&self, args: &[ArrayRef]) -> Result<ArrayRef, CallError> {
        let Entry::Sync(run) = &self.entry else {
            return Err(CallError::Arrow(
                arrow::error::ArrowError::InvalidArgumentError(
                    "an async UDF is called with call_async".into(),
                ),
            ));
        };
        let arrays = export(args)?;
        // SAFETY: the ABI above; the plugin takes ownership of `arrays`.
        match unsafe { run(arrays) } {
            RunResult::Ok(FfiArraySchema(array, schema)) => {
                // SAFETY: a valid exported array and its schema, ours now.
                let data = unsafe { from_ffi(array, &schema) }?;
                Ok(make_array(data))
            }
            RunResult::Err => Err(CallError::Panicked),
        }
    }

    /// Calls an async UDF once per row of `args` and waits for every result
    /// (see `asynchronous.rs` for how this fits the engine). Results come
    /// back in row order whatever order the plugin finished them in. A call
    /// that times out, or panics, stops the plugin's runtime: the whole call
    /// fails as [`CallError::Panicked`], and the next call starts a new runtime.
    pub fn call_async(
        &self,
        args: &[ArrayRef],
        config: AsyncConfig,
    ) -> Result<Vec<(u64, ArrayRef)>, CallError> {
        let Entry::Async(entry) = &self.entry else {
            return Err(CallError::Arrow(
                arrow::error::ArrowError::InvalidArgumentError(
                    "a synchronous UDF is called with call".into(),
                ),
            ));
        };
        let rows = args.first().map_or(0, |a| a.len());
        let mut running = entry.running.lock().unwrap_or_else(|e| e.into_inner());
        let handle = *running.get_or_insert_with(|| {
            let timeout = u64::try_from(config.timeout.as_micros()).unwrap_or(u64::MAX);
            // SAFETY: the plugin ABI; the handle lives until `stop`.
            unsafe { (entry.start)(config.ordered, timeout, config.allowed_in_flight) }
        });
        let fail = |running: &mut Option<AsyncHandle>| {
            // The plugin's runtime thread panicked (a timeout or a panic in
            // the function): drop this instance; the next call starts anew.
            if let Some(handle) = running.take() {
                // SAFETY: a handle `start` returned, stopped once.
                unsafe { (entry.stop)(handle) };
            }
            CallError::Panicked
        };
        for row in 0..rows {
            let one: Vec<ArrayRef> = args.iter().map(|a| a.slice(row, 1)).collect();
            let arrays = export(&one)?;
            // SAFETY: the ABI above; the plugin takes ownership of `arrays`.
            let sent =
                futures::executor::block_on(unsafe { (entry.send)(handle, row as u64, arrays) });
            if !sent {
                return Err(fail(&mut running));
            }
        }
        let deadline =
            std::time::Instant::now() + config.timeout + std::time::Duration::from_secs(1);
        let mut results = Vec::new();
        let mut received = 0;
        while received < rows {
            // SAFETY: the ABI above.
            match unsafe { (entry.drain)(handle) } {
                DrainResult::Data(arrays) => {
                    let mut parts = import(arrays)?.into_iter();
                    let (Some(ids), Some(values)) = (parts.next(), parts.next()) else {
                        return Err(fail(&mut running));
                    };
                    let ids = ids
                        .as_any()
                        .downcast_ref::<arrow::array::UInt64Array>()
                        .ok_or_else(|| fail(&mut running))?
                        .clone();
                    received += ids.len();
                    for (i, id) in ids.values().iter().enumerate() {
                        results.push((*id, values.slice(i, 1)));
                    }
                }
                DrainResult::None if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_micros(200));
                }
                DrainResult::None | DrainResult::Error => return Err(fail(&mut running)),
            }
        }
        results.sort_by_key(|(id, _)| *id);
        Ok(results)
    }
}

/// `args` as the plugin's argument array. The plugin frees the block with
/// the system allocator (`free`), so it is allocated with `malloc`, whatever
/// allocator engage uses.
fn export(args: &[ArrayRef]) -> Result<FfiArrays, CallError> {
    let len = args.len();
    let size = std::mem::size_of::<FfiArraySchema>() * len.max(1);
    // SAFETY: a plain allocation, checked for NULL below.
    let ptr = unsafe { libc::malloc(size) } as *mut FfiArraySchema;
    if ptr.is_null() {
        return Err(CallError::Arrow(arrow::error::ArrowError::MemoryError(
            "cannot allocate a UDF call's arguments".into(),
        )));
    }
    for (i, arg) in args.iter().enumerate() {
        let (array, schema) = match to_ffi(&arg.to_data()) {
            Ok(exported) => exported,
            Err(e) => {
                // Release what was exported so far, then the block.
                for j in 0..i {
                    // SAFETY: elements 0..i were written below.
                    unsafe { std::ptr::drop_in_place(ptr.add(j)) };
                }
                // SAFETY: allocated above with malloc.
                unsafe { libc::free(ptr.cast()) };
                return Err(e.into());
            }
        };
        // SAFETY: `ptr` holds room for `len` elements.
        unsafe { ptr.add(i).write(FfiArraySchema(array, schema)) };
    }
    Ok(FfiArrays {
        ptr,
        len,
        capacity: len.max(1),
        error: false,
    })
}

/// The arrays of an argument array the plugin built (and allocated with
/// `malloc`): ours now.
fn import(arrays: FfiArrays) -> Result<Vec<ArrayRef>, CallError> {
    let mut out = Vec::with_capacity(arrays.len);
    let mut failure = None;
    for i in 0..arrays.len {
        // SAFETY: the plugin wrote `len` elements; each is read once.
        let FfiArraySchema(array, schema) = unsafe { arrays.ptr.add(i).read() };
        // SAFETY: a valid exported array and its schema.
        match unsafe { from_ffi(array, &schema) } {
            Ok(data) => out.push(make_array(data)),
            Err(e) => failure = Some(e),
        }
    }
    // SAFETY: the plugin's `Vec` block, allocated with the system allocator.
    unsafe { libc::free(arrays.ptr.cast()) };
    match failure {
        Some(e) => Err(e.into()),
        None => Ok(out),
    }
}

/// `array` cast to `data_type` if it is not already of it.
pub fn cast_to(
    array: &ArrayRef,
    data_type: &arrow::datatypes::DataType,
) -> Result<ArrayRef, arrow::error::ArrowError> {
    if array.data_type() == data_type {
        Ok(array.clone())
    } else {
        arrow::compute::cast(array, data_type)
    }
}
