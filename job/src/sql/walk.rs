//! Walking planned queries: which table drives a query, which tables it
//! reads, and whether it keeps state across batches (refused without a
//! window).

use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::datasource::source_as_provider;
use datafusion::logical_expr::LogicalPlan;

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
