//! `device_family(device)`: which family a device name belongs to.
//!
//! - `ios`, `android` (and `iphone`, `ipad`, `android-*`): `mobile`
//! - `web` and `web-*` (browsers: `web-chrome`, `web-safari`, ...): `web`
//! - `tv`, `roku`, `firetv`, `appletv`, `chromecast`, `smarttv` (and their
//!   `*-...` variants): `tv`
//! - anything else: `other`; NULL in, NULL out (the argument is an `Option`).
//!
//! Matching ignores ASCII case and surrounding spaces.

use arroyo_udf_plugin::udf;

const MOBILE: &[&str] = &["ios", "android", "iphone", "ipad"];
const TV: &[&str] = &["tv", "roku", "firetv", "appletv", "chromecast", "smarttv"];

#[udf]
fn device_family(device: Option<&str>) -> Option<String> {
    let device = device?.trim().to_ascii_lowercase();
    // `web-chrome` is a `web` device, `android-tablet` an `android` one.
    let base = device.split('-').next().unwrap_or("");
    let family = if MOBILE.contains(&base) {
        "mobile"
    } else if base == "web" {
        "web"
    } else if TV.contains(&base) {
        "tv"
    } else {
        "other"
    };
    Some(family.to_string())
}
