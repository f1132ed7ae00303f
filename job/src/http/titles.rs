//! Content titles and types for the JSON API's top list, read from the
//! job's `content` table in Postgres as it stands now.
//!
//! The windowed outputs hold content ids only; the dashboard shows titles.
//! The server asks Postgres (one query per request, for the ids shown) on a
//! connection of its own, opened on first use and again after an error.

use std::collections::HashMap;

use tokio::sync::Mutex;

use crate::source::setup::{quoted, PgTarget};
use crate::sql::JobSpec;

/// The table the titles come from.
pub const CONTENT_TABLE: &str = "content";

/// Title and type of one content item.
#[derive(Debug, Clone, Default)]
pub struct ContentInfo {
    pub title: Option<String>,
    pub content_type: Option<String>,
}

pub struct Titles {
    /// Connection string and quoted table; `None` when the job reads no
    /// `content` table from Postgres.
    source: Option<(String, String)>,
    client: Mutex<Option<tokio_postgres::Client>>,
}

impl Titles {
    pub fn for_job(spec: &JobSpec) -> Titles {
        let source = spec
            .tables
            .iter()
            .find(|t| t.name == CONTENT_TABLE)
            .and_then(|t| t.connector.postgres_cdc())
            .map(|cdc| {
                (
                    cdc.connection.expose().to_string(),
                    quoted(&cdc.schema, &cdc.table),
                )
            });
        Titles {
            source,
            client: Mutex::new(None),
        }
    }

    /// Title and type of each of `ids` found (missing ids are left out).
    /// Errors are logged, not returned: the API then shows ids without titles.
    pub async fn lookup(&self, ids: &[String]) -> HashMap<String, ContentInfo> {
        let Some((url, table)) = &self.source else {
            return HashMap::new();
        };
        if ids.is_empty() {
            return HashMap::new();
        }
        let mut client = self.client.lock().await;
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            match PgTarget::parse(url) {
                Ok(target) => match target.connect().await {
                    Ok(connected) => *client = Some(connected),
                    Err(error) => {
                        tracing::warn!(error = %error, "the HTTP API cannot reach Postgres for content titles");
                        return HashMap::new();
                    }
                },
                Err(error) => {
                    tracing::warn!(error = %error, "content titles: bad connection string");
                    return HashMap::new();
                }
            }
        }
        let Some(connected) = client.as_ref() else {
            return HashMap::new();
        };
        let sql = format!(
            "SELECT id::text, title::text, content_type::text FROM {table} WHERE id::text = ANY($1)"
        );
        match connected.query(&sql, &[&ids]).await {
            Ok(rows) => rows
                .iter()
                .map(|row| {
                    (
                        row.get::<_, String>(0),
                        ContentInfo {
                            title: row.get(1),
                            content_type: row.get(2),
                        },
                    )
                })
                .collect(),
            Err(error) => {
                tracing::warn!(error = %error, table = %table, "content titles: query failed");
                *client = None;
                HashMap::new()
            }
        }
    }
}
