//! Events in COPY text form: Zipf-popular content, a pool of users, event
//! types, devices and durations drawn from fixed weights, all from one seed.

use std::fmt::Write as _;

use chrono::{DateTime, Utc};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use super::{
    ContentItem, GenerateError, ADJECTIVES, APP_VERSIONS, CONTENT_DOMAIN, CONTENT_TYPES, DEVICES,
    EVENT_TYPES, NOUNS, USER_DOMAIN, USER_POOL, UUID_LEN,
};

/// Zipf-like popularity: rank `k` (0-based) has weight `1 / (k + 1)^s`.
pub(super) struct ZipfSampler {
    pub(super) cdf: Vec<f64>,
}

impl ZipfSampler {
    pub(super) fn new(n: usize, exponent: f64) -> Self {
        let mut total = 0.0;
        let mut cdf: Vec<f64> = (0..n)
            .map(|k| {
                total += ((k + 1) as f64).powf(-exponent);
                total
            })
            .collect();
        cdf.iter_mut().for_each(|c| *c /= total);
        if let Some(last) = cdf.last_mut() {
            *last = 1.0;
        }
        Self { cdf }
    }

    /// A rank in `0..n`, by binary search of a uniform draw in the CDF.
    pub(super) fn sample(&self, rng: &mut StdRng) -> usize {
        let u: f64 = rng.random();
        self.cdf
            .partition_point(|&c| c <= u)
            .min(self.cdf.len() - 1)
    }
}

/// Formats batches of events in COPY text format; owns all random state.
pub(crate) struct EventGenerator {
    rng: StdRng,
    items: Vec<ContentItem>,
    /// `by_rank[r]` is the index into `items` of the item with popularity rank `r`.
    by_rank: Vec<usize>,
    zipf: ZipfSampler,
    /// `USER_POOL` UUIDs of `UUID_LEN` bytes each, back to back.
    users: String,
    /// `event_ts` of the batch being written, in COPY form.
    event_ts: String,
}

impl EventGenerator {
    pub(crate) fn new(
        items: Vec<ContentItem>,
        seed: u64,
        exponent: f64,
    ) -> Result<Self, GenerateError> {
        if items.is_empty() {
            return Err(GenerateError::NoContent);
        }
        let mut rng = StdRng::seed_from_u64(seed);
        // Ranks are shuffled so popularity does not follow slug order.
        let mut by_rank: Vec<usize> = (0..items.len()).collect();
        by_rank.shuffle(&mut rng);
        let mut users = String::with_capacity(USER_POOL * UUID_LEN);
        for index in 0..USER_POOL as u64 {
            write_uuid(&mut users, derived_uuid(seed, USER_DOMAIN, index));
        }
        let zipf = ZipfSampler::new(items.len(), exponent);
        Ok(Self {
            rng,
            items,
            by_rank,
            zipf,
            users,
            event_ts: String::with_capacity(32),
        })
    }

    /// Appends `rows` events stamped `event_ts` to `out`, one COPY text line each.
    pub(crate) fn write_batch(&mut self, out: &mut String, rows: usize, event_ts: DateTime<Utc>) {
        self.event_ts.clear();
        write_event_ts(&mut self.event_ts, event_ts);
        for _ in 0..rows {
            let item = &self.items[self.by_rank[self.zipf.sample(&mut self.rng)]];
            let user = self.rng.random_range(0..USER_POOL);
            let event_type = pick(&mut self.rng, &EVENT_TYPES);
            let device = pick(&mut self.rng, &DEVICES);
            let duration_ms = duration_ms(&mut self.rng, event_type, item.length_seconds);
            let app_version = pick(&mut self.rng, &APP_VERSIONS);
            let session: u32 = self.rng.random_range(1..=10_000_000);

            // Ids are UUID text and the tokens come from the tables above, so only
            // the JSON payload can hold bytes that COPY text format must escape.
            out.push_str(&item.id);
            out.push('\t');
            out.push_str(&self.users[user * UUID_LEN..(user + 1) * UUID_LEN]);
            out.push('\t');
            out.push_str(event_type);
            out.push('\t');
            out.push_str(&self.event_ts);
            out.push('\t');
            match duration_ms {
                Some(ms) => {
                    let _ = write!(out, "{ms}");
                }
                None => out.push_str("\\N"),
            }
            out.push('\t');
            out.push_str(device);
            out.push('\t');
            let _ = write!(
                CopyText(out),
                r#"{{"app_version":"{app_version}","session":{session}}}"#
            );
            out.push('\n');
        }
    }
}

