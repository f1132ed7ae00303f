//! Physical plans, made once per logical plan and reused for every batch.
//!
//! Planning a query (physical planning and its optimizer passes) cost more
//! than running it over a typical change batch. Every table a job's plans
//! read is a [`BatchTable`](super::batch_table::BatchTable), whose scan reads
//! the table's contents when the plan executes, so one physical plan serves
//! every batch. Before each run the plan is copied with
//! [`reset_plan_states`], so no state of one run (a hash join's build side)
//! reaches the next. Dynamic filters, which that function cannot reset, are
//! turned off in the job's session (`JobPlan::new`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use arrow::record_batch::RecordBatch;
use datafusion::common::DFSchemaRef;
use datafusion::error::Result as DfResult;
use datafusion::execution::TaskContext;
use datafusion::logical_expr::LogicalPlan;
use datafusion::physical_plan::execution_plan::reset_plan_states;
use datafusion::physical_plan::{collect, ExecutionPlan};
use datafusion::prelude::SessionContext;

/// A physical plan, and the schema of the logical plan it was made from.
type Planned = (DFSchemaRef, Arc<dyn ExecutionPlan>);

/// The physical plans of a job's logical plans, keyed by the logical plan's
/// address (a `JobPlan` holds its logical plans unchanged for its life) and
/// checked against its schema, so a plan at an address that was reused is
/// never mistaken for another.
#[derive(Default)]
pub struct PhysicalPlans {
    plans: Mutex<HashMap<usize, Planned>>,
    /// The context plans execute in: the session's functions and settings,
    /// which do not change once the job is planned.
    task: OnceLock<Arc<TaskContext>>,
}

impl PhysicalPlans {
    /// Runs `plan` over the contents its tables hold now.
    pub async fn collect(
        &self,
        ctx: &SessionContext,
        plan: &LogicalPlan,
    ) -> DfResult<Vec<RecordBatch>> {
        let key = plan as *const LogicalPlan as usize;
        let cached = self
            .plans
            .lock()
            .expect("plan cache lock poisoned")
            .get(&key)
            .filter(|(schema, _)| Arc::ptr_eq(schema, plan.schema()))
            .map(|(_, physical)| physical.clone());
        let template = match cached {
            Some(physical) => physical,
            None => {
                let state = ctx.state();
                let physical = state
                    .query_planner()
                    .create_physical_plan(plan, &state)
                    .await?;
                self.plans
                    .lock()
                    .expect("plan cache lock poisoned")
                    .insert(key, (plan.schema().clone(), physical.clone()));
                physical
            }
        };
        let task = self.task.get_or_init(|| ctx.task_ctx()).clone();
        collect(reset_plan_states(template)?, task).await
    }
}
