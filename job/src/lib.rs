//! engage: a streaming job that turns Postgres changes into real-time and
//! analytical outputs, defined in SQL and executed on Arrow batches with DataFusion.
//!
//! # A tour of the crate
//!
//! Data flows left to right:
//!
//! ```text
//!  Postgres WAL ──► source::replication ──► engine ──► sink::{parquet, redis, kafka}
//!   (pgoutput)      (decode into Arrow,     (job SQL    (exactly-once effects:
//!                    cut at commits)         per batch)  staged files, Lua + position)
//!                                 │             │
//!                                 └──► checkpoint ◄┘  (source position, dimension
//!                                                      state, sink commits, capture log)
//! ```
//!
//! - [`change`] is the vocabulary they all share: a change's [`change::Position`],
//!   its [`change::Op`], the `_op`/`_lsn`/`_seq`/`_commit_ts` columns.
//! - [`sql`] parses job SQL (Arroyo's dialect: `CREATE TABLE ... WITH (...)`,
//!   `CREATE VIEW`, `INSERT INTO ... SELECT`) into a validated [`sql::JobSpec`]
//!   and plans each `INSERT` with DataFusion.
//! - [`source`] reads Postgres logical replication ([`source::replication`]),
//!   decodes pgoutput into Arrow ([`source::pgoutput`]) and loads dimension
//!   tables consistently with the slot ([`source::snapshot`]).
//! - [`engine`] runs the job: it keeps dimension tables (such as `content`) in
//!   memory in commit order so joins are point-in-time correct, executes the
//!   planned queries on each micro-batch, and drives epochs and checkpoints.
//! - [`sink`] holds one file per sink and the delivery contract they share.
//! - [`checkpoint`] writes and reads checkpoint manifests atomically, and the
//!   capture log that `engage replay` reprocesses.
//! - [`tail`] prints a Kafka topic's committed messages (`engage tail`).
//! - [`embedded`] starts throwaway Postgres, Redis and Kafka (Tansu) servers (demo, tests, [`bench`],
//!   and [`chaos`], the fault suite that proves exactly-once effects);
//!   [`generate`] is the load generator; [`query`] runs DataFusion SQL over outputs.

pub mod backfill;
pub mod bench;
pub mod bigquery;
pub mod change;
pub mod chaos;
pub mod checkpoint;
pub mod demo;
pub mod embedded;
pub mod engine;
pub mod failpoint;
pub mod generate;
pub mod harness;
pub mod http;
pub mod query;
pub mod sink;
pub mod source;
pub mod sql;
pub mod storage;
pub mod tail;
pub mod udf;
pub mod values;
