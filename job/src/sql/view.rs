//! Shared views: a view computed once per change batch, read by many queries.
//!
//! The mission's `enriched` view (events joined with `content`, derived
//! columns) feeds ten queries. Inlined into each, the join would run ten
//! times per batch. A view that is stateless, driven by one CDC table and
//! exposes the change metadata (`_op`, `_lsn`, `_seq`) is instead
//! *materialised*: its plan runs once per batch of its driving table, and the
//! queries read the result from a [`BatchTable`] registered under the view's
//! name. Because the metadata columns pass through, each query can still drop
//! rows its sink already holds and split inserts from retractions.
//!
//! Other views (windowed, or without the metadata) stay plain DataFusion
//! views and are inlined into the queries that read them.

use std::sync::Arc;

use arrow::datatypes::{Schema, SchemaRef};
use datafusion::logical_expr::LogicalPlan;
use datafusion::prelude::SessionContext;

use super::plan::{
    collect_tables, leftmost_table, refuse_unwindowed_state, BatchTable, SourceTable,
};
use super::window::inline_views;
use crate::change::{LSN_COLUMN, OP_COLUMN, SEQ_COLUMN};

/// A view computed once per change batch of its driving table.
#[derive(Debug)]
pub struct MaterializedView {
    pub name: String,
    /// Index of the driving CDC source.
    pub driving: usize,
    pub dimensions: Vec<usize>,
    /// Optimised plan over the driving source and dimensions.
    pub plan: LogicalPlan,
    /// The view's columns, all nullable.
    pub schema: SchemaRef,
    /// Holds the view's rows for the current batch.
    pub table: Arc<BatchTable>,
}

/// Materialises view `name` if it qualifies (see the module docs); on success
/// the view is re-registered in `ctx` as its [`BatchTable`].
pub async fn materialize(
    ctx: &SessionContext,
    name: &str,
    sources: &[SourceTable],
) -> datafusion::error::Result<Option<MaterializedView>> {
    let provider = ctx.table_provider(name).await?;
    let Some(plan) = provider.get_logical_plan().map(|p| p.into_owned()) else {
        return Ok(None);
    };
    let plan = inline_views(plan)?;
    if refuse_unwindowed_state(&plan).is_err() {
        return Ok(None);
    }
    let fields = plan.schema().fields();
    let names: Vec<&str> = fields.iter().map(|f| f.name().as_str()).collect();
    let unique = names
        .iter()
        .enumerate()
        .all(|(i, n)| !names[..i].contains(n));
    if !unique
        || ![OP_COLUMN, LSN_COLUMN, SEQ_COLUMN]
            .iter()
            .all(|c| names.contains(c))
    {
        return Ok(None);
    }
    let Some(driving_name) = leftmost_table(&plan) else {
        return Ok(None);
    };
    let Some(driving) = sources.iter().position(|s| s.def.name == driving_name) else {
        return Ok(None);
    };
    let mut tables = Vec::new();
    collect_tables(&plan, &mut tables);
    let mut dimensions = Vec::new();
    for table in tables.iter().filter(|t| **t != driving_name) {
        match sources.iter().position(|s| &s.def.name == table) {
            Some(d) if !sources[d].primary_key.is_empty() => {
                if !dimensions.contains(&d) {
                    dimensions.push(d);
                }
            }
            _ => return Ok(None), // leave the explanation to the query planner
        }
    }
    if tables.iter().filter(|t| **t == driving_name).count() > 1 {
        return Ok(None);
    }
    let optimized = ctx.state().optimize(&plan)?;
    let schema: SchemaRef = Arc::new(Schema::new(
        optimized
            .schema()
            .fields()
            .iter()
            .map(|f| f.as_ref().clone().with_nullable(true))
            .collect::<Vec<_>>(),
    ));
    let table = Arc::new(BatchTable::new(schema.clone()));
    ctx.deregister_table(name)?;
    ctx.register_table(name, table.clone())?;
    Ok(Some(MaterializedView {
        name: name.to_string(),
        driving,
        dimensions,
        plan: optimized,
        schema,
        table,
    }))
}
