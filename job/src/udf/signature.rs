//! A UDF's signature, read from its crate's `#[udf]` function as Arroyo
//! derives it, and the manifest `engage udf build` writes next to the library.
//!
//! Rust types map to SQL (Arrow) types as in `arroyo-udf-common`'s parser:
//! `bool`, `i8`..`i64`, `u8`..`u64`, `f32`, `f64`; `&str` in and `String` out
//! are TEXT; `&[u8]` in and `Vec<u8>` out are BYTEA; `Option<T>` makes an
//! argument nullable (without it, a NULL argument gives a NULL result and the
//! function is not called) or lets the result be NULL. A `Vec<T>` argument
//! makes the function an aggregate (UDAF) that receives every value of its
//! group. An `async fn` is an async UDF.

use std::path::Path;

use arrow::datatypes::{DataType, Field};
use serde::{Deserialize, Serialize};
use syn::{FnArg, GenericArgument, ItemFn, PathArguments, ReturnType, Type};

/// The SQL types a UDF can take and return through the plugin ABI.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum UdfType {
    Boolean,
    Int8,
    Int16,
    Int32,
    Int64,
    UInt8,
    UInt16,
    UInt32,
    UInt64,
    Float32,
    Float64,
    Utf8,
    Binary,
}

impl UdfType {
    pub fn to_arrow(self) -> DataType {
        match self {
            UdfType::Boolean => DataType::Boolean,
            UdfType::Int8 => DataType::Int8,
            UdfType::Int16 => DataType::Int16,
            UdfType::Int32 => DataType::Int32,
            UdfType::Int64 => DataType::Int64,
            UdfType::UInt8 => DataType::UInt8,
            UdfType::UInt16 => DataType::UInt16,
            UdfType::UInt32 => DataType::UInt32,
            UdfType::UInt64 => DataType::UInt64,
            UdfType::Float32 => DataType::Float32,
            UdfType::Float64 => DataType::Float64,
            UdfType::Utf8 => DataType::Utf8,
            UdfType::Binary => DataType::Binary,
        }
    }

    /// The SQL spelling, for listings and errors.
    pub fn sql(self) -> &'static str {
        match self {
            UdfType::Boolean => "BOOLEAN",
            UdfType::Int8 => "TINYINT",
            UdfType::Int16 => "SMALLINT",
            UdfType::Int32 => "INT",
            UdfType::Int64 => "BIGINT",
            UdfType::UInt8 => "TINYINT UNSIGNED",
            UdfType::UInt16 => "SMALLINT UNSIGNED",
            UdfType::UInt32 => "INT UNSIGNED",
            UdfType::UInt64 => "BIGINT UNSIGNED",
            UdfType::Float32 => "REAL",
            UdfType::Float64 => "DOUBLE",
            UdfType::Utf8 => "TEXT",
            UdfType::Binary => "BYTEA",
        }
    }
}

/// One argument or the result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct UdfValue {
    #[serde(rename = "type")]
    pub data_type: UdfType,
    /// The function takes (or may return) NULL: an `Option`.
    pub nullable: bool,
    /// A `Vec<T>` argument: the function aggregates a group's values.
    #[serde(default)]
    pub list: bool,
}

/// How an async UDF runs (`#[udf(ordered, timeout = "..", allowed_in_flight = N)]`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct AsyncOptions {
    pub ordered: bool,
    pub timeout_ms: u64,
    pub allowed_in_flight: u64,
}

/// What a `#[udf]` function declares.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Signature {
    pub name: String,
    pub args: Vec<UdfValue>,
    #[serde(rename = "return")]
    pub ret: UdfValue,
    /// `Some` for an `async fn`.
    #[serde(rename = "async")]
    pub asynchronous: Option<AsyncOptions>,
}

impl Signature {
    /// An aggregate: some argument is a `Vec`.
    pub fn is_aggregate(&self) -> bool {
        self.args.iter().any(|a| a.list)
    }

