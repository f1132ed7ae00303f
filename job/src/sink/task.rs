//! A sink on a task of its own.
//!
//! The engine hands a [`SinkTask`] its writes through a bounded channel and
//! goes on with the next batch, so a sink's encoding (Parquet) and its round
//! trips (Redis) overlap the engine's work and each other's instead of adding
//! up. The channel holds at most [`QUEUE`] writes: a slow sink slows the
//! engine down rather than let batches pile up in memory.
//!
//! Checkpoint barriers travel the same channel, in stream order: `prepare` is
//! answered only after every write sent before it has been applied (aligned
//! barriers, as in Flink and Arroyo), so the [`SinkState`] it returns covers
//! exactly the input up to the barrier.
//!
//! A failed write ends the task. The engine learns of it at its next call on
//! the sink (a write, a prepare or a commit), which returns the sink's own
//! error, and the run restarts from the last checkpoint as it did when the
//! write failed in line. Dropping a `SinkTask` aborts its task: a run that
//! ended leaves nothing writing behind it.
//!
//! Except when the store is unreachable and the sink can be caught up from
//! the captured changes (see [`Sink::detach_after`]): after [`DETACH_AFTER`]
//! of failed retries the task *detaches* the sink instead of failing. It
//! drops what it is sent from then on, answers each barrier with the state
//! the sink really holds, marked `detached`, and after each checkpoint asks
//! the store whether it answers again ([`SinkTask::reachable_again`]); then
//! the engine restarts the run to catch the sink up (see `sink/mod.rs`).
//!
//! The task also measures **commit → visible** latency: a write carries the
//! commit times of the changes it covers ([`CommitTimes`]); the task keeps
//! them until the sink reports the write's position visible to its readers
//! ([`Sink::visible`]: at once for Redis, at the transaction's commit for
//! Kafka, at the checkpoint's commit for Parquet), then observes, per change,
//! the seconds since its commit in the sink's histogram.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arrow::record_batch::RecordBatch;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::{Sink, SinkError, SinkState};
use crate::change::Position;
use crate::engine::histogram::RunHistogram;
use crate::engine::latency::{unix_ms, CommitTimes, RecentLatencies};

/// Writes (or barriers) a sink's channel holds before the engine waits.
pub const QUEUE: usize = 4;

/// How long a sink's task waits for a command before it tells the sink it
/// is idle ([`Sink::idle`]).
pub const IDLE_TICK: Duration = Duration::from_millis(50);

/// How long a detachable sink retries an unreachable store before it is
/// detached: a blip (a failover, a restart) rides through, an outage does not
/// stall the other sinks for longer.
pub const DETACH_AFTER: Duration = Duration::from_secs(1);

enum Command {
    Write {
        batches: Vec<RecordBatch>,
        upto: Position,
        commits: Option<Arc<CommitTimes>>,
    },
    WriteWindow {
        batches: Vec<RecordBatch>,
        end: i64,
        upto: Position,
        commits: Option<Arc<CommitTimes>>,
    },
    Prepare {
        epoch: u64,
        reply: oneshot::Sender<Result<SinkState, SinkError>>,
    },
    Commit {
        state: SinkState,
        reply: oneshot::Sender<Result<(), SinkError>>,
    },
}

/// The engine's handle on a sink running on its own task.
pub struct SinkTask {
    name: String,
    is_redis: bool,
    lost: bool,
    /// Where the sink will be once it has applied every write sent so far.
    position: Position,
    commands: mpsc::Sender<Command>,
    task: Option<JoinHandle<Result<(), SinkError>>>,
    /// Set by the task once a detached sink's store answers again.
    reachable_again: Arc<AtomicBool>,
    /// Set by the task when it detaches the sink.
    detached: Arc<AtomicBool>,
}

/// The store of a sink that could not be opened, and how to ask whether it
/// answers again.
pub enum Store {
    /// A Redis at this address.
    Redis(String),
    /// Kafka brokers, with the sink's `kafka.*` settings, and its topic.
    Kafka {
        bootstrap: String,
        settings: std::collections::BTreeMap<String, String>,
        topic: String,
    },
}

