//! Walking planned queries: which table drives a query, which tables it
//! reads, whether it keeps state across batches (refused without a
//! window), and putting a joining query's output back in position order.

use std::sync::Arc;

use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::common::{Column, TableReference};
use datafusion::datasource::source_as_provider;
use datafusion::error::Result as DfResult;
use datafusion::logical_expr::{Expr, LogicalPlan, LogicalPlanBuilder, Projection};

use crate::change::{LSN_COLUMN, SEQ_COLUMN};

/// The table a plan is driven by: its leftmost scan, looking through views.
pub(crate) fn leftmost_table(plan: &LogicalPlan) -> Option<String> {
    match plan {
        LogicalPlan::TableScan(scan) => {
            if let Ok(provider) = source_as_provider(&scan.source) {
                if let Some(view) = provider.get_logical_plan() {
                    return leftmost_table(&view);
                }
            }
            Some(scan.table_name.table().to_string())
        }
        other => other
            .inputs()
            .first()
            .and_then(|input| leftmost_table(input)),
    }
}

/// Every table a plan reads, looking through views and subqueries.
pub(crate) fn collect_tables(plan: &LogicalPlan, out: &mut Vec<String>) {
    let _ = plan.apply_with_subqueries(|node| {
        if let LogicalPlan::TableScan(scan) = node {
            match source_as_provider(&scan.source)
                .ok()
                .and_then(|p| p.get_logical_plan().map(|v| v.into_owned()))
            {
                Some(view) => collect_tables(&view, out),
                None => out.push(scan.table_name.table().to_string()),
            }
        }
        Ok(TreeNodeRecursion::Continue)
    });
}

/// Refuses operators whose result depends on more than one batch.
pub(crate) fn refuse_unwindowed_state(plan: &LogicalPlan) -> Result<(), String> {
    let mut found = None;
    let mut check = |node: &LogicalPlan| {
        let what = match node {
            LogicalPlan::Aggregate(_) => Some("GROUP BY / aggregate functions"),
            LogicalPlan::Window(_) => Some("window functions (OVER)"),
            LogicalPlan::Sort(_) => Some("ORDER BY"),
            LogicalPlan::Limit(_) => Some("LIMIT"),
            LogicalPlan::Distinct(_) => Some("DISTINCT"),
            _ => None,
        };
        if let Some(what) = what {
            found.get_or_insert(what);
            return Ok(TreeNodeRecursion::Stop);
        }
        Ok(TreeNodeRecursion::Continue)
    };
    let _ = plan.apply_with_subqueries(|node| {
        if let LogicalPlan::TableScan(scan) = node {
            if let Some(view) = source_as_provider(&scan.source)
                .ok()
                .and_then(|p| p.get_logical_plan().map(|v| v.into_owned()))
            {
                let _ = view.apply_with_subqueries(&mut check);
            }
        }
        check(node)
    });
    match found {
        None => Ok(()),
        Some(what) => Err(format!(
            "{what} over a stream needs a time window (tumble/hop), which this version does not run yet; \
             stateless queries (filters, projections, joins with CDC dimension tables) are supported"
        )),
    }
}

/// The qualifier of the driving (leftmost) table's columns: its alias if it
/// has one, else its name.
fn driving_qualifier(plan: &LogicalPlan) -> Option<TableReference> {
    match plan {
        LogicalPlan::SubqueryAlias(alias) => Some(alias.alias.clone()),
        LogicalPlan::TableScan(scan) => Some(scan.table_name.clone()),
        other => other
            .inputs()
            .first()
            .and_then(|input| driving_qualifier(input)),
    }
}

/// `plan` with a sort on the driving table's position (`_lsn`, `_seq`) under
/// its final projection. A join may permute a change batch (a hash join
/// emits unmatched rows last); sinks need the rows in the order the changes
/// committed (a Redis list's newest first, the position filter after a
/// restart). Views are put back in order after they run (`execute_view`);
/// this does the same for a query that joins without one. Unchanged when
/// the driving table's position is not in scope.
pub(crate) fn sorted_by_position(plan: LogicalPlan) -> DfResult<LogicalPlan> {
    let (projection, input) = match plan {
        LogicalPlan::Projection(projection) => {
            let input = Arc::clone(&projection.input);
            (Some(projection), input)
        }
        other => (None, Arc::new(other)),
    };
    let restore = |input: Arc<LogicalPlan>| match &projection {
        Some(p) => Projection::try_new(p.expr.clone(), input).map(LogicalPlan::Projection),
        None => Ok(Arc::unwrap_or_clone(input)),
    };
    let Some(qualifier) = driving_qualifier(&input) else {
        return restore(input);
    };
    let column = |name: &str| Column::new(Some(qualifier.clone()), name);
    let schema = input.schema();
    if !schema.has_column(&column(LSN_COLUMN)) || !schema.has_column(&column(SEQ_COLUMN)) {
        return restore(input);
    }
    let sorted = LogicalPlanBuilder::from(Arc::unwrap_or_clone(input))
        .sort(vec![
            Expr::Column(column(LSN_COLUMN)).sort(true, false),
            Expr::Column(column(SEQ_COLUMN)).sort(true, false),
        ])?
        .build()?;
    restore(Arc::new(sorted))
}