    /// `name(TEXT NULL) -> TEXT NULL`, for listings.
    pub fn display(&self) -> String {
        let value = |v: &UdfValue| {
            let base = v.data_type.sql().to_string();
            if v.nullable {
                format!("{base} NULL")
            } else {
                base
            }
        };
        let args: Vec<String> = self.args.iter().map(value).collect();
        let kind = match (&self.asynchronous, self.is_aggregate()) {
            (Some(_), _) => "async ",
            (None, true) => "aggregate ",
            _ => "",
        };
        format!(
            "{kind}{}({}) -> {}",
            self.name,
            args.join(", "),
            value(&self.ret)
        )
    }

    /// The argument's Arrow type as DataFusion sees it (a `Vec<T>` argument
    /// is called with `T` values).
    pub fn arg_field(&self, i: usize) -> Field {
        let arg = &self.args[i];
        Field::new(format!("arg{i}"), arg.data_type.to_arrow(), true)
    }
}

/// Finds the `#[udf]` function of a crate's `src/lib.rs`.
pub fn parse_crate(dir: &Path) -> Result<Signature, String> {
    let lib = dir.join("src").join("lib.rs");
    let source =
        std::fs::read_to_string(&lib).map_err(|e| format!("cannot read {}: {e}", lib.display()))?;
    parse_source(&source).map_err(|e| format!("{}: {e}", lib.display()))
}

/// Finds the one `#[udf]` function of a crate's source.
pub fn parse_source(source: &str) -> Result<Signature, String> {
    let file = syn::parse_file(source).map_err(|e| format!("does not parse as Rust: {e}"))?;
    let mut found = Vec::new();
    for item in &file.items {
        if let syn::Item::Fn(function) = item {
            if function.attrs.iter().any(|a| a.path().is_ident("udf")) {
                found.push(function);
            }
        }
    }
    match found.as_slice() {
        [function] => parse_function(function),
        [] => Err("no `#[udf]` function (the plugin's ABI exports exactly one per crate)".into()),
        _ => Err(format!(
            "{} `#[udf]` functions: the plugin's ABI exports one `__run` symbol, so a crate holds one UDF",
            found.len()
        )),
    }
}

fn parse_function(function: &ItemFn) -> Result<Signature, String> {
    let name = function.sig.ident.to_string();
    let mut args = Vec::new();
    for (i, input) in function.sig.inputs.iter().enumerate() {
        let FnArg::Typed(typed) = input else {
            return Err(format!("{name}: a UDF takes no `self`"));
        };
        let value = match vec_inner(&typed.ty) {
            Some(inner) if !is_u8(inner) => {
                let mut value = rust_type(inner, false)
                    .map_err(|e| format!("{name}: argument {i} (a Vec): {e}"))?;
                value.list = true;
                value
            }
            _ => rust_type(&typed.ty, false).map_err(|e| format!("{name}: argument {i}: {e}"))?,
        };
        args.push(value);
    }
    if args.is_empty() {
        return Err(format!(
            "{name}: a UDF needs at least one argument (the plugin sizes its output by the first)"
        ));
    }
    let ret = match &function.sig.output {
        ReturnType::Default => return Err(format!("{name}: the return type must be given")),
        ReturnType::Type(_, t) => {
            rust_type(t, true).map_err(|e| format!("{name}: return type: {e}"))?
        }
    };
    let asynchronous = function
        .sig
        .asyncness
        .is_some()
        .then(|| async_options(function))
        .transpose()?;
    Ok(Signature {
        name,
        args,
        ret,
        asynchronous,
    })
}