/// Picks from a weighted table (weights sum to 100).
pub(super) fn pick<'a>(rng: &mut StdRng, table: &[(&'a str, u32)]) -> &'a str {
    let mut roll = rng.random_range(0..100u32);
    for &(value, weight) in table {
        if roll < weight {
            return value;
        }
        roll -= weight;
    }
    table[table.len() - 1].0
}

/// ~5% NULL; clicks are short; plays, pauses and finishes are a share of the
/// item's length (or a reading time when the length is unknown or 0).
pub(super) fn duration_ms(
    rng: &mut StdRng,
    event_type: &str,
    length_seconds: Option<i32>,
) -> Option<i32> {
    if rng.random_bool(0.05) {
        return None;
    }
    let length_ms = match length_seconds {
        Some(seconds) if seconds > 0 => f64::from(seconds) * 1000.0,
        _ => 600_000.0,
    };
    let share = match event_type {
        "click" => return Some(rng.random_range(40..2_000)),
        "finish" => rng.random_range(0.85..1.02),
        "pause" => rng.random_range(0.01..0.6),
        _ => rng.random_range(0.02..1.0),
    };
    Some((length_ms * share).min(f64::from(i32::MAX)) as i32)
}

/// The content catalogue for `seed`, each with its publish time in minutes after
/// 2024-01-01: ~10% NULL lengths, ~3% zero lengths, mixed types, unique slugs.
pub(super) fn seeded_content(n: usize, seed: u64) -> Vec<(ContentItem, i32)> {
    let mut rng = StdRng::seed_from_u64(splitmix64(seed ^ CONTENT_DOMAIN));
    (0..n)
        .map(|index| {
            let content_type = pick(&mut rng, &CONTENT_TYPES);
            let (adjective, noun) = (
                ADJECTIVES[rng.random_range(0..ADJECTIVES.len())],
                NOUNS[rng.random_range(0..NOUNS.len())],
            );
            let roll: f64 = rng.random();
            let length_seconds = if roll < 0.10 {
                None
            } else if roll < 0.13 {
                Some(0)
            } else {
                Some(match content_type {
                    "podcast" => rng.random_range(600..5_400),
                    "video" => rng.random_range(60..1_800),
                    _ => rng.random_range(120..900),
                })
            };
            let mut id = String::with_capacity(UUID_LEN);
            write_uuid(&mut id, derived_uuid(seed, CONTENT_DOMAIN, index as u64));
            let item = ContentItem {
                id,
                slug: format!("{adjective}-{noun}-{index:05}"),
                title: format!("The {adjective} {noun} #{index}"),
                content_type: content_type.to_owned(),
                length_seconds,
            };
            (item, rng.random_range(0..2 * 365 * 24 * 60))
        })
        .collect()
}

pub(super) fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A version-4-shaped UUID that is a pure function of (seed, domain, index).
pub(super) fn derived_uuid(seed: u64, domain: u64, index: u64) -> u128 {
    let hi = splitmix64(seed ^ splitmix64(domain ^ splitmix64(index)));
    let lo = splitmix64(hi ^ 0x5EED);
    let bits = (u128::from(hi) << 64) | u128::from(lo);
    (bits & !(0xF << 76) & !(0b11 << 62)) | (0x4 << 76) | (0b10 << 62)
}

pub(super) fn write_uuid(out: &mut String, value: u128) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for nibble in 0..32 {
        if matches!(nibble, 8 | 12 | 16 | 20) {
            out.push('-');
        }
        out.push(HEX[((value >> (124 - 4 * nibble)) & 0xF) as usize] as char);
    }
}

/// `YYYY-MM-DD HH:MM:SS.ffffff+00`, the UTC text form Postgres reads for TIMESTAMPTZ.
pub(super) fn write_event_ts(out: &mut String, ts: DateTime<Utc>) {
    let _ = write!(out, "{}", ts.format("%Y-%m-%d %H:%M:%S%.6f+00"));
}

/// Appends `value` escaped for COPY text format (backslash, tab, newline, CR).
/// A plain byte loop: it stays fast even in unoptimised builds.
pub(super) fn push_copy_text(out: &mut String, value: &str) {
    let mut start = 0;
    for (at, byte) in value.bytes().enumerate() {
        let escaped = match byte {
            b'\\' => "\\\\",
            b'\t' => "\\t",
            b'\n' => "\\n",
            b'\r' => "\\r",
            _ => continue,
        };
        out.push_str(&value[start..at]);
        out.push_str(escaped);
        start = at + 1;
    }
    out.push_str(&value[start..]);
}

/// A `fmt::Write` that escapes everything written through it for COPY text format.
pub(super) struct CopyText<'a>(pub(super) &'a mut String);

impl std::fmt::Write for CopyText<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        push_copy_text(self.0, s);
        Ok(())
    }
}
