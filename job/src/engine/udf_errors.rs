//! Rows a UDF panics on (see [`crate::udf`] for the whole story).
//!
//! When a step (a view, a query, a window's pre-plan) fails because a UDF
//! panicked, [`Engine::udf_failure`] re-runs that step alone over halves of
//! its input until it holds the single rows that panic, records their
//! positions in the [`Poisoned`] set the runs of this process share, and
//! returns a restartable error: the run starts again from the newest
//! checkpoint, so nothing of the failed batch stays half-applied. From then
//! on, every step that calls that UDF leaves those rows out
//! ([`Engine::unpoisoned`]), and the rows are written to `dead_letter` once,
//! with reason `udf_error:<name>` ([`Engine::dead_letter_poisoned`]).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use arrow::array::{Array, BooleanArray, Int64Array};
use arrow::compute::filter_record_batch;
use arrow::record_batch::RecordBatch;
use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::logical_expr::{Expr, LogicalPlan};

use super::{dead_letter, Engine, JobError};
use crate::change::{LSN_COLUMN, SEQ_COLUMN};
use crate::udf::functions::PluginFunction;
use crate::udf::UdfPanicked;

/// Source positions (`_lsn`, `_seq`) of rows a UDF panicked on, and the
/// UDFs that did.
#[derive(Debug, Default)]
pub struct Poisoned {
    rows: BTreeMap<(i64, i64), BTreeSet<String>>,
}

/// Shared by the runs of one job in this process.
pub type SharedPoisoned = Arc<Mutex<Poisoned>>;

/// A step of the engine that runs a plan over change rows.
#[derive(Debug, Clone, Copy)]
pub(super) enum Step {
    View(usize),
    Query(usize),
    /// Query, window.
    Pre(usize, usize),
}

/// The plugin UDFs `plan` calls (subqueries included).
pub fn plan_udfs(plan: &LogicalPlan) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let _ = plan.apply_with_subqueries(|node| {
        node.apply_expressions(|expr| {
            expr.apply(|e| {
                if let Expr::ScalarFunction(call) = e {
                    let inner: &dyn std::any::Any = call.func.inner().as_ref();
                    if inner.downcast_ref::<PluginFunction>().is_some() {
                        names.insert(call.func.name().to_string());
                    }
                }
                Ok(TreeNodeRecursion::Continue)
            })
        })
    });
    names
}

fn positions(batch: &RecordBatch) -> Option<(&Int64Array, &Int64Array)> {
    let column = |name| {
        batch
            .column_by_name(name)
            .and_then(|c| c.as_any().downcast_ref::<Int64Array>())
    };
    Some((column(LSN_COLUMN)?, column(SEQ_COLUMN)?))
}

impl Engine {
    fn step_plan(&self, step: Step) -> &LogicalPlan {
        match step {
            Step::View(v) => &self.plan.views[v].plan,
            Step::Query(q) => &self.plan.queries[q].plan,
            Step::Pre(q, w) => &self.plan.queries[q].windows[w].pre_plan,
        }
    }

    async fn run_step(
        &self,
        step: Step,
        input: RecordBatch,
        dimensions: &[(usize, RecordBatch)],
    ) -> datafusion::error::Result<()> {
        match step {
            Step::View(v) => self.plan.execute_view(v, input, dimensions).await.map(drop),
            Step::Query(q) => self.plan.execute(q, input, dimensions).await.map(drop),
            Step::Pre(q, w) => self
                .plan
                .execute_pre(q, w, input, dimensions)
                .await
                .map(drop),
        }
    }

    /// `input` without the rows a UDF that `step` calls panicked on.
    pub(super) fn unpoisoned(
        &self,
        step: Step,
        input: RecordBatch,
    ) -> Result<RecordBatch, JobError> {
        let poisoned = self.poisoned.lock().expect("poisoned rows lock");
        if poisoned.rows.is_empty() || input.num_rows() == 0 {
            return Ok(input);
        }
        let called = plan_udfs(self.step_plan(step));
        let Some((lsn, seq)) = positions(&input) else {
            return Ok(input);
        };
        let keep: BooleanArray = (0..input.num_rows())
            .map(|row| {
                let hit = poisoned
                    .rows
                    .get(&(lsn.value(row), seq.value(row)))
                    .is_some_and(|udfs| !udfs.is_disjoint(&called));
                Some(!hit)
            })
            .collect();
        if keep.true_count() == input.num_rows() {
            return Ok(input);
        }
        filter_record_batch(&input, &keep).map_err(JobError::Arrow)
    }

