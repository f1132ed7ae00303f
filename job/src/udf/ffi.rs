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

/// A loaded UDF library and its `__run` entry point.
///
/// A library is never unloaded: every array a call returns is released by
/// the plugin's own code (its release callback), and such arrays live on in
/// window outputs, the HTTP server's recent windows and sink buffers, up to
/// the very end of the process. Unloading the library first would leave
/// those callbacks pointing at unmapped code.
pub struct Library {
    path: PathBuf,
    run: RunFn,
    _library: std::mem::ManuallyDrop<libloading::Library>,
}

impl std::fmt::Debug for Library {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Library").field("path", &self.path).finish()
    }
}

impl Library {
    /// Opens `path` and finds `__run`. Errors name the file.
    pub fn open(path: &Path) -> Result<Library, String> {
        // SAFETY: loading runs the library's initialisers. A UDF library is
        // code the user chose to run in the job, like the job binary itself.
        let library = unsafe { libloading::Library::new(path) }
            .map_err(|e| format!("cannot load UDF library {}: {e}", path.display()))?;
        // SAFETY: the symbol's type is the plugin ABI's (see the module docs);
        // the manifest's plugin version was checked before this is called.
        let run: RunFn = unsafe {
            *library.get::<RunFn>(b"__run\0").map_err(|e| {
                format!(
                    "{} has no `__run` symbol ({e}): it is not a synchronous `#[udf]` library built with arroyo-udf-plugin",
                    path.display()
                )
            })?
        };
        Ok(Library {
            path: path.to_path_buf(),
            run,
            _library: std::mem::ManuallyDrop::new(library),
        })
    }

    /// Calls the function over `args` (equal lengths, the declared types).
    pub fn call(&self, args: &[ArrayRef]) -> Result<ArrayRef, CallError> {
        let len = args.len();
        // The plugin frees this array with the system allocator (`free`), so
        // it is allocated with `malloc`, whatever allocator engage uses.
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
        let arrays = FfiArrays {
            ptr,
            len,
            capacity: len.max(1),
            error: false,
        };
        // SAFETY: the ABI above; the plugin takes ownership of `arrays`.
        match unsafe { (self.run)(arrays) } {
            RunResult::Ok(FfiArraySchema(array, schema)) => {
                // SAFETY: a valid exported array and its schema, ours now.
                let data = unsafe { from_ffi(array, &schema) }?;
                Ok(make_array(data))
            }
            RunResult::Err => Err(CallError::Panicked),
        }
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