impl Store {
    /// Whether the store answers within about a second.
    async fn answers(&self) -> bool {
        match self {
            Store::Redis(address) => super::redis::RedisSink::reachable_at(address).await,
            Store::Kafka {
                bootstrap,
                settings,
                topic,
            } => {
                let (bootstrap, settings, topic) =
                    (bootstrap.clone(), settings.clone(), topic.clone());
                tokio::task::spawn_blocking(move || {
                    super::kafka::topic::answers(&bootstrap, &settings, &topic)
                })
                .await
                .unwrap_or(false)
            }
        }
    }
}

impl SinkTask {
    /// A sink whose store (Redis, Kafka) could not be reached when the run
    /// started, detached from the start at the position the checkpoint
    /// `restored` recorded: it drops what it is sent, and asks `store` after
    /// each checkpoint whether it answers again (then the run restarts and
    /// opens it for real, catching it up).
    pub fn unreachable(name: &str, store: Store, restored: &SinkState) -> SinkTask {
        let is_redis = matches!(store, Store::Redis(_));
        let (commands, mut receiver) = mpsc::channel(QUEUE);
        let reachable_again = Arc::new(AtomicBool::new(false));
        let state = SinkState {
            detached: true,
            ..restored.clone()
        };
        let flag = reachable_again.clone();
        let held = state.clone();
        let task = tokio::spawn(async move {
            while let Some(command) = receiver.recv().await {
                match command {
                    Command::Write { .. } | Command::WriteWindow { .. } => {}
                    Command::Prepare { reply, .. } => {
                        let _ = reply.send(Ok(held.clone()));
                    }
                    Command::Commit { reply, .. } => {
                        let _ = reply.send(Ok(()));
                        // After the checkpoint, as for a detached sink (`run`).
                        if store.answers().await {
                            flag.store(true, Ordering::Relaxed);
                        }
                    }
                }
            }
            Ok(())
        });
        SinkTask {
            name: name.to_string(),
            is_redis,
            lost: false,
            position: state.position,
            commands,
            task: Some(task),
            reachable_again,
            detached: Arc::new(AtomicBool::new(true)),
        }
    }

    /// Moves `sink` onto a task of its own. With `visibility`, the task
    /// observes there the commit → visible seconds of the changes written
    /// (the histogram, and the newest ones for quantiles).
    pub fn spawn(
        mut sink: Sink,
        visibility: Option<(RunHistogram, Arc<RecentLatencies>)>,
    ) -> SinkTask {
        let (commands, receiver) = mpsc::channel(QUEUE);
        let detachable = sink.detach_after(DETACH_AFTER);
        let reachable_again = Arc::new(AtomicBool::new(false));
        let detached = Arc::new(AtomicBool::new(false));
        SinkTask {
            name: sink.name().to_string(),
            is_redis: sink.is_redis(),
            lost: sink.lost(),
            position: sink.position(),
            commands,
            reachable_again: reachable_again.clone(),
            detached: detached.clone(),
            task: Some(tokio::spawn(run(
                sink,
                detachable,
                Flags {
                    detached,
                    reachable_again,
                },
                visibility.map(Visibility::new),
                receiver,
            ))),
        }
    }

    /// Whether the task has detached the sink (its store is unreachable):
    /// what it is sent now is dropped.
    pub fn detached(&self) -> bool {
        self.detached.load(Ordering::Relaxed)
    }

