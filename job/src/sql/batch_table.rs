//! The table every `postgres-cdc` source is in the job's DataFusion session:
//! its contents are the change batch (or dimension) the engine sets right
//! before a query runs.
//!
//! Its scan is a [`SlotExec`], which reads the contents when the plan is
//! *executed*, not when it is planned: so one physical plan serves every
//! batch (`JobPlan::run` plans each query once and resets the plan's state
//! before each run). It reports no statistics, so the optimizer makes no
//! choice that holds for one batch only (such as answering `count(*)` from
//! the row count it saw at planning time).

use std::fmt;
use std::sync::{Arc, RwLock};

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use async_trait::async_trait;
use datafusion::catalog::Session;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::datasource::{TableProvider, TableType};
use datafusion::error::Result as DfResult;
use datafusion::execution::TaskContext;
use datafusion::logical_expr::Expr;
use datafusion::physical_expr::{EquivalenceProperties, PhysicalExpr};
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::memory::MemoryStream;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, Partitioning, PlanProperties,
    SendableRecordBatchStream,
};

type Contents = Arc<RwLock<Vec<RecordBatch>>>;

/// A table whose contents are set by the engine before each query runs.
#[derive(Debug)]
pub struct BatchTable {
    schema: SchemaRef,
    batches: Contents,
}

impl BatchTable {
    pub fn new(schema: SchemaRef) -> Self {
        BatchTable {
            schema,
            batches: Contents::default(),
        }
    }

    /// Replaces the contents seen by the next physical plan.
    pub fn set(&self, batches: Vec<RecordBatch>) {
        *self.batches.write().expect("batch table lock poisoned") = batches;
    }
}

#[async_trait]
impl TableProvider for BatchTable {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let schema = match projection {
            Some(columns) => Arc::new(self.schema.project(columns)?),
            None => self.schema.clone(),
        };
        Ok(Arc::new(SlotExec {
            contents: self.batches.clone(),
            projection: projection.cloned(),
            properties: Arc::new(PlanProperties::new(
                EquivalenceProperties::new(schema.clone()),
                Partitioning::UnknownPartitioning(1),
                EmissionType::Incremental,
                Boundedness::Bounded,
            )),
            schema,
        }))
    }
}

/// The scan of a [`BatchTable`]: yields the table's contents as they are
/// when the plan executes.
#[derive(Debug)]
pub struct SlotExec {
    contents: Contents,
    projection: Option<Vec<usize>>,
    /// The projected schema.
    schema: SchemaRef,
    properties: Arc<PlanProperties>,
}

impl DisplayAs for SlotExec {
    fn fmt_as(&self, _: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "SlotExec: projection={:?}", self.projection)
    }
}

impl ExecutionPlan for SlotExec {
    fn name(&self) -> &str {
        "SlotExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        Vec::new()
    }

    fn apply_expressions(
        &self,
        _: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> DfResult<TreeNodeRecursion>,
    ) -> DfResult<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn with_new_children(
        self: Arc<Self>,
        _: Vec<Arc<dyn ExecutionPlan>>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        Ok(self)
    }

    fn execute(
        &self,
        _partition: usize,
        _context: Arc<TaskContext>,
    ) -> DfResult<SendableRecordBatchStream> {
        let batches = self
            .contents
            .read()
            .expect("batch table lock poisoned")
            .clone();
        Ok(Box::pin(MemoryStream::try_new(
            batches,
            self.schema.clone(),
            self.projection.clone(),
        )?))
    }
}
