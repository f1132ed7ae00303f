//! Which UDFs a job runs with, and building them.
//!
//! In order, a function name is taken from the first of:
//! 1. each `--udf PATH`, then each entry of `ENGAGE_UDF_PATH` (`:`-separated):
//!    a UDF crate directory (built first if needed) or a built library (its
//!    manifest next to it);
//! 2. the crates under the UDF directory (`--udfs-dir`, default `udfs` in the
//!    working directory): built ones are loaded; one the SQL calls that is
//!    not built yet, or whose sources changed since, is built first;
//! 3. the UDF crates shipped inside engage (this repository's `udfs/`:
//!    [`SHIPPED`]), when the SQL calls one and nothing above provides it:
//!    written to
//!    `~/.cache/engage/udfs/<name>` and built there, so `engage demo` and the
//!    mission SQL run from any directory.
//!
//! A build is `cargo build --release --lib` of the crate, with the target
//! directory `ENGAGE_UDF_TARGET_DIR` (default `~/.cache/engage/udf-target`,
//! shared by every UDF crate so arrow 51 is compiled once); the library and
//! its manifest are then copied to `<crate>/target/engage/`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use sha2::{Digest, Sha256};

use super::signature::{self, Manifest, Signature};
use super::{file_sha256, hex, Udf};

/// The UDF crates shipped with engage: (directory name, Cargo.toml,
/// Cargo.lock, src/lib.rs). With the lock file, a build in the cache uses the
/// dependencies `engage udf build udfs/*` compiled, not newer ones.
pub const SHIPPED: &[(&str, &str, &str, &str)] = &[
    (
        "device_family",
        include_str!("../../../udfs/device_family/Cargo.toml"),
        include_str!("../../../udfs/device_family/Cargo.lock"),
        include_str!("../../../udfs/device_family/src/lib.rs"),
    ),
    (
        "median_engagement",
        include_str!("../../../udfs/median_engagement/Cargo.toml"),
        include_str!("../../../udfs/median_engagement/Cargo.lock"),
        include_str!("../../../udfs/median_engagement/src/lib.rs"),
    ),
    (
        "engagement_label",
        include_str!("../../../udfs/engagement_label/Cargo.toml"),
        include_str!("../../../udfs/engagement_label/Cargo.lock"),
        include_str!("../../../udfs/engagement_label/src/lib.rs"),
    ),
];

/// Where UDFs come from (see the module docs).
#[derive(Debug, Clone, Default)]
pub struct UdfOptions {
    /// `--udf PATH` (repeatable) and `ENGAGE_UDF_PATH`'s entries.
    pub paths: Vec<PathBuf>,
    /// The directory of UDF crates (`--udfs-dir`; `None`: `./udfs` if present).
    pub dir: Option<PathBuf>,
}

impl UdfOptions {
    /// `paths` plus `ENGAGE_UDF_PATH`.
    pub fn with_env(paths: Vec<PathBuf>, dir: Option<PathBuf>) -> UdfOptions {
        let mut paths = paths;
        if let Ok(list) = std::env::var("ENGAGE_UDF_PATH") {
            paths.extend(
                list.split(':')
                    .filter(|s| !s.trim().is_empty())
                    .map(PathBuf::from),
            );
        }
        UdfOptions { paths, dir }
    }

    fn crates_dir(&self) -> Option<PathBuf> {
        match &self.dir {
            Some(dir) => Some(dir.clone()),
            None => Some(PathBuf::from("udfs")).filter(|d| d.is_dir()),
        }
    }
}