    /// Whether the sink was detached and its store answers again (asked at
    /// each checkpoint): time to restart the run and catch it up.
    pub fn reachable_again(&self) -> bool {
        self.reachable_again.load(Ordering::Relaxed)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// See [`Sink::is_redis`].
    pub fn is_redis(&self) -> bool {
        self.is_redis
    }

    /// See [`Sink::lost`] (as found when the sink opened).
    pub fn lost(&self) -> bool {
        self.lost
    }

    /// Commands waiting in the channel, not yet taken up by the task (the
    /// one it is applying is not counted): 0 when the sink has caught up
    /// with what it was sent, or nearly.
    pub fn queued(&self) -> usize {
        QUEUE - self.commands.capacity()
    }

    /// Input at or below this position is in the sink, or on its way there.
    pub fn position(&self) -> Position {
        self.position
    }

    /// Sends [`Sink::write`]; refused, as there, when `upto` is not above
    /// [`SinkTask::position`]. `commits`: the commit times of the changes
    /// the write covers, for the commit → visible histogram.
    pub async fn write(
        &mut self,
        batches: Vec<RecordBatch>,
        upto: Position,
        commits: Option<Arc<CommitTimes>>,
    ) -> Result<(), SinkError> {
        super::forward_only(&self.name, self.position, upto)?;
        self.send(Command::Write {
            batches,
            upto,
            commits,
        })
        .await?;
        self.position = upto;
        Ok(())
    }

    /// Sends [`Sink::write_window`]. `commits`: the commit times of the
    /// changes the window is the first to reflect, for commit → visible.
    pub async fn write_window(
        &mut self,
        batches: Vec<RecordBatch>,
        window_end_micros: i64,
        upto: Position,
        commits: Option<Arc<CommitTimes>>,
    ) -> Result<(), SinkError> {
        self.send(Command::WriteWindow {
            batches,
            end: window_end_micros,
            upto,
            commits,
        })
        .await?;
        self.position = self.position.max(upto);
        Ok(())
    }

    /// The checkpoint barrier: waits until every write sent before it is
    /// applied, then returns what [`Sink::prepare_checkpoint`] returns.
    pub async fn prepare_checkpoint(&mut self, epoch: u64) -> Result<SinkState, SinkError> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Prepare { epoch, reply }).await?;
        match answer.await {
            Ok(result) => result,
            Err(_) => Err(self.failure().await),
        }
    }

    /// [`Sink::commit`], once the manifest holding `state` is durable.
    pub async fn commit(&mut self, state: &SinkState) -> Result<(), SinkError> {
        let (reply, answer) = oneshot::channel();
        let state = state.clone();
        self.send(Command::Commit { state, reply }).await?;
        match answer.await {
            Ok(result) => result,
            Err(_) => Err(self.failure().await),
        }
    }

    async fn send(&mut self, command: Command) -> Result<(), SinkError> {
        match self.commands.send(command).await {
            Ok(()) => Ok(()),
            Err(_) => Err(self.failure().await),
        }
    }

    /// Why the task stopped taking commands.
    async fn failure(&mut self) -> SinkError {
        let ended = |message: String| SinkError::Permanent {
            sink: self.name.clone(),
            message,
        };
        match self.task.take() {
            Some(task) => match task.await {
                Ok(Err(error)) => error,
                Ok(Ok(())) => ended("the sink's task ended".into()),
                Err(error) => ended(format!("the sink's task failed: {error}")),
            },
            None => ended("the sink failed earlier in this run".into()),
        }
    }
}

impl SinkTask {
    /// Stops the task and waits until it has: a write in flight when a run
    /// ends finishes or is abandoned before the next run reopens the sink.
    pub async fn close(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }
}

impl Drop for SinkTask {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// What the task tells its handle without being asked.
struct Flags {
    detached: Arc<AtomicBool>,
    reachable_again: Arc<AtomicBool>,
}

/// Commit times of written changes not yet visible, and where their
/// latency goes once they are.
struct Visibility {
    histogram: RunHistogram,
    recent: Arc<RecentLatencies>,
    /// (position a write covered, its changes' commit times), in order.
    pending: VecDeque<(Position, Arc<CommitTimes>)>,
}

impl Visibility {
    fn new((histogram, recent): (RunHistogram, Arc<RecentLatencies>)) -> Visibility {
        Visibility {
            histogram,
            recent,
            pending: VecDeque::new(),
        }
    }