fn async_options(function: &ItemFn) -> Result<AsyncOptions, String> {
    // Arroyo's defaults.
    let mut options = AsyncOptions {
        ordered: false,
        timeout_ms: 5_000,
        allowed_in_flight: 1_000,
    };
    let Some(attr) = function.attrs.iter().find(|a| a.path().is_ident("udf")) else {
        return Ok(options);
    };
    if attr.meta.require_path_only().is_ok() {
        return Ok(options);
    }
    attr.parse_nested_meta(|meta| {
        if meta.path.is_ident("ordered") {
            options.ordered = true;
        } else if meta.path.is_ident("unordered") {
            options.ordered = false;
        } else if meta.path.is_ident("allowed_in_flight") {
            let n: syn::LitInt = meta.value()?.parse()?;
            options.allowed_in_flight = n.base10_parse()?;
        } else if meta.path.is_ident("timeout") {
            let text: syn::LitStr = meta.value()?.parse()?;
            options.timeout_ms = duration_ms(&text.value()).map_err(|e| meta.error(e))?;
        } else {
            return Err(meta.error("unknown #[udf] option"));
        }
        Ok(())
    })
    .map_err(|e| e.to_string())?;
    Ok(options)
}

/// `"5s"`, `"100 ms"`, `"2 minutes"` in milliseconds.
fn duration_ms(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("duration `{text}` has no unit"))?;
    let n: u64 = text[..split]
        .parse()
        .map_err(|_| format!("duration `{text}` does not start with a number"))?;
    let factor = match text[split..].trim() {
        "ms" | "millis" => 1,
        "s" | "secs" | "seconds" => 1_000,
        "m" | "mins" | "minutes" => 60_000,
        "h" | "hrs" | "hours" => 3_600_000,
        unit => return Err(format!("unknown time unit `{unit}`")),
    };
    Ok(n * factor)
}

fn last_segment(ty: &Type) -> Option<&syn::PathSegment> {
    match ty {
        Type::Path(path) => path.path.segments.last(),
        _ => None,
    }
}

fn single_generic(segment: &syn::PathSegment) -> Option<&Type> {
    let PathArguments::AngleBracketed(args) = &segment.arguments else {
        return None;
    };
    match args.args.first() {
        Some(GenericArgument::Type(inner)) if args.args.len() == 1 => Some(inner),
        _ => None,
    }
}

fn vec_inner(ty: &Type) -> Option<&Type> {
    let segment = last_segment(ty)?;
    (segment.ident == "Vec").then(|| single_generic(segment))?
}

fn is_u8(ty: &Type) -> bool {
    last_segment(ty).is_some_and(|s| s.ident == "u8" && s.arguments.is_none())
}

fn primitive(name: &str) -> Option<UdfType> {
    Some(match name {
        "bool" => UdfType::Boolean,
        "i8" => UdfType::Int8,
        "i16" => UdfType::Int16,
        "i32" => UdfType::Int32,
        "i64" => UdfType::Int64,
        "u8" => UdfType::UInt8,
        "u16" => UdfType::UInt16,
        "u32" => UdfType::UInt32,
        "u64" => UdfType::UInt64,
        "f32" => UdfType::Float32,
        "f64" => UdfType::Float64,
        _ => return None,
    })
}

/// One Rust type as a SQL type; `owned` for results (`String`, `Vec<u8>`),
/// borrowed for arguments (`&str`, `&[u8]`), as the plugin's macro expects.
fn rust_type(ty: &Type, owned: bool) -> Result<UdfValue, String> {
    let value = |data_type| UdfValue {
        data_type,
        nullable: false,
        list: false,
    };
    match ty {
        Type::Path(_) => {
            let segment = last_segment(ty).expect("a path has segments");
            let ident = segment.ident.to_string();
            if ident == "Option" {
                let inner = single_generic(segment).ok_or("Option needs one type argument")?;
                let mut inner = rust_type(inner, owned)?;
                inner.nullable = true;
                return Ok(inner);
            }
            if let Some(t) = primitive(&ident) {
                return Ok(value(t));
            }
            match (ident.as_str(), owned) {
                ("String", true) => Ok(value(UdfType::Utf8)),
                ("String", false) => Err("take `&str`, not `String`".into()),
                ("Vec", true) if vec_inner(ty).is_some_and(is_u8) => Ok(value(UdfType::Binary)),
                ("Vec", false) if vec_inner(ty).is_some_and(is_u8) => {
                    Err("take `&[u8]`, not `Vec<u8>`".into())
                }
                ("SystemTime" | "Duration", _) => Err(format!(
                    "`{ident}` is not supported by the plugin's synchronous ABI (arroyo-udf-plugin 0.2)"
                )),
                _ => Err(format!("unsupported type `{ident}`")),
            }
        }
        Type::Reference(reference) => match reference.elem.as_ref() {
            Type::Path(p) if p.path.is_ident("str") && !owned => Ok(value(UdfType::Utf8)),
            Type::Slice(s) if is_u8(&s.elem) && !owned => Ok(value(UdfType::Binary)),
            Type::Path(p) if p.path.is_ident("str") => Err("return `String`, not `&str`".into()),
            _ => Err("references are only `&str` and `&[u8]` arguments".into()),
        },
        _ => Err("unsupported type".into()),
    }
}