/// Loads the UDFs a job with SQL `script` runs with, building what it calls
/// and is not built yet.
pub fn prepare(script: &str, options: &UdfOptions) -> Result<Vec<Arc<Udf>>, String> {
    // One build at a time in this process (the shipped crates' files are shared).
    static BUILDING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _building = BUILDING.lock().unwrap_or_else(|e| e.into_inner());
    let mut loaded: Vec<Arc<Udf>> = Vec::new();
    let add = |udf: Udf, loaded: &mut Vec<Arc<Udf>>| {
        if let Some(other) = loaded.iter().find(|u| u.name() == udf.name()) {
            tracing::warn!(
                udf = udf.name(),
                used = %other.library_path.display(),
                ignored = %udf.library_path.display(),
                "two UDFs of the same name: the first one is used"
            );
        } else {
            loaded.push(Arc::new(udf));
        }
    };
    for path in &options.paths {
        let manifest = if path.join("Cargo.toml").is_file() {
            ensure_built(path)?
        } else if path.is_file() {
            manifest_beside(path)
        } else {
            return Err(format!(
                "UDF path {} is neither a UDF crate directory nor a built library",
                path.display()
            ));
        };
        add(Udf::load(&manifest)?, &mut loaded);
    }
    if let Some(dir) = options.crates_dir() {
        for crate_dir in crate_dirs(&dir)? {
            let signature = signature::parse_crate(&crate_dir)?;
            if loaded.iter().any(|u| u.name() == signature.name) {
                continue;
            }
            let manifest = if calls(script, &signature.name) {
                ensure_built(&crate_dir)?
            } else {
                match built(&crate_dir)? {
                    Some((manifest, _)) => manifest,
                    None => continue, // not built, not needed
                }
            };
            add(Udf::load(&manifest)?, &mut loaded);
        }
    }
    for (dir_name, cargo_toml, cargo_lock, lib_rs) in SHIPPED {
        let signature = signature::parse_source(lib_rs)?;
        if loaded.iter().any(|u| u.name() == signature.name) || !calls(script, &signature.name) {
            continue;
        }
        let crate_dir = materialize(dir_name, cargo_toml, cargo_lock, lib_rs)?;
        add(Udf::load(&ensure_built(&crate_dir)?)?, &mut loaded);
    }
    Ok(loaded)
}

/// [`prepare`] off the async runtime's threads (it may run cargo for minutes).
pub async fn prepare_async(script: String, options: UdfOptions) -> Result<Vec<Arc<Udf>>, String> {
    tokio::task::spawn_blocking(move || prepare(&script, &options))
        .await
        .map_err(|e| format!("loading UDFs failed: {e}"))?
}

/// One UDF `engage udf list` shows.
#[derive(Debug)]
pub struct Listed {
    pub signature: Signature,
    /// Where it comes from: a path, or `shipped with engage`.
    pub origin: String,
    /// `built`, `built, sources changed since`, `not built`, or the library.
    pub status: String,
}

/// The UDFs a job could load, in [`prepare`]'s order, without building any.
pub fn list(options: &UdfOptions) -> Result<Vec<Listed>, String> {
    let mut out: Vec<Listed> = Vec::new();
    let crate_status = |dir: &Path| -> Result<String, String> {
        Ok(match built(dir)? {
            Some((manifest, true)) => format!("built: {}", manifest.display()),
            Some((_, false)) => "built, but its sources changed since (rebuilt on next use)".into(),
            None => "not built (built on first use, or by `engage udf build`)".into(),
        })
    };
    for path in &options.paths {
        if path.join("Cargo.toml").is_file() {
            out.push(Listed {
                signature: signature::parse_crate(path)?,
                origin: path.display().to_string(),
                status: crate_status(path)?,
            });
        } else {
            let udf = Udf::load(&manifest_beside(path))?;
            out.push(Listed {
                signature: udf.signature.clone(),
                origin: path.display().to_string(),
                status: "built library".into(),
            });
        }
    }
    if let Some(dir) = options.crates_dir() {
        for crate_dir in crate_dirs(&dir)? {
            out.push(Listed {
                signature: signature::parse_crate(&crate_dir)?,
                origin: crate_dir.display().to_string(),
                status: crate_status(&crate_dir)?,
            });
        }
    }
    for (dir_name, _, _, lib_rs) in SHIPPED {
        let signature = signature::parse_source(lib_rs)?;
        if out.iter().any(|l| l.signature.name == signature.name) {
            continue;
        }
        let cached = cache_dir().join("udfs").join(dir_name);
        out.push(Listed {
            signature,
            origin: "shipped with engage".into(),
            status: if cached.is_dir() {
                crate_status(&cached)?
            } else {
                "not built (built on first use)".into()
            },
        });
    }
    Ok(out)
}

/// Whether `script` calls `name(` (a whole word, any case).
pub fn calls(script: &str, name: &str) -> bool {
    let lower = script.to_ascii_lowercase();
    let name = name.to_ascii_lowercase();
    let bytes = lower.as_bytes();
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let mut from = 0;
    while let Some(found) = lower[from..].find(&name) {
        let start = from + found;
        let end = start + name.len();
        let before_ok = start == 0 || !word(bytes[start - 1]);
        let after = lower[end..].trim_start();
        if before_ok && after.starts_with('(') {
            return true;
        }
        from = end;
    }
    false
}

/// The crate directories (holding a `Cargo.toml`) directly under `dir`, sorted.
pub fn crate_dirs(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| format!("cannot read the UDF directory {}: {e}", dir.display()))?;
    let mut dirs: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("Cargo.toml").is_file())
        .collect();
    dirs.sort();
    Ok(dirs)
}