    /// Writes the rows of a source batch a UDF panicked on to `dead_letter`
    /// (once: the sink skips what it holds), reason `udf_error:<name>`.
    pub(super) async fn dead_letter_poisoned(
        &mut self,
        source: usize,
        batch: &RecordBatch,
    ) -> Result<(), JobError> {
        let (bad, reasons) = {
            let poisoned = self.poisoned.lock().expect("poisoned rows lock");
            if poisoned.rows.is_empty() {
                return Ok(());
            }
            let Some((lsn, seq)) = positions(batch) else {
                return Ok(());
            };
            let mut reasons = Vec::new();
            let mask: BooleanArray = (0..batch.num_rows())
                .map(|row| {
                    let udfs = poisoned.rows.get(&(lsn.value(row), seq.value(row)));
                    if let Some(udfs) = udfs {
                        let names: Vec<&str> = udfs.iter().map(String::as_str).collect();
                        reasons.push(format!("udf_error:{}", names.join(",")));
                    }
                    Some(udfs.is_some())
                })
                .collect();
            if reasons.is_empty() {
                return Ok(());
            }
            (
                filter_record_batch(batch, &mask).map_err(JobError::Arrow)?,
                reasons,
            )
        };
        // (udf_failure refused to go on without a dead-letter output.)
        let table = self.plan.sources[source].def.name.clone();
        let reasons: Vec<&str> = reasons.iter().map(String::as_str).collect();
        self.write_dead_letters(&table, &reasons, &bad).await
    }

    /// `result` of running `step` over `input`: a UDF panic becomes
    /// [`Engine::udf_failure`]'s error, any other error `other`'s.
    pub(super) async fn checked<T>(
        &self,
        step: Step,
        input: &RecordBatch,
        dimensions: &[(usize, RecordBatch)],
        result: datafusion::error::Result<T>,
        other: impl FnOnce(datafusion::error::DataFusionError) -> JobError,
    ) -> Result<T, JobError> {
        match result {
            Ok(value) => Ok(value),
            Err(e) if UdfPanicked::find(&e).is_some() => {
                Err(self.udf_failure(step, input, dimensions, e).await)
            }
            Err(e) => Err(other(e)),
        }
    }

    /// After `step` failed over `input` because a UDF panicked: finds the
    /// rows it panics on, records them, and returns the error that restarts
    /// the run (or, if that cannot help, the error that stops the job).
    pub(super) async fn udf_failure(
        &self,
        step: Step,
        input: &RecordBatch,
        dimensions: &[(usize, RecordBatch)],
        error: datafusion::error::DataFusionError,
    ) -> JobError {
        let udf = UdfPanicked::find(&error)
            .map(|p| p.udf.clone())
            .unwrap_or_default();
        let stop = |message: String| JobError::Query {
            sink: format!("{step:?}"),
            message,
        };
        if self.dead_letter_sink.is_none() {
            return stop(format!(
                "UDF `{udf}` panicked; declare a filesystem table `{}` to divert the rows it panics on",
                dead_letter::DEAD_LETTER_TABLE
            ));
        }
        if positions(input).is_none() {
            return stop(format!(
                "UDF `{udf}` panicked on rows without `_lsn`/`_seq`: select them in the view that calls it, \
                 so the rows can be found and dead-lettered"
            ));
        }
        let mut found = Vec::new();
        let mut pending = vec![input.clone()];
        while let Some(part) = pending.pop() {
            match self.run_step(step, part.clone(), dimensions).await {
                Ok(()) => {}
                Err(e) if UdfPanicked::find(&e).is_some() => {
                    if part.num_rows() == 1 {
                        let (lsn, seq) = positions(&part).expect("checked above");
                        found.push((lsn.value(0), seq.value(0)));
                    } else {
                        let half = part.num_rows() / 2;
                        pending.push(part.slice(half, part.num_rows() - half));
                        pending.push(part.slice(0, half));
                    }
                }
                Err(e) => return stop(e.to_string()),
            }
        }
        let mut poisoned = self.poisoned.lock().expect("poisoned rows lock");
        let new: Vec<_> = found
            .iter()
            .filter(|p| !poisoned.rows.get(p).is_some_and(|udfs| udfs.contains(&udf)))
            .copied()
            .collect();
        if new.is_empty() {
            return stop(format!(
                "UDF `{udf}` panicked, but on no single row of the batch: it depends on more than one row"
            ));
        }
        for position in &new {
            poisoned
                .rows
                .entry(*position)
                .or_default()
                .insert(udf.clone());
        }
        tracing::warn!(
            udf,
            rows = new.len(),
            step = ?step,
            "a UDF panicked: its rows go to dead_letter; restarting from the newest checkpoint"
        );
        JobError::UdfPanicked {
            udf,
            rows: new.len(),
        }
    }
}