/// What `engage udf build` writes next to a library: its signature and what
/// it was built from. `engage run` reads it instead of the sources.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub signature: Signature,
    /// The library's file name, in the manifest's directory.
    pub library: String,
    /// SHA-256 of the library file.
    pub library_sha256: String,
    /// SHA-256 of the crate's `Cargo.toml` and `src/` (to tell a stale build).
    pub source_sha256: String,
    /// The `arroyo-udf-plugin` version the library was built against.
    pub plugin_version: String,
    /// The crate's directory when it was built.
    pub crate_dir: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signature(source: &str) -> Signature {
        parse_source(source).unwrap()
    }

    #[test]
    fn scalar_arguments_and_results_map_as_arroyo_maps_them() {
        let s = signature(
            "use arroyo_udf_plugin::udf;\n#[udf]\nfn f(a: Option<&str>, b: i64, c: &[u8]) -> Option<String> { None }",
        );
        assert_eq!(s.name, "f");
        assert_eq!(
            s.args,
            vec![
                UdfValue {
                    data_type: UdfType::Utf8,
                    nullable: true,
                    list: false
                },
                UdfValue {
                    data_type: UdfType::Int64,
                    nullable: false,
                    list: false
                },
                UdfValue {
                    data_type: UdfType::Binary,
                    nullable: false,
                    list: false
                },
            ]
        );
        assert!(s.ret.nullable && s.ret.data_type == UdfType::Utf8);
        assert!(!s.is_aggregate() && s.asynchronous.is_none());
        assert_eq!(s.display(), "f(TEXT NULL, BIGINT, BYTEA) -> TEXT NULL");
    }

    #[test]
    fn a_vec_argument_makes_an_aggregate() {
        let s = signature("#[udf]\nfn median(x: Vec<f64>) -> Option<f64> { None }");
        assert!(s.is_aggregate());
        assert!(s.args[0].list && s.args[0].data_type == UdfType::Float64);
    }

    #[test]
    fn async_options_are_read() {
        let s = signature(
            "#[udf(ordered, timeout = \"250ms\", allowed_in_flight = 8)]\nasync fn f(x: u64) -> u64 { x }",
        );
        assert_eq!(
            s.asynchronous,
            Some(AsyncOptions {
                ordered: true,
                timeout_ms: 250,
                allowed_in_flight: 8
            })
        );
    }

    #[test]
    fn crates_with_no_or_two_udfs_and_unsupported_types_are_refused() {
        assert!(parse_source("fn f(x: i64) -> i64 { x }")
            .unwrap_err()
            .contains("no `#[udf]`"));
        assert!(
            parse_source("#[udf] fn f(x: i64) -> i64 { x }\n#[udf] fn g(x: i64) -> i64 { x }")
                .unwrap_err()
                .contains("one UDF")
        );
        assert!(parse_source("#[udf] fn f(x: String) -> i64 { 1 }")
            .unwrap_err()
            .contains("&str"));
        assert!(parse_source("#[udf] fn f(x: i64) { }")
            .unwrap_err()
            .contains("return type"));
    }
}