/// `libfoo.so` -> `libfoo.udf.json` beside it.
fn manifest_beside(library: &Path) -> PathBuf {
    let stem = library
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("udf");
    library.with_file_name(format!("{stem}.udf.json"))
}

/// Where a crate's built library and manifest are copied.
fn output_dir(crate_dir: &Path) -> PathBuf {
    crate_dir.join("target").join("engage")
}

/// The crate's manifest if it is built, and whether the build is current.
pub fn built(crate_dir: &Path) -> Result<Option<(PathBuf, bool)>, String> {
    let dir = output_dir(crate_dir);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Ok(None);
    };
    let Some(manifest) = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.to_string_lossy().ends_with(".udf.json"))
    else {
        return Ok(None);
    };
    let current = std::fs::read_to_string(&manifest)
        .ok()
        .and_then(|t| serde_json::from_str::<Manifest>(&t).ok())
        .is_some_and(|m| source_sha256(crate_dir).is_ok_and(|s| s == m.source_sha256));
    Ok(Some((manifest, current)))
}

/// The crate's manifest, built first if it is not, or not from its current sources.
pub fn ensure_built(crate_dir: &Path) -> Result<PathBuf, String> {
    match built(crate_dir)? {
        Some((manifest, true)) => Ok(manifest),
        Some((_, false)) => {
            eprintln!(
                "UDF crate {} changed since it was built: building it again",
                crate_dir.display()
            );
            build(crate_dir).map(|b| b.manifest)
        }
        None => {
            eprintln!(
                "UDF crate {} is not built yet: building it (release; the first UDF build \
                 compiles arrow 51 and takes a few minutes)",
                crate_dir.display()
            );
            build(crate_dir).map(|b| b.manifest)
        }
    }
}

/// A finished build.
#[derive(Debug)]
pub struct Built {
    pub signature: Signature,
    pub library: PathBuf,
    pub manifest: PathBuf,
}

/// The target directory every UDF build shares.
pub fn target_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("ENGAGE_UDF_TARGET_DIR") {
        return PathBuf::from(dir);
    }
    cache_dir().join("udf-target")
}

fn cache_dir() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("engage")
}

/// Builds the crate at `crate_dir` (release) and writes its manifest.
pub fn build(crate_dir: &Path) -> Result<Built, String> {
    let signature = signature::parse_crate(crate_dir)?;
    let package = package_name(crate_dir)?;
    let target = target_dir();
    std::fs::create_dir_all(&target)
        .map_err(|e| format!("cannot create {}: {e}", target.display()))?;
    // Crates of the same name (udfs/x and its shipped copy in the cache)
    // write the same file under the shared target directory: builds and
    // copies of every process take turns.
    let _lock = BuildLock::take(&target.join(".engage-udf-build.lock"))?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(&cargo)
        .args(["build", "--release", "--lib", "--manifest-path"])
        .arg(crate_dir.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target)
        .status()
        .map_err(|e| {
            format!(
                "cannot run cargo to build UDF crate {} ({e}): install Rust (https://rustup.rs) \
                 or pass a built library with --udf",
                crate_dir.display()
            )
        })?;
    if !status.success() {
        return Err(format!(
            "building UDF crate {} failed ({status}); cargo's messages are above",
            crate_dir.display()
        ));
    }
    let file = format!(
        "{}{}{}",
        std::env::consts::DLL_PREFIX,
        package.replace('-', "_"),
        std::env::consts::DLL_SUFFIX
    );
    let produced = target.join("release").join(&file);
    if !produced.is_file() {
        return Err(format!(
            "cargo built {} but left no {}: is `crate-type = [\"cdylib\"]` in its [lib]?",
            crate_dir.display(),
            produced.display()
        ));
    }
    let out = output_dir(crate_dir);
    std::fs::create_dir_all(&out).map_err(|e| format!("cannot create {}: {e}", out.display()))?;
    let library = out.join(&file);
    // Copy through a temporary name: a running job may have the old file mapped.
    let partial = out.join(format!(".{file}.partial"));
    std::fs::copy(&produced, &partial)
        .and_then(|_| std::fs::rename(&partial, &library))
        .map_err(|e| {
            format!(
                "cannot copy {} to {}: {e}",
                produced.display(),
                library.display()
            )
        })?;
    let manifest = Manifest {
        library: file.clone(),
        library_sha256: file_sha256(&library)?,
        source_sha256: source_sha256(crate_dir)?,
        plugin_version: plugin_version(crate_dir)?,
        crate_dir: crate_dir.display().to_string(),
        signature: signature.clone(),
    };
    let manifest_path = manifest_beside(&library);
    let json = serde_json::to_string_pretty(&manifest).expect("a manifest serialises");
    std::fs::write(&manifest_path, json)
        .map_err(|e| format!("cannot write {}: {e}", manifest_path.display()))?;
    Ok(Built {
        signature,
        library,
        manifest: manifest_path,
    })
}

