//! Opening a run's sinks: one task per query's sink, then the side outputs.
//!
//! A Redis or Kafka sink whose store does not answer when a job that has
//! checkpoints starts is opened *detached* (sink/task.rs): the other sinks go
//! on, and the run restarts to catch it up once the store answers. The other
//! Redis sinks at the same address then start detached without waiting for a
//! connection again.

use super::{dead_letter, late, side_output, Engine, JobError};
use crate::checkpoint::Manifest;
use crate::sink::task::{SinkTask, Store};
use crate::sink::Sink;
use crate::sql::JobSpec;

impl Engine {
    /// Opens every sink of the job as of checkpoint `latest` (none: a fresh job).
    pub(super) async fn open_sinks(
        &mut self,
        spec: &JobSpec,
        latest: Option<&Manifest>,
    ) -> Result<(), JobError> {
        // Redis addresses found unreachable while opening: the other sinks
        // there start detached without waiting for a connection again.
        let mut unreachable: Vec<String> = Vec::new();
        for (index, query) in self.plan.queries.iter().enumerate() {
            let sink_table = &self.plan.sinks[query.sink];
            let table = &sink_table.def;
            let restored = latest.and_then(|m| m.sinks.get(&table.name));
            if let (Some(options), Some(restored)) = (table.connector.redis(), restored) {
                if unreachable.iter().any(|a| a == options.address.expose()) {
                    tracing::warn!(sink = %table.name, position = %restored.position, "sink detached at start: redis is unreachable");
                    let store = Store::Redis(options.address.expose().to_string());
                    let sink = SinkTask::unreachable(&table.name, store, restored);
                    self.sinks.push(sink);
                    continue;
                }
            }
            let sink = match (
                Sink::open(
                    &spec.name,
                    sink_table,
                    query,
                    &self.plan.sources[query.driving].def,
                    side_output::declared(spec, dead_letter::DEAD_LETTER_TABLE),
                    restored,
                )
                .await,
                restored,
            ) {
                (Ok(sink), _) => {
                    tracing::info!(sink = %table.name, position = %sink.position(), "sink open");
                    let visibility = self
                        .stats
                        .commit_to_visible
                        .get(index)
                        .cloned()
                        .zip(self.stats.recent_visible.get(index).cloned());
                    SinkTask::spawn(sink, visibility)
                }
                // A job that ran before, restarting while Redis or the Kafka
                // brokers are down: the sink starts detached, and the others
                // do not wait for its store.
                (Err(error), Some(restored)) if error.is_transient() => {
                    if let crate::sql::SinkConnector::Kafka(options) = &sink_table.connector {
                        tracing::warn!(
                            sink = %table.name,
                            error = %error,
                            position = %restored.position,
                            "sink detached at start: the kafka brokers are unreachable; the other sinks go on, and \
                             once one answers the job restarts and catches this sink up from its checkpoints"
                        );
                        let store = Store::Kafka {
                            bootstrap: options.bootstrap_servers.clone(),
                            settings: options.client.0.clone(),
                            topic: options.topic.clone(),
                        };
                        self.sinks
                            .push(SinkTask::unreachable(&table.name, store, restored));
                        continue;
                    }
                    match table.connector.redis() {
                        Some(options) => {
                            tracing::warn!(
                                sink = %table.name,
                                error = %error,
                                position = %restored.position,
                                "sink detached at start: redis is unreachable; the other sinks go on, and once it \
                                 answers again the job restarts and catches this sink up from its checkpoints"
                            );
                            unreachable.push(options.address.expose().to_string());
                            let store = Store::Redis(options.address.expose().to_string());
                            SinkTask::unreachable(&table.name, store, restored)
                        }
                        _ => return Err(error.into()),
                    }
                }
                (Err(error), _) => return Err(error.into()),
            };
            debug_assert_eq!(self.sinks.len(), index);
            self.sinks.push(sink);
        }

        self.late_sink = late::open(
            spec,
            latest.and_then(|m| m.sinks.get(late::LATE_EVENTS_TABLE)),
        )
        .await?
        .map(|sink| SinkTask::spawn(sink, None));

        self.dead_letter_sink = dead_letter::open(
            spec,
            latest.and_then(|m| m.sinks.get(dead_letter::DEAD_LETTER_TABLE)),
        )
        .await?
        .map(|sink| SinkTask::spawn(sink, None));
        Ok(())
    }
}
