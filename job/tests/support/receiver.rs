//! A webhook receiver on loopback for the tests: records every request
//! (id, timestamp, signature, body, when, the answer) and answers as
//! scripted: scripted statuses first, then 200; a batch holding the text
//! `"refuse"` gets 400.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};

/// One request as the receiver saw it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Received {
    pub id: String,
    pub timestamp: String,
    pub signature: String,
    pub body: String,
    /// When it arrived, since the receiver started.
    #[serde(skip)]
    pub at: Duration,
    /// What the receiver answered.
    #[serde(skip)]
    pub status: u16,
}

/// What the receiver answers, in order: scripted statuses first, then 200;
/// any batch holding `refuse` gets 400.
#[derive(Default)]
pub struct Script {
    pub statuses: Vec<u16>,
    pub delay: Duration,
}

pub struct Receiver {
    pub url: String,
    pub received: Arc<Mutex<Vec<Received>>>,
}

pub async fn start_receiver(script: Script) -> Receiver {
    let received: Arc<Mutex<Vec<Received>>> = Arc::default();
    let script = Arc::new(Mutex::new(script));
    let started = Instant::now();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post({
            let received = received.clone();
            move |headers: HeaderMap, body: String| {
                let received = received.clone();
                let script = script.clone();
                async move {
                    let header = |name: &str| {
                        headers
                            .get(name)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                            .to_string()
                    };
                    let (status, delay) = {
                        let mut script = script.lock().unwrap();
                        let status = if script.statuses.is_empty() {
                            200
                        } else {
                            script.statuses.remove(0)
                        };
                        (status, script.delay)
                    };
                    let status = if status == 200 && body.contains("\"refuse\"") {
                        400
                    } else {
                        status
                    };
                    // Recorded on arrival: a request whose sender dies
                    // during the delay was still received (and processed).
                    received.lock().unwrap().push(Received {
                        id: header("webhook-id"),
                        timestamp: header("webhook-timestamp"),
                        signature: header("webhook-signature"),
                        body,
                        at: started.elapsed(),
                        status,
                    });
                    tokio::time::sleep(delay).await;
                    let mut response: Response = match status {
                        400 => (StatusCode::BAD_REQUEST, "device `refuse` is not accepted")
                            .into_response(),
                        other => StatusCode::from_u16(other).unwrap().into_response(),
                    };
                    if status == 429 {
                        response
                            .headers_mut()
                            .insert("retry-after", "1".parse().unwrap());
                    }
                    response
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    Receiver { url, received }
}

impl Receiver {
    pub fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    /// The accepted batches, de-duplicated on `webhook-id` as a receiver
    /// would: id -> the event ids of its rows. Fails if one id ever came
    /// with two different bodies.
    pub fn accepted(&self) -> BTreeMap<String, Vec<i64>> {
        let mut bodies: BTreeMap<String, String> = BTreeMap::new();
        let mut batches = BTreeMap::new();
        for request in self.received() {
            if let Some(body) = bodies.get(&request.id) {
                assert_eq!(
                    body, &request.body,
                    "batch {} came with two bodies",
                    request.id
                );
            }
            bodies.insert(request.id.clone(), request.body.clone());
            if request.status == 200 {
                batches.insert(request.id.clone(), event_ids(&request.body));
            }
        }
        batches
    }
}

/// The `id` field of each row of a JSON object or array body.
pub fn event_ids(body: &str) -> Vec<i64> {
    let value: serde_json::Value = serde_json::from_str(body).unwrap();
    let rows = match value {
        serde_json::Value::Array(rows) => rows,
        row => vec![row],
    };
    rows.iter().map(|row| row["id"].as_i64().unwrap()).collect()
}