/// An exclusive `flock` on a file, released when dropped (or when the process dies).
struct BuildLock {
    _file: std::fs::File,
}

impl BuildLock {
    fn take(path: &Path) -> Result<BuildLock, String> {
        use std::os::fd::AsRawFd;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        // SAFETY: flock on a descriptor this function owns.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(format!(
                "cannot lock {}: {}",
                path.display(),
                std::io::Error::last_os_error()
            ));
        }
        Ok(BuildLock { _file: file })
    }
}

/// `[package] name` of a crate.
fn package_name(crate_dir: &Path) -> Result<String, String> {
    let path = crate_dir.join("Cargo.toml");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut in_package = false;
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            in_package = line == "[package]";
        } else if in_package {
            if let Some(value) = line.strip_prefix("name") {
                let value = value.trim_start();
                if let Some(value) = value.strip_prefix('=') {
                    return Ok(value.trim().trim_matches('"').to_string());
                }
            }
        }
    }
    Err(format!("{} has no [package] name", path.display()))
}

/// The `arroyo-udf-plugin` version in the crate's `Cargo.lock`.
fn plugin_version(crate_dir: &Path) -> Result<String, String> {
    let path = crate_dir.join("Cargo.lock");
    let text = std::fs::read_to_string(&path).map_err(|e| {
        format!(
            "cannot read {} ({e}): a UDF crate is built on its own (add an empty [workspace] table)",
            path.display()
        )
    })?;
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        if line.trim() == "name = \"arroyo-udf-plugin\"" {
            if let Some(version) = lines
                .next()
                .and_then(|l| l.trim().strip_prefix("version = "))
            {
                return Ok(version.trim_matches('"').to_string());
            }
        }
    }
    Err(format!(
        "{} does not depend on arroyo-udf-plugin: a UDF crate needs `arroyo-udf-plugin = \"{}\"`",
        crate_dir.display(),
        super::PLUGIN_ABI
    ))
}

/// SHA-256 over the crate's `Cargo.toml` and every file under `src/`.
pub fn source_sha256(crate_dir: &Path) -> Result<String, String> {
    let mut files = vec![crate_dir.join("Cargo.toml")];
    let mut pending = vec![crate_dir.join("src")];
    while let Some(dir) = pending.pop() {
        let entries =
            std::fs::read_dir(&dir).map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
        for entry in entries.filter_map(Result::ok) {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
            } else {
                files.push(path);
            }
        }
    }
    files.sort();
    let mut hasher = Sha256::new();
    for file in files {
        let bytes =
            std::fs::read(&file).map_err(|e| format!("cannot read {}: {e}", file.display()))?;
        let relative = file.strip_prefix(crate_dir).unwrap_or(&file);
        hasher.update(relative.to_string_lossy().as_bytes());
        hasher.update((bytes.len() as u64).to_le_bytes());
        hasher.update(&bytes);
    }
    Ok(hex(&hasher.finalize()))
}

/// Writes a shipped crate under the cache directory (unchanged files are
/// left alone, so a built crate stays built) and returns its directory.
fn materialize(
    dir_name: &str,
    cargo_toml: &str,
    cargo_lock: &str,
    lib_rs: &str,
) -> Result<PathBuf, String> {
    let dir = cache_dir().join("udfs").join(dir_name);
    let write = |path: PathBuf, text: &str| -> Result<(), String> {
        if std::fs::read_to_string(&path).is_ok_and(|t| t == text) {
            return Ok(());
        }
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
        }
        std::fs::write(&path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))
    };
    write(dir.join("Cargo.toml"), cargo_toml)?;
    write(dir.join("Cargo.lock"), cargo_lock)?;
    write(dir.join("src").join("lib.rs"), lib_rs)?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_finds_whole_word_calls_in_any_case() {
        let sql = "SELECT Device_Family (device), my_median(x) FROM t -- median(";
        assert!(calls(sql, "device_family"));
        assert!(!calls(sql, "median_engagement"));
        assert!(!calls(sql, "family"));
        assert!(calls(sql, "median"));
        assert!(!calls("SELECT device_family FROM t", "device_family"));
    }

    #[test]
    fn shipped_crates_parse() {
        for (_, _, _, lib) in SHIPPED {
            signature::parse_source(lib).unwrap();
        }
    }
}