    /// Observes every pending write at or below `visible`.
    fn observe_upto(&mut self, visible: Position) {
        if self.pending.front().is_none_or(|(upto, _)| *upto > visible) {
            return;
        }
        let now = unix_ms();
        while let Some((upto, commits)) = self.pending.front() {
            if *upto > visible {
                break;
            }
            commits.observe(&self.histogram, &self.recent, now);
            self.pending.pop_front();
        }
    }
}

/// Applies commands in order until the engine drops its handle or a write
/// fails; a `detachable` sink whose store is unreachable is detached instead.
async fn run(
    mut sink: Sink,
    detachable: bool,
    flags: Flags,
    mut visibility: Option<Visibility>,
    mut commands: mpsc::Receiver<Command>,
) -> Result<(), SinkError> {
    let mut detached = false;
    // Only a sink that holds messages back between writes pays for a timer
    // on every command.
    let wants_idle = sink.wants_idle();
    loop {
        let next = if wants_idle {
            tokio::time::timeout(IDLE_TICK, commands.recv()).await
        } else {
            Ok(commands.recv().await)
        };
        let command = match next {
            Ok(Some(command)) => command,
            Ok(None) => break,
            Err(_) => {
                // Nothing to do for a while: let the sink finish what it
                // holds back (a Kafka sink commits its open transaction).
                if !detached {
                    let idled = sink.idle().await;
                    settle(
                        idled,
                        &sink,
                        detachable,
                        &flags,
                        &mut detached,
                        &mut visibility,
                    )?;
                }
                continue;
            }
        };
        let written = match command {
            Command::Write { .. } | Command::WriteWindow { .. } if detached => Ok(()),
            Command::Write {
                batches,
                upto,
                commits,
            } => {
                let written = sink.write(batches, upto).await;
                if written.is_ok() {
                    crate::failpoint::hit("after_sink_write");
                    if let (Some(visibility), Some(commits)) = (&mut visibility, commits) {
                        visibility.pending.push_back((upto, commits));
                    }
                }
                written
            }
            Command::WriteWindow {
                batches,
                end,
                upto,
                commits,
            } => {
                let written = sink.write_window(batches, end, upto).await;
                if written.is_ok() {
                    if let (Some(visibility), Some(commits)) = (&mut visibility, commits) {
                        visibility.pending.push_back((upto, commits));
                    }
                }
                written
            }
            Command::Prepare { epoch, reply } => {
                let result = if detached {
                    Ok(sink.held_state())
                } else {
                    match sink.prepare_checkpoint(epoch).await {
                        // A Kafka broker that does not acknowledge: detach
                        // rather than hold the checkpoint up.
                        Err(error) if detachable && error.is_transient() => {
                            detach(&sink, &error, &flags);
                            detached = true;
                            Ok(sink.held_state())
                        }
                        other => other,
                    }
                };
                let result = result.map(|mut state| {
                    state.detached = detached;
                    state
                });
                let failed = result.is_err();
                let _ = reply.send(result);
                if failed {
                    break;
                }
                Ok(())
            }
            Command::Commit { state, reply } => {
                let result = sink.commit(&state).await;
                let failed = result.is_err();
                let _ = reply.send(result);
                if failed {
                    break;
                }
                // Asked once the checkpoint is done, so a store that does not
                // answer never holds a checkpoint up; the engine sees the
                // answer after the next one.
                if detached && sink.reachable().await {
                    flags.reachable_again.store(true, Ordering::Relaxed);
                }
                Ok(())
            }
        };
        settle(
            written,
            &sink,
            detachable,
            &flags,
            &mut detached,
            &mut visibility,
        )?;
    }
    Ok(())
}

/// What follows a write or an idle step: on success what the sink made
/// visible is observed; a detachable sink whose store is unreachable is
/// detached; any other failure ends the task.
fn settle(
    result: Result<(), SinkError>,
    sink: &Sink,
    detachable: bool,
    flags: &Flags,
    detached: &mut bool,
    visibility: &mut Option<Visibility>,
) -> Result<(), SinkError> {
    match result {
        Ok(()) => {
            if let Some(visibility) = visibility {
                visibility.observe_upto(sink.visible());
            }
            Ok(())
        }
        Err(error) if detachable && error.is_transient() => {
            detach(sink, &error, flags);
            *detached = true;
            Ok(())
        }
        Err(error) => Err(error),
    }
}

/// Reports and flags a sink detached because its store is unreachable.
fn detach(sink: &Sink, error: &SinkError, flags: &Flags) {
    tracing::warn!(
        sink = %sink.name(),
        holds = %sink.held_state().position,
        error = %error,
        "sink detached: its store is unreachable; the other sinks go on, and once it answers again \
         the job restarts and catches this sink up from its checkpoints"
    );
    flags.detached.store(true, Ordering::Relaxed);
}
