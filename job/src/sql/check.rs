//! `CHECK` constraints of source tables: which change rows are bad input.
//!
//! `CONSTRAINT name CHECK (expr)` on a `postgres-cdc` table is planned as one
//! DataFusion query over each change batch: `SELECT _lsn, _seq,
//! coalesce((expr), true), ... FROM table`. As in SQL, a check passes when its
//! expression is true or NULL. Expressions may use any function and
//! subqueries over other CDC tables (`content_id IN (SELECT id FROM content)`),
//! which then become in-memory dimensions. Results are matched back to input
//! rows by position, so the query is free to reorder rows.

use std::collections::HashMap;

use arrow::array::{Array, BooleanArray, Int64Array};
use arrow::record_batch::RecordBatch;
use datafusion::logical_expr::LogicalPlan;
use datafusion::prelude::SessionContext;

use super::plan::{collect_tables, JobPlan, SourceTable};
use super::SqlError;
use crate::change::{LSN_COLUMN, SEQ_COLUMN};

/// The checks of one source table, planned.
#[derive(Debug)]
pub struct CheckPlan {
    /// Constraint names, in declaration order (the reason codes).
    pub names: Vec<String>,
    /// Checks over the row alone: one boolean column per check (after `_lsn`,
    /// `_seq`), with the checks' indexes.
    pub projection: Option<(LogicalPlan, Vec<usize>)>,
    /// Checks that read other tables: the rows failing each.
    pub filters: Vec<(usize, LogicalPlan)>,
    /// CDC tables the checks read besides their own table.
    pub dimensions: Vec<usize>,
}

/// Plans the checks of every source (None for sources without checks).
pub async fn plan_checks(
    ctx: &SessionContext,
    sources: &mut [SourceTable],
) -> Result<Vec<Option<CheckPlan>>, SqlError> {
    let mut plans = Vec::new();
    for index in 0..sources.len() {
        let def = &sources[index].def;
        if def.checks.is_empty() {
            plans.push(None);
            continue;
        }
        let context = format!("CHECK constraints of `{}` ({})", def.name, def.location);
        let error = |e: datafusion::error::DataFusionError| SqlError::Plan {
            context: context.clone(),
            message: e.to_string(),
        };
        let table = def.name.clone();
        let checks = def.checks.clone();
        let mut simple = Vec::new();
        let mut filters = Vec::new();
        let mut dimensions = Vec::new();
        for (i, check) in checks.iter().enumerate() {
            let probe = ctx
                .sql(&format!("SELECT ({}) FROM \"{table}\"", check.expression))
                .await
                .map_err(error)?
                .logical_plan()
                .clone();
            if probe.schema().field(0).data_type() != &arrow::datatypes::DataType::Boolean {
                return Err(SqlError::Plan {
                    context: context.clone(),
                    message: format!("CHECK `{}` is not a boolean expression", check.name),
                });
            }
            let mut tables = Vec::new();
            collect_tables(&probe, &mut tables);
            let others: Vec<&String> = tables.iter().filter(|t| **t != table).collect();
            if others.is_empty() {
                simple.push(i);
                continue;
            }
            for other in others {
                let Some(d) = sources.iter().position(|s| &s.def.name == other) else {
                    return Err(SqlError::Plan {
                        context: context.clone(),
                        message: format!(
                            "a CHECK can only read postgres-cdc tables; `{other}` is not one"
                        ),
                    });
                };
                if !dimensions.contains(&d) {
                    dimensions.push(d);
                }
            }
            let sql = format!(
                "SELECT \"{LSN_COLUMN}\", \"{SEQ_COLUMN}\" FROM \"{table}\" WHERE NOT ({})",
                check.expression
            );
            let plan = ctx.sql(&sql).await.map_err(error)?.logical_plan().clone();
            filters.push((i, ctx.state().optimize(&plan).map_err(error)?));
        }
        let projection = if simple.is_empty() {
            None
        } else {
            let columns: Vec<String> = simple
                .iter()
                .map(|&i| {
                    format!(
                        "coalesce(({}), true) AS \"_check{i}\"",
                        checks[i].expression
                    )
                })
                .collect();
            let sql = format!(
                "SELECT \"{LSN_COLUMN}\", \"{SEQ_COLUMN}\", {} FROM \"{table}\"",
                columns.join(", ")
            );
            let plan = ctx.sql(&sql).await.map_err(error)?.logical_plan().clone();
            Some((ctx.state().optimize(&plan).map_err(error)?, simple))
        };
        let names = checks.iter().map(|c| c.name.clone()).collect();
        for &d in &dimensions {
            sources[d].is_dimension = true;
        }
        plans.push(Some(CheckPlan {
            names,
            projection,
            filters,
            dimensions,
        }));
    }
    Ok(plans)
}

impl JobPlan {
    /// For each row of `batch` (changes of `source`), the index of the first
    /// check it fails; `None` when the source has no checks or all pass.
    pub async fn failing_checks(
        &self,
        source: usize,
        batch: &RecordBatch,
        dimensions: &[(usize, RecordBatch)],
    ) -> datafusion::error::Result<Option<Vec<Option<usize>>>> {
        let Some(check) = &self.checks[source] else {
            return Ok(None);
        };
        let table = &self.sources[source].provider;
        // (lsn, seq) -> the first check (in declaration order) the row fails.
        let mut failed: HashMap<(i64, i64), usize> = HashMap::new();
        let mut note = |result: &RecordBatch, check_of: &dyn Fn(usize) -> Option<usize>| {
            let lsn = result
                .column(0)
                .as_any()
                .downcast_ref::<Int64Array>()
                .expect("_lsn");
            let seq = result
                .column(1)
                .as_any()
                .downcast_ref::<Int64Array>()
                .expect("_seq");
            for row in 0..result.num_rows() {
                if let Some(check) = check_of(row) {
                    let slot = failed
                        .entry((lsn.value(row), seq.value(row)))
                        .or_insert(check);
                    *slot = (*slot).min(check);
                }
            }
        };
        if let Some((plan, indexes)) = &check.projection {
            for result in &self.run(plan, table, batch.clone(), dimensions).await? {
                let columns: Vec<&BooleanArray> = result.columns()[2..]
                    .iter()
                    .map(|c| {
                        c.as_any()
                            .downcast_ref::<BooleanArray>()
                            .expect("boolean check")
                    })
                    .collect();
                if columns.iter().all(|c| c.false_count() == 0) {
                    continue;
                }
                note(result, &|row| {
                    columns
                        .iter()
                        .position(|c| c.is_valid(row) && !c.value(row))
                        .map(|p| indexes[p])
                });
            }
        }
        for (index, plan) in &check.filters {
            for result in &self.run(plan, table, batch.clone(), dimensions).await? {
                note(result, &|_| Some(*index));
            }
        }
        if failed.is_empty() {
            return Ok(None);
        }
        let lsn = batch
            .column_by_name(LSN_COLUMN)
            .and_then(|c| c.as_any().downcast_ref::<Int64Array>().cloned());
        let seq = batch
            .column_by_name(SEQ_COLUMN)
            .and_then(|c| c.as_any().downcast_ref::<Int64Array>().cloned());
        let (Some(lsn), Some(seq)) = (lsn, seq) else {
            return Ok(None);
        };
        Ok(Some(
            (0..batch.num_rows())
                .map(|row| failed.get(&(lsn.value(row), seq.value(row))).copied())
                .collect(),
        ))
    }
}
